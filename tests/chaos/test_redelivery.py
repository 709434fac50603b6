"""The broker may deliver a training message more than once (a duplicate, a visibility timeout
that ran out while the job was still training): the claim makes every extra delivery a no-op,
so a job trains once."""

import re

from celery import Celery

from shared.queue import TRAIN_TASK
from tests.chaos.conftest import Stack, figures
from tests.processes import wait_for

RECEIVED = re.compile(r"Task jobs\.train\[([0-9a-f-]+)\] received")


class TestRedelivery:
    def test_duplicates_and_a_visibility_timeout_redelivery_train_once(self, stack: Stack) -> None:
        short = {"broker_visibility_timeout_s": "2"}
        first = stack.start_worker("first", **short)
        stack.wait_ready("first", first)
        job_id = stack.create_job()
        stack.wait_step(job_id, 1)
        second = stack.start_worker("second", **short)
        stack.wait_ready("second", second)

        doorbell = Celery(broker=stack.environment["TUNERY_BROKER_URL"])
        duplicates = {
            doorbell.send_task(TRAIN_TASK, args=[job_id], queue="tunery").id for _ in range(2)
        }

        def received() -> list[str]:
            return RECEIVED.findall(
                stack.log("first").read_text() + stack.log("second").read_text()
            )

        # The first worker still trains the original message, unacknowledged, long past the
        # 2 s visibility timeout: Redis hands it out again.
        redelivered = wait_for(
            lambda: [i for i in set(received()) - duplicates if received().count(i) >= 2],
            timeout=60,
            what="a redelivery of the original message",
        )
        finished = stack.client.wait(job_id, timeout=180)
        assert finished["status"] == "succeeded" and finished["attempt"] == 1
        messages = stack.messages(job_id)
        assert messages.count("job claimed by a worker") == 1
        assert messages.count("training started") == 1
        assert messages.count("job succeeded") == 1
        deliveries = received()
        figures(
            "e.duplicates_and_redelivery",
            deliveries=len(deliveries),
            redelivered_original=len(redelivered),
            duplicates_sent=len(duplicates),
            trainings=messages.count("training started"),
        )
