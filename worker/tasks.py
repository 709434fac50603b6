"""Celery tasks: thin, they take ids, claim the row and hand over to plain functions."""

import logging

from shared import jobs
from shared.db import session_scope
from shared.queue import TRAIN_TASK, celery_app
from worker import pipeline, shutdown

logger = logging.getLogger(__name__)


@celery_app().task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    """Claim the job and train it; a duplicate or late message finds nothing to claim."""
    with session_scope() as session:
        attempt = jobs.claim(session, job_id)
    if attempt is None:
        logger.info("job %s is not queued; nothing to do", job_id)
        return
    with shutdown.hand_back_on_sigterm():
        pipeline.run(job_id, attempt)
