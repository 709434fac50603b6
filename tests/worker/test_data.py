"""Reading, rendering, splitting and packing training data (no database needed)."""

import csv
import gc
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared import storage
from shared.ids import new_id
from shared.models import Dataset
from shared.settings import get_settings
from tests.conftest import TINY_MODEL
from worker.data import (
    count_examples,
    iter_examples,
    iter_records,
    prepare_data,
    steps_per_epoch,
    validation_mask,
)
from worker.errors import JobFailure


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Storage under a temporary home; these tests touch no database."""
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNERY_STORAGE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)


def stored(body: bytes, *, format: str = "text", shape: str = "text") -> Dataset:
    dataset = Dataset(id=new_id("ds"), filename="data", format=format, shape=shape)
    with storage.open_write(storage.dataset_key(dataset.id)) as stream:
        stream.write(body)
    return dataset


def csv_body(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def parquet_body(columns: dict[str, list[object]], **options: object) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out, **options)
    return out.getvalue()


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """What packing must produce: each example's ids followed by EOS, concatenated."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


@pytest.mark.usefixtures("home")
class TestReading:
    def test_text_is_one_example_per_non_blank_line(self) -> None:
        dataset = stored(b"\xef\xbb\xbffirst line\r\n\n   \nsecond  line \nthird")
        assert list(iter_examples(dataset)) == ["first line", "second  line ", "third"]

    def test_jsonl_records_come_as_uploaded(self) -> None:
        rows = [
            {"prompt": "Q: two plus two?", "completion": " A: four"},
            {"prompt": "Q: sky?", "completion": " A: blue"},
        ]
        body = "".join(json.dumps(row) + "\n" for row in rows).encode()
        dataset = stored(body, format="jsonl", shape="prompt_completion")
        assert list(iter_records(dataset)) == rows

        text = stored(b'{"text": "hello"}\n\n{"text": "world"}\n', format="jsonl")
        assert list(iter_examples(text)) == ["hello", "world"]

    def test_a_corrupt_file_is_a_user_error_naming_the_line(self) -> None:
        dataset = stored(b"good line\nbad \xff line\n")
        with pytest.raises(JobFailure) as caught:
            list(iter_examples(dataset))
        assert caught.value.code == "invalid_dataset" and caught.value.user_error
        assert "line 2" in caught.value.message

    def test_csv_rows_come_as_objects_of_their_columns(self) -> None:
        rows = [
            {"prompt": "Q: two plus two?", "completion": " A: four"},
            {"prompt": 'Q: a, b and\n"c"?', "completion": " 007"},
        ]
        body = csv_body(
            ["id", "prompt", "completion"], [["1", r["prompt"], r["completion"]] for r in rows]
        )
        dataset = stored(body, format="csv", shape="prompt_completion")
        assert list(iter_records(dataset)) == rows
        assert count_examples(dataset) == 2

        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        messages = stored(
            csv_body(["messages"], [[json.dumps(chat)]]), format="csv", shape="messages"
        )
        assert list(iter_records(messages)) == [{"messages": chat}]

    def test_parquet_rows_come_as_objects_of_their_columns(self) -> None:
        texts = [f"example {n}" for n in range(7)]
        dataset = stored(
            parquet_body({"text": texts, "n": list(range(7))}, row_group_size=3), format="parquet"
        )
        assert list(iter_examples(dataset)) == texts
        assert count_examples(dataset) == 7

        chat = [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "ok"}]
        messages = stored(
            parquet_body({"messages": [chat, chat]}), format="parquet", shape="messages"
        )
        assert list(iter_records(messages)) == [{"messages": chat}] * 2

    def test_a_corrupt_table_is_a_user_error_naming_the_row(self) -> None:
        dataset = stored(
            csv_body(["text"], [["fine"], ["also fine"]]) + b"bad \xff\n", format="csv"
        )
        with pytest.raises(JobFailure) as caught:
            list(iter_examples(dataset))
        assert caught.value.code == "invalid_dataset" and caught.value.user_error
        assert "row 3" in caught.value.message
        nulls = stored(parquet_body({"text": ["a", None]}), format="parquet")
        with pytest.raises(JobFailure, match='row 2: field "text" must be a string, got null'):
            list(iter_records(nulls))

    def test_a_missing_file_is_not_the_callers_fault(self) -> None:
        dataset = Dataset(id=new_id("ds"), filename="gone", format="text", shape="text")
        with pytest.raises(JobFailure) as caught:
            list(iter_examples(dataset))
        assert caught.value.code == "dataset_unavailable" and not caught.value.user_error


@pytest.mark.usefixtures("home")
class TestPacking:
    def test_examples_end_with_eos_and_the_tail_is_a_padded_last_block(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        texts = [f"line number {i} of the text" for i in range(31)]
        dataset = stored(("\n".join(texts) + "\n").encode())

        data = prepare_data(tokenizer, dataset, None, 0.0, block_size=16, seed=1)

        expected = encode(tokenizer, texts)
        tail = len(expected) % 16
        assert tail >= 2, "pick texts whose tail has something to predict"
        assert len(data.train) == len(expected) // 16 + 1
        assert data.train.tokens == data.train_stats.tokens == len(expected)  # none dropped
        assert data.train.blocks.flatten().tolist()[: len(expected)] == expected
        assert data.eval is None and data.eval_examples == 0
        item = data.train[0]
        assert item["input_ids"].tolist() == item["labels"].tolist() == expected[:16]
        last = data.train[len(data.train) - 1]
        assert (
            last["input_ids"][:tail].tolist()
            == last["labels"][:tail].tolist()
            == (expected[-tail:])
        )
        assert last["labels"][tail:].tolist() == [-100] * (16 - tail)  # the padding

    def test_the_split_holds_out_whole_examples_chosen_by_the_seed(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        texts = [f"example {i} says {'ab' * (i % 5)}" for i in range(100)]
        dataset = stored(("\n".join(texts) + "\n").encode())

        data = prepare_data(tokenizer, dataset, None, 0.2, block_size=8, seed=3)

        mask = validation_mask(100, 0.2, 3)
        assert sum(mask) == 20 == data.eval_examples and data.train_examples == 80
        held_out = [text for text, out in zip(texts, mask, strict=True) if out]
        kept = [text for text, out in zip(texts, mask, strict=True) if not out]
        # Each split is its own examples' tokens only: no block mixes train and eval.
        train_ids, eval_ids = encode(tokenizer, kept), encode(tokenizer, held_out)
        assert data.train.blocks.flatten().tolist()[: data.train.tokens] == train_ids
        assert data.eval is not None
        assert data.eval.blocks.flatten().tolist()[: data.eval.tokens] == eval_ids

    def test_the_split_is_deterministic_per_seed(self) -> None:
        assert validation_mask(1000, 0.1, 42) == validation_mask(1000, 0.1, 42)
        assert validation_mask(1000, 0.1, 42) != validation_mask(1000, 0.1, 43)
        assert sum(validation_mask(3, 0.01, 0)) == 1  # at least one example held out
        assert sum(validation_mask(2, 0.5, 0)) == 1  # never all of them
        assert sum(validation_mask(10, 0.0, 0)) == 0

    def test_a_validation_dataset_is_the_eval_set_whole(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        train = stored(("the cat sat on the mat\n" * 20).encode())
        held_out = stored(("a dog ran in the park today\n" * 10).encode())

        data = prepare_data(tokenizer, train, held_out, 0.3, block_size=8, seed=0)

        assert data.train_examples == 20 and data.eval_examples == 10
        expected = encode(tokenizer, ["a dog ran in the park today"] * 10)
        assert data.eval is not None
        assert data.eval.blocks.flatten().tolist()[: data.eval.tokens] == expected

    def test_a_validation_set_shorter_than_a_block_is_one_short_block(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        train = stored(("the cat sat on the mat\n" * 40).encode())
        held_out = stored(b"short\n")

        data = prepare_data(tokenizer, train, held_out, 0.0, block_size=32, seed=0)

        assert data.eval is not None and data.eval_is_short_block
        short = encode(tokenizer, ["short"])
        assert len(data.eval) == 1 and data.eval.tokens == len(short)
        assert data.eval[0]["labels"].tolist() == short + [-100] * (32 - len(short))

    def test_prompt_completion_rows_train_only_completions(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        rows = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(12)]
        body = "".join(json.dumps(row) + "\n" for row in rows).encode()
        dataset = stored(body, format="jsonl", shape="prompt_completion")

        data = prepare_data(tokenizer, dataset, None, 0.0, block_size=32, seed=0)

        trained: list[int] = []
        for index in range(len(data.train)):
            row = data.train[index]
            trained += [
                int(t)
                for t, label in zip(row["input_ids"], row["labels"], strict=True)
                if label != -100
            ]
        eos = tokenizer.eos_token_id
        # Every completion and its EOS is trained, except a packed example's first token;
        # no prompt token ever is.
        completions = [
            tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eos] for r in rows
        ]
        assert sorted(trained) == sorted(t for ids in completions for t in ids)
        assert data.train_stats.examples == 12 and data.train_stats.truncated == 0

    @pytest.mark.parametrize("format", ["csv", "parquet"])
    def test_a_table_trains_as_its_jsonl_twin(
        self, tokenizer: PreTrainedTokenizerBase, format: str
    ) -> None:
        """A job reads a stored CSV or Parquet file into the same rows, split and packed the
        same, as the JSONL file of the same examples."""
        rows = [{"prompt": f"question {i}, ok?", "completion": f" answer {i}."} for i in range(30)]
        jsonl = stored(
            "".join(json.dumps(row) + "\n" for row in rows).encode(),
            format="jsonl",
            shape="prompt_completion",
        )
        if format == "csv":
            body = csv_body(
                ["prompt", "completion"], [[r["prompt"], r["completion"]] for r in rows]
            )
        else:
            body = parquet_body(
                {
                    "completion": [r["completion"] for r in rows],
                    "prompt": [r["prompt"] for r in rows],
                },
                row_group_size=7,
            )
        table = stored(body, format=format, shape="prompt_completion")

        expected = prepare_data(tokenizer, jsonl, None, 0.2, block_size=32, seed=5)
        data = prepare_data(tokenizer, table, None, 0.2, block_size=32, seed=5)

        assert (data.train_examples, data.eval_examples) == (24, 6)
        assert data.train_stats == expected.train_stats
        assert data.eval_stats == expected.eval_stats
        for index in range(len(expected.train)):
            for key, values in expected.train[index].items():
                assert data.train[index][key].tolist() == values.tolist()

    def test_the_cache_serves_a_second_preparation(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        dataset = stored(("the cat sat on the mat\n" * 40).encode())
        first = prepare_data(tokenizer, dataset, None, 0.1, block_size=8, seed=0, use_cache=True)
        again = prepare_data(tokenizer, dataset, None, 0.1, block_size=8, seed=0, use_cache=True)
        other = prepare_data(tokenizer, dataset, None, 0.1, block_size=16, seed=0, use_cache=True)
        assert (first.cache_hit, again.cache_hit, other.cache_hit) == (False, True, False)
        assert again.train.blocks.tolist() == first.train.blocks.tolist()
        assert again.train_stats == first.train_stats

    def test_less_data_than_one_block_trains_as_one_short_block(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        dataset = stored(b"hi\nthere\n")

        data = prepare_data(tokenizer, dataset, None, 0.0, block_size=64, seed=0)

        assert len(data.train) == 1 and data.train.tokens == len(encode(tokenizer, ["hi", "there"]))

    def test_no_example_left_to_train_is_a_user_error(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        rows = [{"prompt": "question " * 20, "completion": "answer " * 20} for _ in range(4)]
        body = "".join(json.dumps(row) + "\n" for row in rows).encode()
        dataset = stored(body, format="jsonl", shape="prompt_completion")
        with pytest.raises(JobFailure) as caught:
            prepare_data(tokenizer, dataset, None, 0.0, block_size=8, seed=0, truncation="drop")
        assert caught.value.code == "dataset_too_small" and caught.value.user_error
        assert gc.isenabled()  # preparing pauses the cyclic collector; a failure restarts it


def test_steps_per_epoch_counts_optimizer_steps() -> None:
    assert steps_per_epoch(blocks=100, batch_size=8, accumulation=1) == 13
    assert steps_per_epoch(blocks=100, batch_size=8, accumulation=4) == 3
    assert steps_per_epoch(blocks=3, batch_size=8, accumulation=4) == 1
