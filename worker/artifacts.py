"""The model tarball: model/, README.md (model card), job.json, metrics.jsonl, MANIFEST.sha256.

The package is assembled in a working folder, then streamed as tar.gz straight into storage
while it is hashed, so a multi-gigabyte model is never held in memory nor read back.
"""

import gzip
import hashlib
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared import storage

MANIFEST = "MANIFEST.sha256"
_CHUNK = 1024 * 1024
# Weights barely compress; a low level keeps packaging of large models fast.
_GZIP_LEVEL = 3


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def package_files(package: Path) -> list[str]:
    """Every file of the package as a POSIX path relative to it, sorted."""
    return sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())


def write_manifest(package: Path) -> None:
    """MANIFEST.sha256 in `sha256sum -c` format, for every other file of the package."""
    lines = [
        f"{sha256_file(package / name)}  {name}\n"
        for name in package_files(package)
        if name != MANIFEST
    ]
    (package / MANIFEST).write_text("".join(lines), encoding="utf-8")


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to `target`."""

    def __init__(self, target: BinaryIO, on_chunk: Callable[[], None] | None) -> None:
        self.target = target
        self.on_chunk = on_chunk
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        self.target.write(data)
        if self.on_chunk is not None:
            self.on_chunk()
        return len(data)

    def flush(self) -> None:
        self.target.flush()


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The worker's user, group and modes say nothing to whoever unpacks the model (some files
    # are written private, as temporary files are).
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def upload_tarball(
    package: Path, key: str, on_chunk: Callable[[], None] | None = None
) -> tuple[int, str]:
    """Stream `package` as tar.gz to storage under `key`; returns (bytes, sha256 hex)."""
    with storage.open_write(key) as stream:
        writer = _HashingWriter(stream, on_chunk)
        with (
            gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name in package_files(package):
                tar.add(package / name, arcname=name, recursive=False, filter=_normalise)
    return writer.bytes, writer.digest.hexdigest()


# ---- The model card ----


@dataclass
class CardFacts:
    """What the model card states; everything comes from the job and its run."""

    job_id: str
    base_model: str
    dataset: dict[str, Any]  # filename, sha256, examples, format, shape
    validation: str  # how the validation set was made
    hyperparameters: dict[str, Any]
    training: dict[str, Any]  # steps, blocks, tokens, device
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]  # prompt (text or a conversation), base, tuned
    suffix: str | None
    method: str = "full"
    lora: dict[str, Any] | None = None


def _how_to_load(facts: CardFacts) -> list[str]:
    if facts.method == "lora" and not (facts.lora or {}).get("merge"):
        return [
            "The adapter is in `adapter/` (PEFT format); load it on top of the base model:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{facts.base_model}")',
            'tokenizer = AutoTokenizer.from_pretrained("adapter")',
            'model = PeftModel.from_pretrained(base, "adapter")',
            "```",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("model")',
        'model = AutoModelForCausalLM.from_pretrained("model")',
        'inputs = tokenizer("Your prompt", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=50)[0]))",
        "```",
    ]


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _prompt(prompt: str | list[dict[str, str]]) -> str:
    """A text prompt in code, or a conversation as its turns (rendered by the chat template)."""
    if isinstance(prompt, str):
        return f"`{prompt}`"
    turns = "; ".join(f"{message['role']}: `{message['content']}`" for message in prompt)
    return f"a conversation, through the chat template ({turns})"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or " ").splitlines() or [" "])


def _method_text(facts: CardFacts) -> str:
    if facts.method != "lora":
        return "full fine-tune"
    lora = facts.lora or {}
    merged = ", merged into model/" if lora.get("merge") else ""
    return f"LoRA r={lora.get('r')} alpha={lora.get('alpha')}{merged}"


def render_model_card(facts: CardFacts) -> str:
    metrics = facts.metrics
    title = f"{facts.base_model} fine-tuned" + (f" ({facts.suffix})" if facts.suffix else "")
    lines = [
        f"# {title}",
        "",
        f"Fine-tuned by Tunery, job `{facts.job_id}`, from base model `{facts.base_model}` "
        f"({_method_text(facts)}, causal language modelling on packed blocks).",
        "",
        "## Dataset",
        "",
        f"- file: `{facts.dataset['filename']}` ({facts.dataset['format']}, "
        f"{facts.dataset['shape']})",
        f"- sha256: `{facts.dataset['sha256']}`",
        f"- examples: {facts.dataset['examples']}",
        f"- validation: {facts.validation}",
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in facts.hyperparameters.items()),
        "",
        "## Training",
        "",
        *(f"- {name}: {value}" for name, value in facts.training.items()),
        "",
        "## Evaluation",
        "",
        "| | loss | perplexity |",
        "| --- | --- | --- |",
        f"| base model | {_number(metrics.get('baseline_eval_loss'))} "
        f"| {_number(metrics.get('baseline_eval_perplexity'))} |",
        f"| fine-tuned | {_number(metrics.get('eval_loss'))} "
        f"| {_number(metrics.get('eval_perplexity'))} |",
        "",
        f"Final training loss: {_number(metrics.get('train_loss'))}.",
        "",
    ]
    if facts.samples:
        lines += ["## Samples", "", "Greedy decoding, before and after fine-tuning.", ""]
        for sample in facts.samples:
            lines += [
                f"**Prompt:** {_prompt(sample['prompt'])}",
                "",
                "Base model:",
                "",
                _quote(sample.get("base", "")),
                "",
                "Fine-tuned:",
                "",
                _quote(sample.get("tuned", "")),
                "",
            ]
    lines += [
        "## How to load it",
        "",
        *_how_to_load(facts),
        "",
        f"Check the files with `sha256sum -c {MANIFEST}`.",
        "",
    ]
    return "\n".join(lines)
