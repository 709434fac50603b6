"""The jobs endpoints, on SQLite and PostgreSQL (see the `settings` fixture)."""

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared import jobs as job_states
from shared.db import session_scope
from shared.models import Job, JobEvent, JobMetric
from tests.api.conftest import upload
from tests.conftest import TINY_MODEL


def create(client: TestClient, headers: dict[str, str], **body: object):
    return client.post("/jobs", headers=headers, json={"base_model": TINY_MODEL, **body})


def assert_error(response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"type", "code", "message", "param", "details"}
    if param is not None:
        assert error["param"] == param
    return error


def claim(job_id: str) -> int:
    with session_scope() as session:
        attempt = job_states.claim(session, job_id)
    assert attempt is not None
    return attempt


class TestCreateJob:
    def test_a_job_nobody_will_train_says_so(self, client, auth_headers, dataset_id, beating):
        def warned(job_id: str) -> bool:
            events = client.get(f"/jobs/{job_id}/events", headers=auth_headers).json()["data"]
            return any(e["message"].startswith("no worker is alive") for e in events)

        alone = create(client, auth_headers, dataset_id=dataset_id).json()
        beating("gpu-host-1-100")
        served = create(client, auth_headers, dataset_id=dataset_id).json()

        assert (warned(alone["id"]), warned(served["id"])) == (True, False)
        assert alone["status"] == served["status"] == "queued"

    def test_minimal_body_gets_every_default_resolved(self, client, auth_headers, dataset_id):
        response = create(client, auth_headers, dataset_id=dataset_id)
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["id"].startswith("job_") and job["object"] == "job"
        assert job["status"] == "queued" and job["cancel_requested"] is False
        assert job["hyperparameters"] == {
            "epochs": 3,
            "learning_rate": 5e-05,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "block_size": "auto",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "lr_scheduler": "linear",
            "max_steps": None,
            "seed": 42,
            "compile": False,
        }
        assert job["progress"]["step"] == 0 and job["progress"]["fraction"] == 0.0
        assert job["metrics"]["baseline_eval_loss"] is None
        assert job["attempt"] == 0 and job["error"] is None and job["artifact"] is None
        assert job["created_at"].endswith("Z") and job["started_at"] is None

    @pytest.mark.parametrize(
        ("body", "learning_rate"),
        [
            ({"method": "lora"}, 2e-4),  # an adapter needs larger steps than the whole model
            ({"method": "lora", "hyperparameters": {"learning_rate": 1e-5}}, 1e-5),
            ({"method": "lora", "hyperparameters": {"learning_rate": "auto"}}, "auto"),
            ({"method": "full"}, 5e-5),
        ],
    )
    def test_the_default_learning_rate_fits_the_method(
        self, client, auth_headers, dataset_id, body, learning_rate
    ):
        response = create(client, auth_headers, dataset_id=dataset_id, **body)
        assert response.status_code == 201, response.text
        assert response.json()["hyperparameters"]["learning_rate"] == learning_rate

    def test_block_size_auto_is_accepted(self, client, auth_headers, dataset_id):
        auto = create(
            client, auth_headers, dataset_id=dataset_id, hyperparameters={"block_size": "auto"}
        )
        assert auto.status_code == 201 and auto.json()["hyperparameters"]["block_size"] == "auto"

    def test_a_chat_dataset_takes_conversations_as_eval_prompts(self, client, auth_headers):
        line = {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        }
        chat = client.post(
            "/datasets",
            headers=auth_headers,
            files={"file": ("chat.jsonl", (json.dumps(line) + "\n").encode())},
        ).json()["id"]
        prompts = [
            "hi",
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        ]

        response = create(client, auth_headers, dataset_id=chat, eval_prompts=prompts)

        assert response.status_code == 201, response.text
        assert response.json()["eval_prompts"] == prompts

    def test_full_body_round_trips(self, client, auth_headers, dataset_id):
        validation_id = upload(client, auth_headers, "held out line one\nheld out line two\n")
        body = {
            "dataset_id": dataset_id,
            "validation_dataset_id": validation_id,
            "method": "lora",
            "hyperparameters": {"epochs": 1, "block_size": 64, "max_steps": 300},
            "lora": {"r": 4},
            "eval_prompts": ["Apple Inc. released"],
            "suffix": "tech-news",
            "metadata": {"team": "search"},
        }
        job = create(client, auth_headers, **body).json()
        assert job["validation_dataset_id"] == validation_id
        assert job["lora"] == {
            "r": 4,
            "alpha": 16,
            "dropout": 0.05,
            "target_modules": None,
            "merge": False,
        }
        assert job["progress"]["total_steps"] == 300
        assert job["suffix"] == "tech-news" and job["metadata"] == {"team": "search"}
        assert client.get(f"/jobs/{job['id']}", headers=auth_headers).json() == job

    def test_the_row_is_committed_and_its_creation_is_an_event(
        self, client, auth_headers, dataset_id, beating
    ):
        beating("gpu-host-1-100")  # else a warning says that no worker is alive
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        with session_scope() as session:
            assert session.get(Job, job_id).status == "queued"
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [(event.type, event.data["status"]) for event in events] == [("status", "queued")]

    @pytest.mark.parametrize(
        ("body", "status", "code", "param"),
        [
            ({"base_model": "no-such-model"}, 422, "unknown_base_model", "base_model"),
            ({"base_model": "../../etc"}, 422, "invalid_request", "base_model"),
            ({"base_model": "openai-community/gpt2"}, 422, "unknown_base_model", "base_model"),
            ({"hyperparameters": {"epochs": 0}}, 422, "invalid_request", "hyperparameters.epochs"),
            (
                {"hyperparameters": {"learning_rate": -1}},
                422,
                "invalid_request",
                "hyperparameters.learning_rate",
            ),
            (
                {"hyperparameters": {"batch_size": 0}},
                422,
                "invalid_request",
                "hyperparameters.batch_size",
            ),
            (
                {"hyperparameters": {"lr_scheduler": "sideways"}},
                422,
                "invalid_request",
                "hyperparameters.lr_scheduler",
            ),
            (
                {"hyperparameters": {"block_size": 100000}},
                422,
                "invalid_request",
                "hyperparameters.block_size",
            ),
            (
                {"hyperparameters": {"block_size": 4096}},
                422,
                "block_size_too_large",
                "hyperparameters.block_size",
            ),
            (
                {"hyperparameters": {"epoch": 1}},
                422,
                "invalid_request",
                "hyperparameters.epoch",
            ),
            (
                {"hyperparameters": {"epochs": "many"}},
                422,
                "invalid_request",
                "hyperparameters.epochs",
            ),
            ({"eval_prompts": ["ok", ""]}, 422, "invalid_request", "eval_prompts.1"),
            ({"truncation": "cut"}, 422, "invalid_request", "truncation"),
            ({"eval_max_new_tokens": 0}, 422, "invalid_request", "eval_max_new_tokens"),
            (  # the tiny model has 1024 positions: no room left for a prompt
                {"eval_prompts": ["the"], "eval_max_new_tokens": 1024},
                422,
                "eval_max_new_tokens_too_large",
                "eval_max_new_tokens",
            ),
            (  # a conversation needs a chat template, which a text dataset is not trained with
                {"eval_prompts": ["ok", [{"role": "user", "content": "hi"}]]},
                422,
                "invalid_request",
                "eval_prompts.1",
            ),
            (
                {"eval_prompts": [[{"role": "robot", "content": "hi"}]]},
                422,
                "invalid_request",
                "eval_prompts.0",
            ),
            ({"validation_split": 0.9}, 422, "invalid_request", "validation_split"),
            ({"method": "qlora"}, 422, "invalid_request", "method"),
            ({"lora": {"r": 8}}, 422, "invalid_request", None),
            ({"suffix": "Not A Suffix!"}, 422, "invalid_request", "suffix"),
            ({"dataset_id": "ds_missing"}, 422, "dataset_not_found", "dataset_id"),
            (
                {"validation_dataset_id": "ds_missing"},
                422,
                "dataset_not_found",
                "validation_dataset_id",
            ),
            ({"surprise": 1}, 422, "invalid_request", "surprise"),
        ],
    )
    def test_bad_requests_name_the_field_and_store_nothing(
        self, client, auth_headers, dataset_id, body, status, code, param
    ):
        response = create(client, auth_headers, **{"dataset_id": dataset_id, **body})
        assert_error(response, status, code, param)
        assert client.get("/jobs", headers=auth_headers).json()["data"] == []

    def test_missing_required_fields(self, client, auth_headers):
        response = client.post("/jobs", headers=auth_headers, json={})
        error = assert_error(response, 422, "invalid_request")
        assert {problem["param"] for problem in error["details"]["errors"]} == {
            "base_model",
            "dataset_id",
        }

    def test_body_that_is_not_json(self, client, auth_headers):
        response = client.post(
            "/jobs", headers={**auth_headers, "Content-Type": "application/json"}, content=b"{"
        )
        assert_error(response, 422, "invalid_request")

    def test_validation_data_must_have_the_training_shape(self, client, auth_headers, dataset_id):
        chat = client.post(
            "/datasets",
            headers=auth_headers,
            files={"file": ("c.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
        ).json()["id"]
        response = create(client, auth_headers, dataset_id=dataset_id, validation_dataset_id=chat)
        assert_error(response, 422, "dataset_shapes_differ", "validation_dataset_id")

    def test_another_projects_dataset_is_not_found(
        self, client, auth_headers, other_auth_headers, dataset_id
    ):
        response = create(client, other_auth_headers, dataset_id=dataset_id)
        assert_error(response, 422, "dataset_not_found", "dataset_id")

    def test_allowed_hub_id_is_accepted(self, client, auth_headers, dataset_id, monkeypatch):
        from shared.settings import get_settings

        monkeypatch.setenv("TUNERY_ALLOWED_BASE_MODELS", "openai-community/gpt2, gpt2")
        get_settings.cache_clear()
        response = create(client, auth_headers, dataset_id=dataset_id, base_model="gpt2")
        assert response.status_code == 201, response.text


class TestIdempotency:
    def test_same_key_same_body_returns_the_same_job(self, client, auth_headers, dataset_id):
        headers = {**auth_headers, "Idempotency-Key": "create-once"}
        first = create(client, headers, dataset_id=dataset_id)
        second = create(client, headers, dataset_id=dataset_id)
        assert first.status_code == second.status_code == 201
        assert second.headers["Idempotent-Replayed"] == "true"
        assert first.json()["id"] == second.json()["id"]
        assert len(client.get("/jobs", headers=auth_headers).json()["data"]) == 1

    def test_same_key_different_body_conflicts(self, client, auth_headers, dataset_id):
        headers = {**auth_headers, "Idempotency-Key": "create-once"}
        assert create(client, headers, dataset_id=dataset_id).status_code == 201
        response = create(client, headers, dataset_id=dataset_id, suffix="other")
        assert_error(response, 409, "idempotency_key_reused", "Idempotency-Key")

    def test_keys_are_per_project(self, client, auth_headers, other_auth_headers, dataset_id):
        other_dataset = upload(client, other_auth_headers)
        first = create(client, {**auth_headers, "Idempotency-Key": "k"}, dataset_id=dataset_id)
        second = create(
            client, {**other_auth_headers, "Idempotency-Key": "k"}, dataset_id=other_dataset
        )
        assert first.status_code == second.status_code == 201
        assert first.json()["id"] != second.json()["id"]


class TestListJobs:
    def test_newest_first_with_cursor_pages(self, client, auth_headers, dataset_id):
        ids = [create(client, auth_headers, dataset_id=dataset_id).json()["id"] for _ in range(5)]
        first = client.get("/jobs?limit=2", headers=auth_headers).json()
        assert first["object"] == "list" and first["has_more"] is True
        assert [job["id"] for job in first["data"]] == ids[::-1][:2]
        second = client.get(f"/jobs?limit=2&after={ids[3]}", headers=auth_headers).json()
        assert [job["id"] for job in second["data"]] == [ids[2], ids[1]]
        last = client.get(f"/jobs?limit=2&after={ids[1]}", headers=auth_headers).json()
        assert [job["id"] for job in last["data"]] == [ids[0]] and last["has_more"] is False

    def test_status_filter(self, client, auth_headers, dataset_id):
        kept = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        cancelled = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        client.post(f"/jobs/{cancelled}/cancel", headers=auth_headers)
        listed = client.get("/jobs?status=queued", headers=auth_headers).json()["data"]
        assert [job["id"] for job in listed] == [kept]
        listed = client.get("/jobs?status=cancelled", headers=auth_headers).json()["data"]
        assert [job["id"] for job in listed] == [cancelled]

    @pytest.mark.parametrize("query", ["limit=0", "limit=101", "status=done"])
    def test_bad_query(self, client, auth_headers, query):
        assert_error(client.get(f"/jobs?{query}", headers=auth_headers), 422, "invalid_request")

    def test_only_your_projects_jobs(self, client, auth_headers, other_auth_headers, dataset_id):
        create(client, auth_headers, dataset_id=dataset_id)
        assert client.get("/jobs", headers=other_auth_headers).json()["data"] == []


class TestGetJob:
    def test_unknown_id_is_404(self, client, auth_headers):
        assert_error(client.get("/jobs/job_nope", headers=auth_headers), 404, "not_found")

    def test_shows_progress_written_by_the_worker(self, client, auth_headers, dataset_id):
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        attempt = claim(job_id)
        progress = {
            "step": 5,
            "total_steps": 10,
            "epoch": 0.5,
            "fraction": 0.5,
            "tokens_per_second": 100.0,
            "eta_seconds": 3.0,
        }
        with session_scope() as session:
            # Still this attempt's job (not None), and no cancel requested (False).
            assert job_states.heartbeat(session, job_id, attempt, {"progress": progress}) is False
        job = client.get(f"/jobs/{job_id}", headers=auth_headers).json()
        assert job["status"] == "running" and job["attempt"] == 1
        assert job["progress"] == progress and job["started_at"].endswith("Z")

    def test_the_plan_is_documented_field_by_field(self, client):
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        plan_of_a_job = schemas["JobRead"]["properties"]["plan"]["anyOf"]
        assert {"$ref": "#/components/schemas/JobPlan"} in plan_of_a_job
        plan = schemas["JobPlan"]["properties"]
        # What a dry run answers (issue: examples, tokens, blocks, cut or left-out examples,
        # trainable tokens, steps, peak memory, the first examples rendered).
        answered = [
            "examples",
            "tokens",
            "blocks",
            "truncated",
            "dropped",
            "trainable_tokens",
            "total_steps",
            "peak_memory_bytes",
            "rendered_examples",
        ]
        assert set(answered) <= set(plan)
        # The README sends readers to this schema for each field, so each one says what it is.
        assert [name for name, field in plan.items() if not field.get("description")] == []


class TestCancelJob:
    def test_queued_job_is_cancelled_at_once(self, client, auth_headers, dataset_id):
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        job = client.post(f"/jobs/{job_id}/cancel", headers=auth_headers).json()
        assert job["status"] == "cancelled" and job["finished_at"] is not None
        with session_scope() as session:
            assert job_states.claim(session, job_id) is None  # a late message finds nothing

    def test_running_job_gets_cancel_requested(self, client, auth_headers, dataset_id):
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        claim(job_id)
        job = client.post(f"/jobs/{job_id}/cancel", headers=auth_headers).json()
        assert job["status"] == "running" and job["cancel_requested"] is True

    def test_finished_job_conflicts(self, client, auth_headers, dataset_id):
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        client.post(f"/jobs/{job_id}/cancel", headers=auth_headers)
        response = client.post(f"/jobs/{job_id}/cancel", headers=auth_headers)
        assert_error(response, 409, "job_finished")

    def test_every_status_change_is_an_event(self, client, auth_headers, dataset_id):
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        attempt = claim(job_id)
        client.post(f"/jobs/{job_id}/cancel", headers=auth_headers)
        with session_scope() as session:
            assert job_states.mark_cancelled(session, job_id, attempt)
        events = client.get(f"/jobs/{job_id}/events", headers=auth_headers).json()["data"]
        assert [event["data"].get("status") for event in events if event["type"] == "status"] == [
            "queued",
            "running",
            "cancelled",
        ]


class TestJobEvents:
    def test_oldest_first_with_after(self, client, auth_headers, dataset_id, beating):
        beating("gpu-host-1-100")  # else a warning says that no worker is alive
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        with session_scope() as session:
            for number in range(3):
                job_states.add_event(session, job_id, f"note {number}", data={"n": number})
        events = client.get(f"/jobs/{job_id}/events", headers=auth_headers).json()
        messages = [event["message"] for event in events["data"]]
        assert messages == ["job created and queued", "note 0", "note 1", "note 2"]
        first = events["data"][0]
        assert first["object"] == "job.event" and first["id"].startswith("evt_")
        assert first["level"] == "info" and first["type"] == "status"
        after = client.get(
            f"/jobs/{job_id}/events?after={events['data'][1]['id']}&limit=1",
            headers=auth_headers,
        ).json()
        assert [event["message"] for event in after["data"]] == ["note 1"]
        assert after["has_more"] is True

    def test_bad_cursor(self, client, auth_headers, dataset_id):
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        response = client.get(f"/jobs/{job_id}/events?after=nope", headers=auth_headers)
        assert_error(response, 422, "invalid_request", "after")


class TestJobMetrics:
    def test_every_logged_step_in_order(self, client, auth_headers, dataset_id):
        job_id = create(client, auth_headers, dataset_id=dataset_id).json()["id"]
        with session_scope() as session:
            for step in (2, 1):
                session.add(
                    JobMetric(
                        job_id=job_id,
                        step=step,
                        epoch=step / 10,
                        train_loss=3.0 - step,
                        learning_rate=1e-4,
                    )
                )
        metrics = client.get(f"/jobs/{job_id}/metrics", headers=auth_headers).json()
        assert [row["step"] for row in metrics["data"]] == [1, 2]
        assert metrics["data"][0]["train_loss"] == 2.0
        assert set(metrics["data"][0]) == {
            "step",
            "epoch",
            "train_loss",
            "learning_rate",
            "grad_norm",
            "tokens_per_second",
            "eval_loss",
            "created_at",
        }
