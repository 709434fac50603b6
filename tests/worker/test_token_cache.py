"""The token cache: same inputs hit, any change misses, a half-written entry is never read, and
trimming removes deleted datasets' entries, then the least recently used."""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.settings import get_settings
from tests.conftest import TINY_MODEL
from worker import token_cache
from worker.masking import TokenizedExample, tokenize_examples
from worker.packing import PackedData, pack_examples
from worker.token_cache import cache_key, load, store, tokenizer_fingerprint

SHA = "ab" * 32


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture
def tokenizer(models_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)


@pytest.fixture
def data(tokenizer: PreTrainedTokenizerBase) -> PackedData:
    records = [{"prompt": f"Q{i}: the cat", "completion": f" sat {i}."} for i in range(9)]
    examples = tokenize_examples(tokenizer, records, "prompt_completion")
    too_long = TokenizedExample([1] * 40, [1] * 40)  # truncated, so the counts are not all 0
    return pack_examples([*examples, too_long], 16)


def key_for(tokenizer: PreTrainedTokenizerBase, **changes: Any) -> str:
    inputs: dict[str, Any] = {
        "dataset_sha256": SHA,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "shape": "prompt_completion",
        "block_size": 16,
        "options": {"truncation": "truncate", "pack": True, "split": "train", "seed": 42},
    }
    return cache_key(**(inputs | changes))


def assert_same(got: PackedData | None, want: PackedData) -> None:
    assert got is not None
    for name in ("input_ids", "trained", "row_offsets", "segment_offsets"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert getattr(got, name).dtype == getattr(want, name).dtype
    assert got.stats == want.stats
    assert [got.row(i)["labels"].tolist() for i in range(len(got))] == [
        want.row(i)["labels"].tolist() for i in range(len(want))
    ]


@pytest.mark.usefixtures("home")
class TestHitsAndMisses:
    def test_same_inputs_hit(self, tokenizer: PreTrainedTokenizerBase, data: PackedData) -> None:
        key = key_for(tokenizer)
        assert load(key) is None
        folder = store(key, data, [SHA])
        assert folder == get_settings().home.resolve() / "cache" / "tokens" / key
        assert_same(load(key), data)
        assert data.stats.truncated == 1  # the counts come back too

    def test_the_same_tokenizer_loaded_again_hits(
        self, tokenizer: PreTrainedTokenizerBase, models_dir: Path
    ) -> None:
        again = AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)
        assert key_for(again) == key_for(tokenizer)

    def test_a_changed_tokenizer_misses(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData, models_dir: Path
    ) -> None:
        store(key_for(tokenizer), data, [SHA])
        changed = [AutoTokenizer.from_pretrained(models_dir / TINY_MODEL) for _ in range(3)]
        changed[0].chat_template = "{{ messages[0]['content'] }}"
        changed[1].add_tokens(["<|new|>"])
        changed[2].add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
        keys = {key_for(t) for t in changed}
        assert len(keys) == 3 and key_for(tokenizer) not in keys
        assert all(load(key) is None for key in keys)

    @pytest.mark.parametrize(
        "change",
        [
            {"dataset_sha256": "cd" * 32},
            {"shape": "messages"},
            {"block_size": 32},
            {"options": {"truncation": "drop", "pack": True, "split": "train", "seed": 42}},
            {"options": {"truncation": "truncate", "pack": False, "split": "train", "seed": 42}},
            {"options": {"truncation": "truncate", "pack": True, "split": "eval", "seed": 42}},
            {"options": {"truncation": "truncate", "pack": True, "split": "train", "seed": 1}},
            {"options": {"truncation": "truncate", "pack": True, "split": "train"}},
        ],
    )
    def test_any_changed_option_misses(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData, change: dict[str, Any]
    ) -> None:
        store(key_for(tokenizer), data, [SHA])
        assert key_for(tokenizer, **change) != key_for(tokenizer)
        assert load(key_for(tokenizer, **change)) is None

    def test_a_new_cache_version_misses(
        self, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        before = key_for(tokenizer)
        monkeypatch.setattr(token_cache, "CACHE_VERSION", token_cache.CACHE_VERSION + 1)
        assert key_for(tokenizer) != before

    def test_storing_twice_keeps_one_entry(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData
    ) -> None:
        key = key_for(tokenizer)
        store(key, data, [SHA])
        store(key, data, [SHA])
        assert [p.name for p in token_cache.cache_root().iterdir()] == [key]
        assert_same(load(key), data)

    def test_keys_are_checked_before_they_become_paths(self) -> None:
        with pytest.raises(ValueError):
            load("../../etc")


@pytest.mark.usefixtures("home")
class TestWholeOrAbsent:
    def test_a_crash_while_writing_leaves_nothing_to_read(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        key = key_for(tokenizer)

        def crash_after_tokens(path: Path) -> None:
            raise OSError("disk pulled")

        monkeypatch.setattr(token_cache, "fsync_path", crash_after_tokens)  # after both files
        with pytest.raises(OSError):
            store(key, data, [SHA])
        assert load(key) is None
        assert not (token_cache.cache_root() / key).exists()

    def test_a_temporary_folder_is_never_read(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData
    ) -> None:
        # What a writer killed before its rename leaves behind.
        key = key_for(tokenizer)
        store(key, data, [SHA])
        root = token_cache.cache_root()
        (root / key).rename(root / f".tmp-{key}-dead")
        assert load(key) is None

    @pytest.mark.parametrize("damage", ["no_meta", "bad_tokens", "other_key"])
    def test_a_damaged_entry_is_a_miss_and_is_rebuilt(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData, damage: str
    ) -> None:
        key = key_for(tokenizer)
        folder = store(key, data, [SHA])
        if damage == "no_meta":
            (folder / "meta.json").unlink()
        elif damage == "bad_tokens":
            (folder / "tokens.safetensors").write_bytes(b"\x00" * 10)
        else:
            (folder / "meta.json").write_text('{"key": "' + "0" * 64 + '", "version": 1}')
        assert load(key) is None
        assert not folder.exists()  # moved away, so the next store can write it again
        store(key, data, [SHA])
        assert_same(load(key), data)


@pytest.mark.usefixtures("home")
class TestTrim:
    def test_entries_of_datasets_no_longer_live_are_removed(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData
    ) -> None:
        live, gone, validation = "ab" * 32, "cd" * 32, "ef" * 32
        kept = store(key_for(tokenizer), data, [live]).name
        alone = store(key_for(tokenizer, dataset_sha256=gone), data, [gone]).name
        # A job with a validation dataset: its entries hold both datasets' tokens.
        both = store(key_for(tokenizer, block_size=32), data, [live, validation]).name
        asked: list[set[str]] = []

        def still_live(sha256s: set[str]) -> set[str]:
            asked.append(sha256s)
            return sha256s & {live}

        assert sorted(token_cache.trim(still_live, max_bytes=10**9)) == sorted([alone, both])
        assert asked == [{live, gone, validation}]  # one question for the whole cache
        assert [entry.key for entry in token_cache.entries()] == [kept]
        assert_same(load(kept), data)

    def test_an_entry_that_does_not_name_its_datasets_is_removed(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData
    ) -> None:
        folder = store(key_for(tokenizer), data, [SHA])
        meta = json.loads((folder / "meta.json").read_text())
        del meta["datasets"]  # as written before entries named them
        (folder / "meta.json").write_text(json.dumps(meta))
        assert token_cache.trim(lambda sha256s: sha256s, max_bytes=10**9) == [folder.name]
        assert not folder.exists()

    def test_beyond_the_cap_the_least_recently_used_go_first(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData
    ) -> None:
        keys = [key_for(tokenizer, block_size=size) for size in (16, 32, 64)]
        for age, key in zip((300, 200, 100), keys, strict=True):
            folder = store(key, data, [SHA])
            os.utime(folder, (time.time() - age, time.time() - age))
        assert load(keys[0]) is not None  # the oldest, now used last
        size = {entry.key: entry.bytes for entry in token_cache.entries()}
        assert size[keys[0]] > 0

        def everything_live(sha256s: set[str]) -> set[str]:
            return sha256s

        assert token_cache.trim(everything_live, max_bytes=sum(size.values())) == []
        fits_two = size[keys[0]] + size[keys[2]]
        assert token_cache.trim(everything_live, max_bytes=fits_two) == [keys[1]]
        assert token_cache.trim(everything_live, max_bytes=0) == [keys[2], keys[0]]
        assert token_cache.entries() == []

    def test_an_empty_cache_asks_nothing(self) -> None:
        def no_database(sha256s: set[str]) -> set[str]:
            raise AssertionError("nothing to ask about")

        assert token_cache.trim(no_database, max_bytes=0) == []

    def test_a_writers_temporary_folder_is_not_an_entry(
        self, tokenizer: PreTrainedTokenizerBase, data: PackedData
    ) -> None:
        key = key_for(tokenizer)
        store(key, data, [SHA])
        root = token_cache.cache_root()
        (root / f".tmp-{key}-writing").mkdir()
        assert [entry.key for entry in token_cache.entries()] == [key]
        assert token_cache.trim(lambda sha256s: set(), max_bytes=0) == [key]
        assert (root / f".tmp-{key}-writing").is_dir()  # its writer renames it; old ones age out
