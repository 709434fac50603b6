"""LoRA jobs: wrap the base model with a PEFT adapter, and write the adapter (and merged model).

Default target modules are the attention projections, for every architecture alike:
- GPT-2 (`Conv1D` layers): `c_attn` (fused q/k/v) and `attn.c_proj` (the output projection).
  A bare `c_proj` would also match the MLP's down projection (`mlp.c_proj`), so the attention
  one is named by its parent; PEFT matches a target against the end of a module's dotted name.
- Llama-style models (llama, mistral, qwen2, gemma, phi3 with split projections, ...): any model
  that has `q_proj`, `k_proj`, `v_proj` and `o_proj` modules gets those four.
- Anything else: PEFT's own table for the model type, else a user error asking for
  `lora.target_modules`.

Checkpoints need nothing special: `Trainer` saves only the adapter of a `PeftModel`
(`adapter_model.safetensors`) and loads it back on resume (`load_adapter(is_trainable=True)`).
"""

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from worker.errors import JobFailure

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {"gpt2": ["c_attn", "attn.c_proj"]}
ADAPTER_DIR = "adapter"
MERGED_DIR = "model"


def _module_names(model: PreTrainedModel) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """The modules LoRA adapts when the job does not name them (see the module docstring)."""
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    if set(ATTENTION_PROJECTIONS) <= _module_names(model):
        return list(ATTENTION_PROJECTIONS)
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise JobFailure(
        "lora_target_modules_required",
        f"Tunery has no default LoRA target modules for model type {model_type!r}; set "
        "lora.target_modules to the names of its attention projection layers",
        user_error=True,
    )


def _targets_conv1d(model: PreTrainedModel, targets: list[str]) -> bool:
    """Whether the targets are GPT-2 style `Conv1D` layers (weights stored transposed)."""
    return any(
        isinstance(module, Conv1D)
        for name, module in model.named_modules()
        if any(name == t or name.endswith(f".{t}") for t in targets)
    )


def apply_lora(model: PreTrainedModel, lora: Mapping[str, Any]) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter; only the adapter's parameters stay trainable.

    `lora` is the job's `lora` object: r, alpha, dropout, target_modules (None: the default).
    """
    targets = list(lora.get("target_modules") or default_target_modules(model))
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=int(lora.get("r", 8)),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=float(lora.get("dropout", 0.05)),
        target_modules=targets,
        fan_in_fan_out=_targets_conv1d(model, targets),
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # no module matched, or a matched module LoRA cannot adapt
        raise JobFailure(
            "lora_target_modules_invalid",
            f"lora.target_modules {targets} do not fit this base model: {exc}".splitlines()[0],
            user_error=True,
        ) from exc


def save_lora(
    model: PeftModel,
    package_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    merge: bool,
    base_model_name: str | None = None,
) -> PreTrainedModel | PeftModel:
    """Write `adapter/` (adapter_config.json, adapter_model.safetensors, the tokenizer) and,
    with `merge`, a merged `model/` (safetensors weights, config, generation config, tokenizer).
    The adapter carries the tokenizer because its chat template may be the one the job set.

    Merging folds the adapter into the base weights in place, so with `merge` the returned
    merged model replaces `model`, which must not be used afterwards. `base_model_name` is
    written to adapter_config.json instead of the local folder the base was loaded from.
    """
    adapter_dir = Path(package_dir) / ADAPTER_DIR
    config = model.peft_config[model.active_adapter]
    loaded_from = config.base_model_name_or_path
    if base_model_name is not None:
        config.base_model_name_or_path = base_model_name
    try:
        # The vocabulary is never resized, so no embedding matrix is saved; "auto" would look
        # the base model up on the Hub to find out.
        model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = loaded_from
    # PEFT adds a generic model card; the package has its own README.md.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    tokenizer.save_pretrained(adapter_dir)
    if not merge:
        return model
    merged = model.merge_and_unload()
    merged_dir = Path(package_dir) / MERGED_DIR
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return merged


def load_lora(model: PreTrainedModel, adapter_dir: Path, *, trainable: bool = False) -> PeftModel:
    """A base model with a saved adapter loaded on top (to evaluate it, or to train on)."""
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
