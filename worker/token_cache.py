"""A local disk cache of tokenized and packed data, so later jobs and resumed attempts skip it.

An entry lives in `TUNERY_HOME/cache/tokens/<key>/` (tokens.safetensors + meta.json). The key
is a sha256 over everything the packed data depends on: the dataset's sha256, a fingerprint of
the tokenizer's files, the shape, block_size, the masking/packing/split options the caller
passes, and `CACHE_VERSION` plus the default chat template (our code). A cache built with
another tokenizer or other options is therefore never found, rather than trusted.

Entries are whole or absent: written into a temporary sibling folder, flushed, then renamed into
place with `os.replace`; `load` only ever opens final names, and an entry it cannot read is moved
away and reported as a miss. Arrays are stored as safetensors (no pickle).

Token ids decode back to the text, so an entry is a copy of its datasets: each entry names the
datasets it was built from, and `trim` (run by the sweeper) removes the entries of deleted
datasets, then the least recently used ones beyond a size cap.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from transformers import PreTrainedTokenizerBase

from shared.settings import get_settings
from shared.storage import fsync_path
from worker.masking import DEFAULT_CHAT_TEMPLATE
from worker.packing import OPEN_ROWS, PackedData, PackStats

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump whenever masking or packing output changes for the same inputs
_TEMP_PREFIX = ".tmp-"
_STALE_TEMP_S = 24 * 3600
# tokenizer_config.json keys that say where a tokenizer was loaded from, not what it does.
_VOLATILE_CONFIG_KEYS = ("name_or_path", "is_local", "local_files_only", "_commit_hash")

Scalar = str | int | float | bool | None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's files as it saves them (tokenizer.json, tokenizer_config.json,
    special tokens, vocab/merges, chat template): the tokenizer in memory, edits included."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if not path.is_file():
                continue
            content = path.read_bytes()
            if path.name == "tokenizer_config.json":
                config = json.loads(content)
                for key in _VOLATILE_CONFIG_KEYS:
                    config.pop(key, None)
                content = json.dumps(config, sort_keys=True).encode()
            name = path.relative_to(folder).as_posix().encode()
            digest.update(hashlib.sha256(name).digest() + hashlib.sha256(content).digest())
    return digest.hexdigest()


def cache_key(
    *,
    dataset_sha256: str,
    tokenizer_hash: str,
    shape: str,
    block_size: int,
    options: Mapping[str, Scalar],
) -> str:
    """The entry name for packed data built from exactly these inputs.

    `options` holds everything else the data depends on, e.g. truncation, the collator's
    packing (`pack`), and the split (`split`: "train"/"eval", `validation_split`, `seed`).
    """
    material = {
        "version": CACHE_VERSION,
        "default_chat_template": DEFAULT_CHAT_TEMPLATE,
        "open_rows": OPEN_ROWS,
        "dataset_sha256": dataset_sha256,
        "tokenizer": tokenizer_hash,
        "shape": shape,
        "block_size": block_size,
        "options": dict(options),
    }
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def cache_root() -> Path:
    return (get_settings().home / "cache" / "tokens").resolve()


def _entry(key: str) -> Path:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key: {key!r}")
    return cache_root() / key


def load(key: str) -> PackedData | None:
    """The packed data stored under `key`, or None (absent, or unreadable and moved away)."""
    folder = _entry(key)
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            raise ValueError("meta.json does not match the key")
        arrays = load_file(str(folder / "tokens.safetensors"))
        data = PackedData(
            input_ids=arrays["input_ids"],
            trained=arrays["trained"].astype(bool),
            row_offsets=arrays["row_offsets"],
            segment_offsets=arrays["segment_offsets"],
            stats=PackStats(**meta["stats"]),
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        logger.warning("token cache entry %s is unreadable (%s); rebuilding it", key, exc)
        _discard(folder)
        return None
    with contextlib.suppress(OSError):  # the folder's mtime is its last use, for `trim`
        os.utime(folder)
    return data


def _discard(folder: Path) -> None:
    trash = folder.with_name(f"{_TEMP_PREFIX}{folder.name}-{uuid.uuid4().hex}")
    try:
        os.replace(folder, trash)
    except OSError:
        return  # someone else moved it already
    shutil.rmtree(trash, ignore_errors=True)


def _sweep_stale_temps(root: Path) -> None:
    """Temporary folders of writers that died long ago."""
    for path in root.glob(f"{_TEMP_PREFIX}*"):
        try:
            if time.time() - path.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def store(key: str, data: PackedData, datasets: Collection[str]) -> Path:
    """Write `data`, built from the datasets with these sha256s, under `key`, whole or not at all;
    an existing entry is kept as it is."""
    final = _entry(key)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(root)
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{key}-", dir=root))
    try:
        arrays = {
            "input_ids": np.ascontiguousarray(data.input_ids, dtype=np.int32),
            "trained": np.ascontiguousarray(data.trained, dtype=bool),
            "row_offsets": np.ascontiguousarray(data.row_offsets, dtype=np.int64),
            "segment_offsets": np.ascontiguousarray(data.segment_offsets, dtype=np.int64),
        }
        save_file(arrays, str(temp / "tokens.safetensors"))
        meta = {
            "key": key,
            "version": CACHE_VERSION,
            "datasets": sorted(set(datasets)),
            "stats": data.stats.as_dict(),
        }
        (temp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        for name in ("tokens.safetensors", "meta.json"):
            fsync_path(temp / name)
        try:
            os.replace(temp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another job stored the same key first: same inputs, same data; keep theirs.
        else:
            fsync_path(root)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


@dataclass(frozen=True)
class Entry:
    key: str
    datasets: frozenset[str]  # sha256s; empty when meta.json does not say (or cannot be read)
    bytes: int
    last_used: float


def entries() -> list[Entry]:
    """The entries now in the cache, temporary folders aside."""
    root = cache_root()
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith(_TEMP_PREFIX):
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text())
            datasets = frozenset(meta["datasets"])
        except (OSError, ValueError, KeyError, TypeError):
            datasets = frozenset()
        try:
            size = sum(path.stat().st_size for path in folder.iterdir())
            last_used = folder.stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        found.append(Entry(folder.name, datasets, size, last_used))
    return found


def trim(live: Callable[[set[str]], Collection[str]], max_bytes: int) -> list[str]:
    """Remove the entries built from a dataset that is no longer live, or that do not say which
    datasets they hold, then the least recently used ones until the rest fit in `max_bytes`.

    `live` is given every sha256 the entries name and returns those of datasets still live.
    Returns the keys removed. A job loading an entry while it goes either has read it whole or
    finds it missing and tokenizes again.
    """
    cached = entries()
    named = set().union(*(entry.datasets for entry in cached))
    alive = set(live(named)) if named else set()
    removed, kept = [], []
    for entry in cached:
        (kept if entry.datasets and entry.datasets <= alive else removed).append(entry)
    over = sum(entry.bytes for entry in kept) - max_bytes
    for entry in sorted(kept, key=lambda entry: entry.last_used):
        if over <= 0:
            break
        removed.append(entry)
        over -= entry.bytes
    for entry in removed:
        _discard(cache_root() / entry.key)
    return [entry.key for entry in removed]
