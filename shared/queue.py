"""The Celery app and the one message the API sends: "look at job X" (`jobs.train`).

The queue is only a doorbell; the job row is the truth. With no broker URL set, messages go
through kombu's filesystem transport under TUNERY_HOME, so the embedded default needs no server.
"""

import os
from functools import lru_cache

from celery import Celery

from shared.settings import Settings, get_settings

TRAIN_TASK = "jobs.train"


def _broker_options(settings: Settings) -> dict[str, object]:
    if settings.broker_url:
        return {
            # Fail fast instead of blocking an API request while Redis is away.
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
            "retry_on_timeout": True,
            # A training task stays unacknowledged (acks_late) for its whole run; Redis hands
            # it out again after this long. The claim turns that redelivery into a no-op.
            "visibility_timeout": settings.broker_visibility_timeout_s,
            # Look for expired deliveries a few times per timeout (kombu's default sweep is
            # every 100 s); one cheap Redis query per worker per interval.
            "unacked_restore_interval": int(
                min(10, max(1, settings.broker_visibility_timeout_s // 4))
            ),
            "unacked_restore_throttle": 1,
        }
    folder = settings.queue_dir
    for sub in ("messages", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "messages"),
        "data_folder_out": str(folder / "messages"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": 0.2,  # the folder is polled; keep the wait for a new job short
    }


@lru_cache
def celery_app() -> Celery:
    settings = get_settings()
    app = Celery("tunery", broker=settings.resolved_broker_url)
    app.conf.update(
        broker_transport_options=_broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # The local queue has no fanout exchange for remote control; it is not needed.
        worker_enable_remote_control=bool(settings.broker_url),
        task_default_queue="tunery",
        include=["worker.app"],
    )
    return app


def send_train(job_id: str) -> None:
    """Ring the doorbell for a committed job. Call only after the commit."""
    celery_app().send_task(TRAIN_TASK, args=[job_id], retry=False)


def broker_reachable() -> bool:
    settings = get_settings()
    if not settings.broker_url:
        celery_app()  # makes the local queue's folders
        return os.access(settings.queue_dir / "messages", os.W_OK)
    try:
        with celery_app().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception:
        return False
