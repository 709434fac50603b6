"""What both the API and the worker need: settings, database, schemas, job states, storage."""
