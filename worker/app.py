"""The Celery app as the worker runs it (`celery -A worker.app worker`)."""

from shared.queue import celery_app

app = celery_app()
