"""The training worker: Celery tasks (thin) and the pipeline that fine-tunes one job."""
