"""Celery tasks: thin, they take ids, claim the row and hand over to plain functions."""

import logging

from shared import jobs
from shared.db import session_scope
from shared.queue import TRAIN_TASK, celery_app, send_train
from worker import pipeline, shutdown

logger = logging.getLogger(__name__)


@celery_app().task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    """Claim the job and train it; a duplicate or late message finds nothing to claim."""
    if shutdown.requested():
        # This process was asked to stop, and may just have handed this very job back: Celery
        # still delivers a message or two while it shuts down. The doorbell rings again for a
        # worker that stays (this one's message is acknowledged as it returns).
        logger.info("job %s: not claimed, the worker is shutting down", job_id)
        send_train(job_id)
        return
    with session_scope() as session:
        attempt = jobs.claim(session, job_id)
    if attempt is None:
        logger.info("job %s is not queued; nothing to do", job_id)
        return
    with shutdown.hand_back_on_sigterm():
        pipeline.run(job_id, attempt)
