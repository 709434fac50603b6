"""LoRA: default targets, what is trainable, the saved adapter and merged model, resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from tests.conftest import TINY_MODEL
from worker.collate import PackedCollator, PackedDataset
from worker.errors import JobFailure
from worker.lora import apply_lora, default_target_modules, load_lora, save_lora
from worker.masking import DEFAULT_CHAT_TEMPLATE, tokenize_examples
from worker.packing import pack_examples

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "merge": False}
TOKENS = torch.tensor([[5, 80, 17, 300, 42, 7, 99, 250, 3, 64]])


def base(models_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(models_dir / TINY_MODEL).eval()


def adapted_modules(model: torch.nn.Module) -> set[str]:
    names = {name for name, _ in model.named_modules() if name.endswith(".lora_A")}
    return {name.removeprefix("base_model.model.").removesuffix(".lora_A") for name in names}


def perturb_adapter(model: torch.nn.Module) -> None:
    """LoRA B starts at zero (the adapter is a no-op); give it weight so merging matters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


class TestTargets:
    def test_gpt2_default_is_the_attention_projections_only(self, models_dir: Path) -> None:
        model = base(models_dir)
        assert default_target_modules(model) == ["c_attn", "attn.c_proj"]
        peft_model = apply_lora(model, LORA)
        assert adapted_modules(peft_model) == {
            f"transformer.h.{layer}.attn.{name}"
            for layer in (0, 1)
            for name in ("c_attn", "c_proj")
        }  # mlp.c_proj is left alone

    def test_llama_style_default_is_q_k_v_o(self) -> None:
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        model = LlamaForCausalLM(config)
        assert default_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert adapted_modules(apply_lora(model, LORA)) == {
            f"model.layers.0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        }

    def test_unknown_architecture_asks_for_target_modules(self, models_dir: Path) -> None:
        model = base(models_dir)
        model.config.model_type = "made_up"
        with pytest.raises(JobFailure) as caught:
            default_target_modules(model)
        assert caught.value.code == "lora_target_modules_required"
        assert caught.value.user_error

    def test_target_modules_that_match_nothing_are_a_user_error(self, models_dir: Path) -> None:
        with pytest.raises(JobFailure) as caught:
            apply_lora(base(models_dir), {**LORA, "target_modules": ["q_proj"]})
        assert caught.value.code == "lora_target_modules_invalid"
        assert caught.value.user_error

    def test_explicit_target_modules_are_used(self, models_dir: Path) -> None:
        peft_model = apply_lora(base(models_dir), {**LORA, "target_modules": ["c_fc"]})
        assert adapted_modules(peft_model) == {
            "transformer.h.0.mlp.c_fc",
            "transformer.h.1.mlp.c_fc",
        }


def test_only_adapter_parameters_train(models_dir: Path) -> None:
    peft_model = apply_lora(base(models_dir), {**LORA, "r": 8, "alpha": 32, "dropout": 0.1})
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.1)


@torch.no_grad()
def test_merged_model_equals_base_plus_adapter(models_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)
    peft_model = apply_lora(base(models_dir), LORA)
    perturb_adapter(peft_model)
    peft_model.eval()
    expected = peft_model(input_ids=TOKENS).logits
    save_lora(peft_model, tmp_path, tokenizer, merge=True, base_model_name=TINY_MODEL)

    adapter_files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= adapter_files
    assert not any(name.endswith((".bin", ".pt")) for name in adapter_files)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == TINY_MODEL
    assert adapter_config["peft_type"] == "LORA"
    merged_files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= (
        merged_files
    )
    assert not any("lora" in key for key in load_file(tmp_path / "model" / "model.safetensors"))

    reloaded = load_lora(base(models_dir), tmp_path / "adapter").eval()
    with_adapter = reloaded(input_ids=TOKENS).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    merged_logits = merged(input_ids=TOKENS).logits
    plain = base(models_dir)(input_ids=TOKENS).logits

    torch.testing.assert_close(with_adapter, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits, with_adapter, atol=1e-5, rtol=0)
    assert (merged_logits - plain).abs().max() > 1e-2  # the adapter really changed the model
    AutoTokenizer.from_pretrained(tmp_path / "model")  # the merged model ships its tokenizer


def test_without_merge_only_the_adapter_is_written_with_the_tokenizer_it_was_trained_with(
    models_dir: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # as a chat job sets it on a plain base
    peft_model = apply_lora(base(models_dir), LORA)
    assert save_lora(peft_model, tmp_path, tokenizer, merge=False) is peft_model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    shipped = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert shipped.chat_template == DEFAULT_CHAT_TEMPLATE
    assert shipped("some text").input_ids == tokenizer("some text").input_ids


def _train(models_dir: Path, out: Path, **resume: str) -> dict[str, torch.Tensor]:
    """Four LoRA steps on packed prompt/completion rows, checkpointing every two. A resumed
    run starts from a scrambled adapter: only loading the checkpoint can put it right."""
    tokenizer = AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)
    records = [{"prompt": f"Q{i}: the cat", "completion": f" sat on mat {i}."} for i in range(16)]
    data = pack_examples(tokenize_examples(tokenizer, records, "prompt_completion"), 32)
    model = apply_lora(base(models_dir), {**LORA, "dropout": 0.1})
    if resume:
        perturb_adapter(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out),
            max_steps=4,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            use_cpu=True,
            report_to="none",
            save_strategy="steps",
            save_steps=2,
            disable_tqdm=True,
            seed=7,
            data_seed=7,
        ),
        train_dataset=PackedDataset(data),
        data_collator=PackedCollator("packed", tokenizer.pad_token_id or 0),
    )
    trainer.train(**resume)
    assert trainer.state.global_step == 4
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_lora_checkpoints_hold_the_adapter_and_resume_exactly(
    models_dir: Path, tmp_path: Path
) -> None:
    straight = _train(models_dir, tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # only the adapter, not the base
    resumed = _train(models_dir, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)
