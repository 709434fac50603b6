"""Packing examples into rows and collating rows into batches, without leaks between examples."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.conftest import TINY_MODEL
from worker.collate import PackedCollator, PackedDataset, collator_mode, packing_probe
from worker.masking import IGNORE_INDEX, TokenizedBatch, TokenizedExample, tokenize_examples
from worker.packing import OPEN_ROWS, PackedData, fill_rate, pack_examples, pack_text

M = IGNORE_INDEX


def example(length: int, trained_from: int = 1, first_id: int = 10) -> TokenizedExample:
    """Ids first_id.. of `length`, labels -100 before `trained_from`."""
    ids = list(range(first_id, first_id + length))
    return TokenizedExample(ids, [M] * trained_from + ids[trained_from:])


def rows(data: PackedData) -> list[dict[str, list[int]]]:
    return [{k: v.tolist() for k, v in data.row(i).items()} for i in range(len(data))]


def first_fit_one_by_one(
    examples: list[TokenizedExample], block_size: int, truncation: str, pack: bool
) -> list[list[tuple[list[int], list[int]]]]:
    """The packing rules applied one example at a time, as plainly as they read: rows of
    (input ids, labels) segments."""
    packed: list[list[tuple[list[int], list[int]]]] = []
    free: list[int] = []
    for ex in examples:
        if len(ex.input_ids) > block_size and truncation == "drop":
            continue
        ids, labels = ex.input_ids[:block_size], [M, *ex.labels[1:block_size]]
        if all(label == M for label in labels):
            continue
        newest = range(max(0, len(free) - OPEN_ROWS), len(free)) if pack else range(0)
        row = next((r for r in newest if free[r] >= len(ids)), None)
        if row is None:
            packed.append([])
            free.append(block_size)
            row = len(free) - 1
        packed[row].append((ids, labels))
        free[row] -= len(ids)
    return packed


def random_examples(rng: np.random.Generator, count: int, longest: int) -> list[TokenizedExample]:
    """Examples of 0 to `longest` tokens with random prompt lengths (some all prompt)."""
    examples = []
    for _ in range(count):
        ids = rng.integers(0, 1000, size=int(rng.integers(0, longest + 1))).tolist()
        prompt = int(rng.integers(0, len(ids) + 1))
        examples.append(TokenizedExample(ids, [M] * prompt + ids[prompt:]))
    return examples


class TestPackText:
    def test_concatenates_and_cuts_blocks_leaving_out_a_tail_that_predicts_nothing(self) -> None:
        examples = [example(5, 0, 0), example(4, 0, 100), example(4, 0, 200)]  # 13 tokens
        data = pack_text(examples, block_size=4)
        stream = [*range(5), *range(100, 104), *range(200, 204)]
        assert [row["input_ids"] for row in rows(data)] == [stream[0:4], stream[4:8], stream[8:12]]
        assert all(row["labels"] == row["input_ids"] for row in rows(data))
        assert all(row["position_ids"] == [0, 1, 2, 3] for row in rows(data))
        stats = data.stats
        assert (stats.examples, stats.rows, stats.tokens, stats.discarded_tokens) == (3, 3, 12, 1)
        assert stats.trainable_tokens == 3 * 3  # the first token of a block is never a target
        assert fill_rate(data, 4) == 1.0

    def test_the_tail_is_a_short_last_row(self) -> None:
        data = pack_text([example(6, 0, 0)], block_size=4)
        assert [row["input_ids"] for row in rows(data)] == [[0, 1, 2, 3], [4, 5]]
        stats = data.stats
        assert (stats.rows, stats.tokens, stats.trainable_tokens, stats.discarded_tokens) == (
            2,
            6,
            4,
            0,
        )


class TestPackExamples:
    def test_whole_examples_first_fit_with_restarting_positions(self) -> None:
        lengths = [6, 6, 3, 4]
        examples = [example(n, 2, 10 * (i + 1)) for i, n in enumerate(lengths)]
        data = pack_examples(examples, block_size=10)
        got = rows(data)
        # First fit: 6 opens row 0, 6 opens row 1, 3 joins row 0, 4 joins row 1.
        assert got[0]["input_ids"] == [*range(10, 16), *range(30, 33)]
        assert got[1]["input_ids"] == [*range(20, 26), *range(40, 44)]
        assert got[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
        assert got[1]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
        assert got[0]["labels"] == [M, M, 12, 13, 14, 15, M, M, 32]
        assert data.stats.as_dict() == {
            "examples": 4,
            "rows": 2,
            "tokens": 19,
            "trainable_tokens": 4 + 4 + 1 + 2,
            "truncated": 0,
            "dropped": 0,
            "untrained": 0,
            "discarded_tokens": 0,
        }

    def test_a_segments_first_label_is_never_trained(self) -> None:
        # Trained from token 0 (an empty prompt): in a row, token 0 would be predicted from
        # the end of the previous example, so its label is masked.
        data = pack_examples([example(3, 0, 10), example(3, 0, 20)], block_size=8)
        assert rows(data)[0]["labels"] == [M, 11, 12, M, 21, 22]

    def test_without_packing_each_example_is_a_row(self) -> None:
        data = pack_examples([example(3), example(2), example(4)], block_size=10, pack=False)
        assert [len(row["input_ids"]) for row in rows(data)] == [3, 2, 4]

    def test_truncate_cuts_and_counts(self) -> None:
        data = pack_examples([example(12, 2), example(3)], block_size=8, truncation="truncate")
        assert [len(row["input_ids"]) for row in rows(data)] == [8, 3]
        assert rows(data)[0]["labels"] == [M, M, *range(12, 18)]
        assert (data.stats.truncated, data.stats.dropped, data.stats.discarded_tokens) == (1, 0, 4)

    def test_drop_skips_and_counts(self) -> None:
        data = pack_examples([example(12), example(3)], block_size=8, truncation="drop")
        assert [row["input_ids"] for row in rows(data)] == [[10, 11, 12]]
        assert (data.stats.truncated, data.stats.dropped, data.stats.discarded_tokens) == (0, 1, 12)

    def test_an_example_left_with_nothing_to_train_is_counted(self) -> None:
        # The prompt alone fills the block: truncation leaves no trained token.
        data = pack_examples([example(12, trained_from=9), example(3)], block_size=8)
        assert data.stats.as_dict() == {
            "examples": 2,
            "rows": 1,
            "tokens": 3,
            "trainable_tokens": 2,
            "truncated": 1,
            "dropped": 0,
            "untrained": 1,
            "discarded_tokens": 12,
        }

    def test_every_token_is_packed_or_counted(self) -> None:
        rng = np.random.default_rng(0)
        examples = [example(int(n), 1) for n in rng.integers(2, 40, size=300)]
        for truncation in ("truncate", "drop"):
            data = pack_examples(examples, block_size=32, truncation=truncation)
            stats = data.stats
            assert stats.tokens + stats.discarded_tokens == sum(len(e.input_ids) for e in examples)
            assert np.diff(data.row_offsets).max() <= 32
            assert fill_rate(data, 32) > 0.9

    @pytest.mark.parametrize("truncation", ["truncate", "drop"])
    @pytest.mark.parametrize("pack", [True, False])
    def test_rows_are_the_rules_applied_one_example_at_a_time(
        self, truncation: str, pack: bool
    ) -> None:
        rng = np.random.default_rng(7)
        for block_size in (1, 5, 32):
            examples = random_examples(rng, 400, 2 * block_size)
            data = pack_examples(examples, block_size, truncation, pack=pack)
            want = first_fit_one_by_one(examples, block_size, truncation, pack)
            got = rows(data)
            assert [row["input_ids"] for row in got] == [
                [t for ids, _ in row for t in ids] for row in want
            ]
            assert [row["labels"] for row in got] == [
                [label for _, labels in row for label in labels] for row in want
            ]
            assert [row["position_ids"] for row in got] == [
                [p for ids, _ in row for p in range(len(ids))] for row in want
            ]
            assert data.stats.trainable_tokens == sum(
                label != M for row in want for _, labels in row for label in labels
            )

    def test_only_the_newest_open_rows_take_an_example(self) -> None:
        def rows_after_full_rows(full: int) -> int:
            # Row 0 keeps room for the last example until `full` newer rows push it out.
            examples = [example(5), *(example(10) for _ in range(full)), example(5)]
            return pack_examples(examples, block_size=10).stats.rows

        assert rows_after_full_rows(OPEN_ROWS - 1) == OPEN_ROWS  # the last joins row 0
        assert rows_after_full_rows(OPEN_ROWS) == OPEN_ROWS + 2  # row 0 is closed: a new row

    def test_a_batch_packs_as_its_examples_do_into_the_cached_dtypes(self) -> None:
        examples = random_examples(np.random.default_rng(3), 200, 40)
        from_batch = pack_examples(TokenizedBatch.of(examples), 32)
        from_lists = pack_examples(examples, 32)
        for name, dtype in [
            ("input_ids", np.int32),
            ("trained", np.bool_),
            ("row_offsets", np.int64),
            ("segment_offsets", np.int64),
        ]:
            np.testing.assert_array_equal(getattr(from_batch, name), getattr(from_lists, name))
            assert getattr(from_batch, name).dtype == dtype
        assert from_batch.stats == from_lists.stats

    def test_no_examples_make_no_rows(self) -> None:
        data = pack_examples([], block_size=8)
        assert (len(data), data.stats.tokens, len(data.segment_offsets)) == (0, 0, 1)

    def test_unknown_truncation_is_refused(self) -> None:
        with pytest.raises(ValueError):
            pack_examples([example(3)], block_size=8, truncation="wrap")


class TestCollator:
    def features(self) -> list[dict[str, np.ndarray]]:
        data = pack_examples([example(3, 1, 10), example(2, 1, 20), example(4, 1, 30)], 5)
        return [PackedDataset(data)[i] for i in range(len(PackedDataset(data)))]

    def test_packed_pads_rows_with_a_segment_of_their_own(self) -> None:
        batch = PackedCollator("packed", pad_token_id=0)(self.features())
        assert "attention_mask" not in batch  # it would switch off the segment mask
        assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
        assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
        assert batch["labels"].tolist() == [[M, 11, 12, M, 21], [M, 31, 32, 33, M]]

    def test_flatten_makes_one_row_with_sequence_boundaries(self) -> None:
        batch = PackedCollator("flatten", pad_token_id=0)(self.features())
        assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 33]]
        assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
        assert batch["labels"].tolist() == [[M, 11, 12, M, 21, M, 31, 32, 33]]
        assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]

    def test_padded_uses_an_attention_mask(self) -> None:
        data = pack_examples([example(3, 1, 10), example(2, 1, 20)], 5, pack=False)
        batch = PackedCollator("padded", 0)([PackedDataset(data)[i] for i in range(2)])
        assert batch["input_ids"].tolist() == [[10, 11, 12], [20, 21, 0]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
        assert batch["labels"].tolist() == [[M, 11, 12], [M, 21, M]]


# ---- No leaking between packed examples, on the tiny GPT-2 ----


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)


def load(models_dir: Path, attention: str = "sdpa") -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        models_dir / TINY_MODEL, attn_implementation=attention
    )
    model.config.use_cache = False  # as Trainer sets it (TrainingArguments.use_cache=False)
    return model.eval()


def chat_examples(tokenizer: PreTrainedTokenizerBase) -> list[TokenizedExample]:
    records = [
        {"prompt": "Question: what sat on the mat?", "completion": " The cat."},
        {"prompt": "Q: colour of the fox?", "completion": " brown"},
        {"prompt": "Apple Inc. released", "completion": " a new iPhone model yesterday."},
        {"prompt": "Google announced", "completion": " a new feature."},
        {"prompt": "the dog sat", "completion": " on the log."},
    ]
    return tokenize_examples(tokenizer, records, "prompt_completion")


def alone(model: PreTrainedModel, ex: TokenizedExample) -> tuple[torch.Tensor, float, int]:
    """Logits, summed target loss and target count of one example run by itself."""
    ids = torch.tensor([ex.input_ids])
    logits = model(input_ids=ids).logits[0]
    labels = torch.tensor(ex.labels[1:])
    loss = torch.nn.functional.cross_entropy(
        logits[:-1], labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return logits, float(loss), int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
@pytest.mark.parametrize("mode", ["packed", "flatten"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_see_only_themselves(
    models_dir: Path, tokenizer: PreTrainedTokenizerBase, mode: str, attention: str
) -> None:
    model = load(models_dir, attention)
    examples = chat_examples(tokenizer)
    data = pack_examples(examples, block_size=24)
    assert data.stats.rows < len(examples)  # several examples really share rows
    dataset = PackedDataset(data)
    batch = PackedCollator(mode, tokenizer.pad_token_id or 0)(
        [dataset[i] for i in range(len(dataset))]
    )
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    output = model(**batch)
    flat_logits = output.logits.reshape(-1, output.logits.shape[-1])
    flat_ids = batch["input_ids"].reshape(-1).tolist()
    total, count, cursor = 0.0, 0, 0
    for ex in examples:  # rows keep file order within a row; find each example in the batch
        n = len(ex.input_ids)
        while flat_ids[cursor : cursor + n] != ex.input_ids:
            cursor += 1
        logits, loss, targets = alone(model, ex)
        torch.testing.assert_close(flat_logits[cursor : cursor + n], logits, atol=1e-5, rtol=1e-5)
        total, count = total + loss, count + targets
        cursor = 0
    assert output.loss.item() == pytest.approx(total / count, rel=1e-5)


@torch.no_grad()
def test_padded_fallback_matches_each_example_alone(
    models_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = load(models_dir)
    examples = chat_examples(tokenizer)
    dataset = PackedDataset(pack_examples(examples, block_size=24, pack=False))
    batch = PackedCollator("padded", tokenizer.pad_token_id or 0)(
        [dataset[i] for i in range(len(dataset))]
    )
    output = model(**batch)
    total, count = 0.0, 0
    for row, ex in enumerate(examples):
        logits, loss, targets = alone(model, ex)
        torch.testing.assert_close(
            output.logits[row, : len(ex.input_ids)], logits, atol=1e-5, rtol=1e-5
        )
        total, count = total + loss, count + targets
    assert output.loss.item() == pytest.approx(total / count, rel=1e-5)


class TestCollatorMode:
    def test_gpt2_with_sdpa_or_eager_packs(self, models_dir: Path) -> None:
        for attention in ("sdpa", "eager"):
            model = load(models_dir, attention).train()
            assert collator_mode(model) == "packed"
            assert model.training  # the probe puts the mode back

    def test_attention_that_ignores_positions_falls_back_to_padding(self, models_dir: Path) -> None:
        def leaky(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
            return sdpa_attention_forward(module, query, key, value, None, **kwargs)

        AttentionInterface.register("tunery_test_leaky", leaky)
        model = load(models_dir)
        model.set_attn_implementation("tunery_test_leaky")
        assert not packing_probe(model)
        assert collator_mode(model) == "padded"


def test_trainer_trains_on_packed_rows_without_the_cache(
    models_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        models_dir / TINY_MODEL, attn_implementation="sdpa"
    )
    assert model.config.use_cache  # GPT-2's default: a cache would switch the segment mask off
    data = pack_examples(chat_examples(tokenizer) * 4, block_size=32)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=2,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=PackedDataset(data),
        data_collator=PackedCollator("packed", tokenizer.pad_token_id or 0),
    )
    assert model.config.use_cache is False  # Trainer turns it off: the segment mask applies
    result = trainer.train()
    assert np.isfinite(result.training_loss)
