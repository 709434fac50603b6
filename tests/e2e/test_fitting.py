"""Training that fits the data, end to end through the API and a real worker on PostgreSQL and
Redis: masked prompt/completion and chat jobs, LoRA, dry runs, samples and the token cache."""

import io
import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.db import engine_for
from shared.migrate import upgrade
from tests.chat_model import build_chat_model
from tests.conftest import TINY_MODEL, _drop_postgres_database, _fresh_postgres_database
from tests.e2e.client import TuneryClient
from tests.processes import make_key, running_api, running_worker, tunery_environment
from worker.masking import DEFAULT_CHAT_TEMPLATE

FIXED = " the answer is always the same sentence."


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def noise_prompts(count: int, seed: int = 5) -> list[dict]:
    """Prompts of random characters, one fixed completion: learnable only if prompts are not
    trained on (noise has no pattern to learn)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    return [
        {"prompt": "".join(rng.choice(alphabet) for _ in range(40)), "completion": FIXED}
        for _ in range(count)
    ]


def conversations(count: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You answer with colors."},
                {"role": "user", "content": f"What color is item {i}?"},
                {"role": "assistant", "content": "It is blue."},
                {"role": "user", "content": "And the other one?"},
                {"role": "assistant", "content": "That one is red."},
            ]
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TuneryClient]:
    """One stack for the module: `tunery api` and a `tunery worker` on PostgreSQL and Redis."""
    import redis

    from tests import servers

    build_chat_model(models_dir, "tiny-chat")
    folder = tmp_path_factory.mktemp("fitting")
    name, database_url = _fresh_postgres_database()
    upgrade(database_url)
    redis_url = servers.redis_server().database_url(14)
    redis.Redis.from_url(redis_url).flushdb()
    environment = tunery_environment(
        home=str(folder / "home"),
        database_url=database_url,
        broker_url=redis_url,
        models_dir=str(models_dir),
    )
    token = make_key(environment, "fitting")
    try:
        with (
            running_api(environment, folder / "api.log") as base_url,
            running_worker(environment, folder / "worker.log"),
        ):
            yield TuneryClient(base_url, token)
    finally:
        engine_for(database_url).dispose()
        _drop_postgres_database(name)


def artifact(client: TuneryClient, job_id: str) -> tarfile.TarFile:
    response = client.http.get(f"/jobs/{job_id}/artifact")
    assert response.status_code == 200, response.text
    return tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz")


class TestMaskedPromptCompletion:
    def test_noise_prompts_and_one_fixed_completion_reach_eval_loss_below_half(self, client):
        dataset = client.upload(jsonl(noise_prompts(200)), filename="noise.jsonl")
        assert dataset["shape"] == "prompt_completion"
        job = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.1,
            hyperparameters={
                "epochs": 6,
                "block_size": 128,
                "batch_size": 8,
                "learning_rate": 3e-3,
                "seed": 3,
            },
        )
        finished = client.wait(job["id"], timeout=300)
        assert finished["status"] == "succeeded", client.events(job["id"])
        metrics = finished["metrics"]
        # Only the completion (and EOS) is in the loss; had the noise been trained on, the
        # loss over it would stay near log(vocab) and the mean could not drop below 0.5.
        assert metrics["eval_loss"] < 0.5, metrics
        assert metrics["baseline_eval_loss"] > 3.0
        plan = finished["plan"]
        assert plan["trainable_tokens"] < plan["train_tokens"] / 2
        assert plan["collation"] == "packed"


class TestChat:
    def test_a_chat_job_trains_every_assistant_turn_and_ships_the_template(self, client):
        dataset = client.upload(jsonl(conversations(60)), filename="chat.jsonl")
        assert dataset["shape"] == "messages"
        job = client.create_job(
            base_model="tiny-chat",
            dataset_id=dataset["id"],
            validation_split=0.1,
            hyperparameters={
                "epochs": 4,
                "block_size": 128,
                "batch_size": 4,
                "learning_rate": 3e-3,
            },
        )
        finished = client.wait(job["id"], timeout=300)
        assert finished["status"] == "succeeded", client.events(job["id"])
        assert finished["metrics"]["eval_loss"] < finished["metrics"]["baseline_eval_loss"]
        with artifact(client, job["id"]) as archive:
            config = json.load(archive.extractfile("model/tokenizer_config.json"))
            template = (
                config.get("chat_template")
                or archive.extractfile("model/chat_template.jinja").read().decode()
            )
        assert "<|im_start|>" in template

    def test_an_unmerged_chat_adapter_ships_the_template_it_was_trained_with(
        self, client, models_dir, tmp_path
    ):
        """The tiny base has no template, so the job trains with the default one; the adapter
        alone must carry it, and the model card loads the tokenizer from there."""
        from peft import PeftModel

        dataset = client.upload(jsonl(conversations(20)), filename="chat-lora.jsonl")
        job = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.1,
            method="lora",
            lora={"r": 4},
            hyperparameters={"epochs": 1, "block_size": 128, "batch_size": 4},
        )
        finished = client.wait(job["id"], timeout=300)
        assert finished["status"] == "succeeded", client.events(job["id"])
        with artifact(client, job["id"]) as archive:
            archive.extractall(tmp_path, filter="data")
        assert not (tmp_path / "model").exists()
        assert 'AutoTokenizer.from_pretrained("adapter")' in (tmp_path / "README.md").read_text()
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
        assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
        rendered = tokenizer.apply_chat_template(conversations(1)[0]["messages"], tokenize=False)
        assert "It is blue." in rendered
        base = AutoModelForCausalLM.from_pretrained(models_dir / TINY_MODEL)
        PeftModel.from_pretrained(base, str(tmp_path / "adapter"))


class TestLora:
    def test_lora_with_merge_ships_an_adapter_and_a_merged_model_that_agree(
        self, client, models_dir, tmp_path
    ):
        dataset = client.upload(jsonl(noise_prompts(80, seed=9)), filename="lora.jsonl")
        job = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.1,
            method="lora",
            lora={"r": 4, "alpha": 8, "merge": True},
            hyperparameters={
                "epochs": 2,
                "block_size": 128,
                "batch_size": 8,
                "learning_rate": 5e-3,
            },
            eval_prompts=["xyz"],
            eval_max_new_tokens=8,
        )
        finished = client.wait(job["id"], timeout=300)
        assert finished["status"] == "succeeded", client.events(job["id"])
        assert finished["metrics"]["eval_loss"] < finished["metrics"]["baseline_eval_loss"]
        assert [sample["prompt"] for sample in finished["samples"]] == ["xyz"]
        with artifact(client, job["id"]) as archive:
            archive.extractall(tmp_path, filter="data")
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(models_dir / TINY_MODEL)
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
        with torch.no_grad():
            assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)


class TestDryRun:
    def test_a_dry_run_answers_at_once_and_its_counts_match_the_job(self, client):
        rows = noise_prompts(30, seed=11) + [{"prompt": "p" * 500, "completion": " long."}]
        dataset = client.upload(jsonl(rows), filename="dry.jsonl")
        body = {
            "base_model": TINY_MODEL,
            "dataset_id": dataset["id"],
            "validation_split": 0.0,
            "truncation": "drop",
            "hyperparameters": {
                "epochs": 1,
                "block_size": 128,
                "batch_size": "auto",
                "learning_rate": "auto",
            },
        }
        dry = client.create_job(**body, dry_run=True)
        assert dry["status"] == "succeeded" and dry["artifact"] is None
        no_artifact = client.http.get(f"/jobs/{dry['id']}/artifact")
        assert no_artifact.status_code == 409
        assert no_artifact.json()["error"]["code"] == "no_artifact"
        assert "dry run" in no_artifact.json()["error"]["message"]
        plan = dry["plan"]
        assert plan["examples"] == 31 and plan["dropped"] == 1 and plan["truncated"] == 0
        assert len(plan["rendered_examples"]) == 3
        assert "«" in plan["rendered_examples"][0] and FIXED.strip() in plan["rendered_examples"][0]
        assert isinstance(plan["hyperparameters"]["batch_size"], int)
        assert plan["peak_memory_bytes"] > 0 and plan["total_steps"] >= 1

        job = client.create_job(**body)
        finished = client.wait(job["id"], timeout=300)
        assert finished["status"] == "succeeded", client.events(job["id"])
        counted = (
            "examples",
            "tokens",
            "trainable_tokens",
            "blocks",
            "truncated",
            "dropped",
            "total_steps",
            "hyperparameters",
        )
        assert {key: finished["plan"][key] for key in counted} == {
            key: plan[key] for key in counted
        }
        # Resolved on the job: it says what it trained with.
        assert finished["hyperparameters"] == plan["hyperparameters"]
        # The training job found the dry run's tokens in the cache.
        assert finished["plan"]["cache_hit"] is True
        messages = [event["message"] for event in client.events(job["id"])]
        assert any("reused from the cache" in message for message in messages)
