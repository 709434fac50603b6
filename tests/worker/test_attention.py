"""Text blocks train with SDPA's causal flag, where that is exact, and the stock path is back
after training."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel

from tests.conftest import TINY_MODEL
from worker.attention import CAUSAL_SDPA, causal_attention
from worker.collate import PackedDataset
from worker.data import PackedBlocks
from worker.lora import apply_lora
from worker.masking import TokenizedExample
from worker.packing import pack_examples

BLOCK = 32


@pytest.fixture
def model(models_dir: Path) -> PreTrainedModel:
    folder = models_dir / TINY_MODEL
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    model.loss_type = "ForCausalLM"
    return model


@pytest.fixture
def blocks() -> PackedBlocks:
    ids = torch.randint(0, 500, (4, BLOCK), dtype=torch.int32, generator=torch.manual_seed(0))
    return PackedBlocks(ids)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_sdpa_calls(model: torch.nn.Module, ids: torch.Tensor) -> tuple[Any, list[dict]]:
    """The loss of one compiled forward as Trainer runs it (no cache), and the arguments SDPA
    got in its graph."""
    calls: list[dict] = []

    def backend(graph: torch.fx.GraphModule, _: Any) -> Any:
        for node in graph.graph.nodes:
            if "scaled_dot_product_attention" in str(node.target):
                calls.append(dict(node.kwargs))
        return graph.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    return loss, calls


def test_text_blocks_train_compiled_with_the_causal_flag_and_no_mask(
    model: PreTrainedModel, blocks: PackedBlocks
) -> None:
    ids = blocks.blocks.long()

    with causal_attention(model, blocks) as causal:
        assert causal is True
        assert model.config._attn_implementation == CAUSAL_SDPA
        _, calls = compiled_sdpa_calls(model, ids)

    assert len(calls) == model.config.n_layer
    assert all(call["attn_mask"] is None and call["is_causal"] is True for call in calls)
    assert model.config._attn_implementation == "sdpa"


def test_causal_attention_computes_what_the_masked_path_computes(
    model: PreTrainedModel, blocks: PackedBlocks
) -> None:
    model.eval()  # no dropout: the two runs must see the same function
    ids = blocks.blocks.long()
    masked_loss, masked_calls = compiled_sdpa_calls(model, ids)
    masked_loss.backward()
    masked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()

    with causal_attention(model, blocks):
        causal_loss, _ = compiled_sdpa_calls(model, ids)
        causal_loss.backward()

    # The premise: compiled, the stock path hands SDPA a materialised mask.
    assert all(call["attn_mask"] is not None for call in masked_calls)
    torch.testing.assert_close(causal_loss, masked_loss)
    for causal_grad, masked_grad in zip(
        (p.grad for p in model.parameters()), masked_grads, strict=True
    ):
        torch.testing.assert_close(causal_grad, masked_grad)


def test_the_probe_leaves_the_model_as_it_found_it(
    model: PreTrainedModel, blocks: PackedBlocks
) -> None:
    model.train()
    with pytest.raises(RuntimeError, match="stopped"), causal_attention(model, blocks):
        assert model.training
        raise RuntimeError("stopped")
    assert model.config._attn_implementation == "sdpa"
    assert model.training


def test_packed_rows_keep_their_masks(model: PreTrainedModel) -> None:
    # Rows of several examples need the mask that keeps the examples apart.
    packed = pack_examples([TokenizedExample([5, 6, 7], [5, 6, 7]), TokenizedExample([8], [8])], 8)
    with causal_attention(model, PackedDataset(packed)) as causal:
        assert causal is False
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("window", "expected"), [(BLOCK // 2, False), (2 * BLOCK, True)])
def test_a_sliding_window_shorter_than_the_block_keeps_its_mask(
    blocks: PackedBlocks, window: int, expected: bool
) -> None:
    config = MistralConfig(
        vocab_size=500,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4 * BLOCK,
        sliding_window=window,
    )
    mistral = MistralForCausalLM(config)
    mistral.set_attn_implementation("sdpa")

    with causal_attention(mistral, blocks) as causal:
        assert causal is expected
        assert mistral.config._attn_implementation == (CAUSAL_SDPA if expected else "sdpa")
    assert mistral.config._attn_implementation == "sdpa"


def test_a_lora_model_switches_and_switches_back(
    model: PreTrainedModel, blocks: PackedBlocks
) -> None:
    lora = apply_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None})
    with causal_attention(lora, blocks) as causal:
        assert causal is True
        assert model.config._attn_implementation == CAUSAL_SDPA
        _, calls = compiled_sdpa_calls(lora, blocks.blocks.long())
    assert calls and all(call["attn_mask"] is None for call in calls)
    assert model.config._attn_implementation == "sdpa"
