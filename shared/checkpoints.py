"""Checkpoints in storage: written whole, listed, verified, pruned, deleted.

A checkpoint is a folder `checkpoints/<job>/step-<N>/` holding whatever the trainer saved
(weights, optimizer, scheduler, RNG states, trainer state) and `checkpoint.json`, written last:
its step, metrics and the size and sha256 of every other file. The folder is filled under a
hidden temporary name and renamed into place (`storage.open_dir_write`), so a writer killed at
any instruction leaves no `step-<N>` folder at all; the manifest is the second line of defence
(a torn copy, a disk that lied about a sync, a hand edit): a folder whose files do not match it
is never used. Nothing here imports torch: the API lists checkpoints with it too.
"""

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from shared import storage
from shared.models import utcnow

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
KEEP = 2  # the newest two: if the newest turns out unreadable, the one before still is
_CHUNK = 1024 * 1024


class CorruptCheckpoint(Exception):
    """A checkpoint folder whose files do not match its manifest."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    created_at: datetime
    metrics: dict[str, Any]
    manifest: dict[str, Any]


def _hashed(reader: BinaryIO, write: Callable[[bytes], object] | None = None) -> dict[str, Any]:
    """The size and sha256 of what is left in `reader`; each chunk also goes to `write`."""
    digest = hashlib.sha256()
    size = 0
    while chunk := reader.read(_CHUNK):
        digest.update(chunk)
        if write is not None:
            write(chunk)
        size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _copy_hashing(source: Path, target: Path) -> dict[str, Any]:
    with open(source, "rb") as reader, open(target, "wb") as writer:
        facts = _hashed(reader, writer.write)
        writer.flush()
        os.fsync(writer.fileno())
    return facts


def _move_hashing(source: Path, target: Path) -> dict[str, Any]:
    """Rename `source` to `target` (one filesystem), hashed and flushed to disk first."""
    with open(source, "rb") as reader:
        facts = _hashed(reader)
        os.fsync(reader.fileno())
    os.replace(source, target)
    return facts


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write(
    job_id: str,
    step: int,
    source: Path,
    info: dict[str, Any],
    *,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """Move the files of the folder `source` into storage as the checkpoint of `step`, whole or
    not at all; the caller deletes what is left of `source`.

    Where `source` and storage share a filesystem the files are renamed, not copied: a
    checkpoint (weights and optimizer state, three times the model's size in fp32) is then
    written once, the training loop waits less, and the disk never holds it twice.

    `info` (metrics and whatever resume needs) goes into the manifest. `before_commit` runs
    just before the rename and may raise to abandon the write (a worker that lost its claim).
    An OSError (ENOSPC on a full disk) leaves every earlier checkpoint as it was.
    """
    with storage.open_dir_write(storage.checkpoint_key(job_id, step)) as partial:
        same_filesystem = source.stat().st_dev == partial.stat().st_dev
        store_file = _move_hashing if same_filesystem else _copy_hashing
        files: dict[str, Any] = {}
        for file in _files_under(source):
            relative = file.relative_to(source)
            (partial / relative).parent.mkdir(parents=True, exist_ok=True)
            files[relative.as_posix()] = store_file(file, partial / relative)
        manifest = {
            "step": step,
            "created_at": utcnow().isoformat().replace("+00:00", "Z"),
            **info,
            "files": files,
        }
        # The manifest last: a folder with a manifest had every file written before it.
        with open(partial / MANIFEST, "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        if before_commit is not None:
            before_commit()


def _read_manifest(folder: Path, step: int) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorruptCheckpoint(f"step {step}: no readable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("step") != step:
        raise CorruptCheckpoint(f"step {step}: the manifest names another step")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpoint(f"step {step}: the manifest lists no files")
    for name, facts in files.items():
        file = folder / name
        if not file.resolve().is_relative_to(folder.resolve()):
            raise CorruptCheckpoint(f"step {step}: {name} is outside the checkpoint")
        try:
            actual = file.stat().st_size
        except OSError:
            raise CorruptCheckpoint(f"step {step}: {name} is missing") from None
        if actual != facts.get("bytes"):
            raise CorruptCheckpoint(f"step {step}: {name} has {actual} bytes, not {facts['bytes']}")
    return manifest


def _checkpoint(manifest: dict[str, Any]) -> Checkpoint:
    created = datetime.fromisoformat(str(manifest["created_at"]).replace("Z", "+00:00"))
    return Checkpoint(
        step=int(manifest["step"]),
        created_at=created,
        metrics=dict(manifest.get("metrics") or {}),
        manifest=manifest,
    )


def _steps(job_id: str) -> list[int]:
    names = storage.list_dir(storage.checkpoints_key(job_id))
    steps = [storage.checkpoint_step(name) for name in names]
    return sorted((step for step in steps if step is not None), reverse=True)


def list_complete(job_id: str) -> list[Checkpoint]:
    """The job's checkpoints whose manifest and file sizes check out, newest first.

    Sizes only: cheap enough for the API. `copy_out` checks every byte before a resume.
    """
    found = []
    for step in _steps(job_id):
        folder = storage.path(storage.checkpoint_key(job_id, step))
        try:
            found.append(_checkpoint(_read_manifest(folder, step)))
        except (CorruptCheckpoint, KeyError, ValueError) as error:
            logger.warning("job %s: checkpoint skipped: %s", job_id, error)
    return found


def copy_out(job_id: str, step: int, target: Path) -> Checkpoint:
    """Copy the checkpoint of `step` to the local folder `target`, checking every file's sha256
    against the manifest on the way; raises CorruptCheckpoint (and leaves no `target`)."""
    folder = storage.path(storage.checkpoint_key(job_id, step))
    manifest = _read_manifest(folder, step)
    target.mkdir(parents=True)
    try:
        for name, facts in manifest["files"].items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            copied = _copy_hashing(folder / name, target / name)
            if copied != {"bytes": facts["bytes"], "sha256": facts["sha256"]}:
                raise CorruptCheckpoint(f"step {step}: {name} does not match its manifest")
        return _checkpoint(manifest)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def verify(job_id: str, step: int) -> Checkpoint:
    """Read every byte of the checkpoint of `step` and check it against the manifest."""
    folder = storage.path(storage.checkpoint_key(job_id, step))
    manifest = _read_manifest(folder, step)
    for name, facts in manifest["files"].items():
        with open(folder / name, "rb") as stream:
            sha256 = _hashed(stream)["sha256"]
        if sha256 != facts["sha256"]:
            raise CorruptCheckpoint(f"step {step}: {name} does not match its manifest")
    return _checkpoint(manifest)


def prune(job_id: str, keep: int = KEEP) -> None:
    """Keep the newest `keep` complete checkpoints; delete older and broken ones."""
    complete = {checkpoint.step for checkpoint in list_complete(job_id)[:keep]}
    for step in _steps(job_id):
        if step not in complete:
            storage.delete(storage.checkpoint_key(job_id, step))


def delete_all(job_id: str) -> None:
    storage.delete(storage.checkpoints_key(job_id))
