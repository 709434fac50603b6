"""Sample generations before and after training: a chat job's prompts go through the chat
template it trains with, and a sample never asks for more tokens than the model has positions."""

import json

from sqlalchemy import update
from transformers import AutoTokenizer

from shared.db import session_scope
from shared.models import Job
from shared.settings import Settings
from tests.chat_model import build_chat_model
from tests.tiny_model import build_tiny_model
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import events_of, learnable_text, load_job
from worker import pipeline
from worker.lease import Lease
from worker.trainer import load_base_model

CHAT_LINES = [
    {
        "messages": [
            {"role": "user", "content": f"colour {i}?"},
            {"role": "assistant", "content": "red"},
        ]
    }
    for i in range(60)
]


def with_prompts(job_id: str, **values: object) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_chat_jobs_prompts_go_through_its_chat_template(
    settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
) -> None:
    build_chat_model(settings.resolved_models_dir, "tiny-chat")
    data = "".join(json.dumps(line) + "\n" for line in CHAT_LINES)
    dataset = make_dataset(data, filename="chat.jsonl", format="jsonl", shape="messages")
    job_id, attempt = make_job(dataset, base_model="tiny-chat", block_size=64, max_steps=2)
    conversation = [
        {"role": "system", "content": "Answer with a colour."},
        {"role": "user", "content": "colour 7?"},
    ]
    with_prompts(job_id, eval_prompts=["colour 3?", conversation], eval_max_new_tokens=4)

    job = load_job(job_id)
    base = load_base_model("tiny-chat", settings, block_size=64)
    sampling = pipeline._sampling(Lease(job_id, attempt), job, base, "messages")
    tokenizer = AutoTokenizer.from_pretrained(settings.resolved_models_dir / "tiny-chat")
    as_transformers_renders = [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        for chat in ([{"role": "user", "content": "colour 3?"}], conversation)
    ]
    assert sampling.texts == as_transformers_renders
    assert sampling.texts[1].endswith("<|im_start|>assistant\n") and sampling.rendered

    pipeline.run(job_id, attempt)

    job = load_job(job_id)
    assert job.status == "succeeded", job.error
    assert [sample["prompt"] for sample in job.samples] == ["colour 3?", conversation]


def test_more_new_tokens_than_positions_are_capped_with_a_warning(
    settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
) -> None:
    # A Hub model's positions are known only to the worker (the API refuses a local one's).
    build_tiny_model(settings.resolved_models_dir, "short-gpt2", positions=64)
    job_id, attempt = make_job(
        make_dataset(learnable_text(40)), base_model="short-gpt2", block_size=32, max_steps=2
    )
    with_prompts(job_id, eval_prompts=["the red"], eval_max_new_tokens=100)

    pipeline.run(job_id, attempt)

    job = load_job(job_id)
    assert job.status == "succeeded", job.error  # was internal_error: IndexError
    assert len(job.samples) == 1
    warnings = [e.message for e in events_of(job_id) if e.level == "warning"]
    assert any("the samples generate 63" in message for message in warnings), warnings
