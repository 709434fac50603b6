"""Alembic migrations; `shared.migrate` runs them on SQLite and PostgreSQL alike."""
