"""Base models from the Hugging Face Hub, fetched in a child process.

A download of many GB takes minutes, and Python cannot stop a thread that is blocked in it. A
child process can be killed: a cancel, a lost claim or a worker shutdown stops the download at
once, not after it. The files it finished stay in the Hub cache for the next job; the partial
file of the one it was writing is removed by the sweeper once it is a day old.
"""

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

# What `from_pretrained` reads for a causal LM and its tokenizer at the top of the repository:
# configs (and the weights' index), vocabularies and templates; then the weights it names.
_DESCRIPTIONS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_SUBFOLDERS = ["*/*"]
_WEIGHTS, _WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
_WAIT_S = 0.5  # how often the parent asks whether to stop
# A download writes continuously: a partial file untouched for a day has no writer.
_ABANDONED_AFTER_S = 24 * 3600.0


class HubUnavailable(OSError):
    """Neither the Hub nor its cache could give the files: an OSError, as transformers raises
    for a model it cannot load."""


def fetch(repo_id: str, *, keep_going: Callable[[], None]) -> Path:
    """The local folder of `repo_id`'s files, from the Hub or the Hub cache. `keep_going` is
    called while the child works and stops the download by raising."""
    environment = os.environ | {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, "-m", "worker.hub", repo_id]
    # In a session of its own: a Ctrl-C meant for the worker must not end the download as a
    # failure before the worker has decided to hand the job back.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=environment,
        text=True,
        start_new_session=True,
    ) as child:
        try:
            while True:
                try:
                    answer, _ = child.communicate(timeout=_WAIT_S)
                    break
                except subprocess.TimeoutExpired:
                    keep_going()
        except BaseException:
            child.kill()
            raise
    lines = answer.strip().splitlines()
    if not lines:  # killed from outside (out of memory) before it could answer
        raise HubUnavailable(f"the download process exited with status {child.returncode}")
    outcome = json.loads(lines[-1])
    if "error" in outcome:
        raise HubUnavailable(outcome["error"])
    return Path(outcome["folder"])


def remove_abandoned_downloads() -> list[str]:
    """Delete the partial files that killed downloads left in the Hub cache (huggingface_hub
    removes its own on an error, not on a kill); returns their paths within the cache."""
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    now, removed = time.time(), []
    for partial in cache.glob("*/blobs/*.incomplete"):
        try:
            if now - partial.stat().st_mtime > _ABANDONED_AFTER_S:
                partial.unlink()
                removed.append(str(partial.relative_to(cache)))
        except FileNotFoundError:
            continue  # its download finished or failed meanwhile
    return removed


def _download(repo_id: str) -> dict[str, str]:
    """The descriptions first, then only the safetensors weights transformers loads (from the
    same commit): a repository may also hold them in another layout (Mistral's `consolidated`)
    or as pickles, which are never fetched."""
    try:
        folder = Path(
            snapshot_download(repo_id, allow_patterns=_DESCRIPTIONS, ignore_patterns=_SUBFOLDERS)
        )
        snapshot_download(
            repo_id,
            revision=folder.name,  # the snapshot folder is named after its commit
            allow_patterns=_weights(folder),
            ignore_patterns=_SUBFOLDERS,
        )
    except Exception as exc:  # unreachable, unknown id, gated
        return {"error": _explain(exc)}
    return {"folder": str(folder)}


def _explain(exc: Exception) -> str:
    """One line an operator can act on; huggingface_hub's own begins with the HTTP status and
    says the rest on later lines."""
    status = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if isinstance(exc, GatedRepoError):  # a kind of RepositoryNotFoundError: asked first
        return f"the repository is gated: the worker needs an HF_TOKEN with access ({status})"
    if isinstance(exc, RepositoryNotFoundError):
        return f"the Hub has no such repository, or it is private ({status})"
    if isinstance(exc, LocalEntryNotFoundError):
        return "the Hub cannot be reached (or HF_HUB_OFFLINE is set), and the model is not cached"
    return status or type(exc).__name__


def _weights(folder: Path) -> list[str]:
    """The files of the index's weight map, or the single file."""
    index = folder / _WEIGHTS_INDEX
    if not index.is_file():
        return [_WEIGHTS]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def _exit_when_orphaned(parent: int) -> None:
    """The child has a session of its own, so a worker killed with SIGKILL does not take it
    along: it stops once it is handed to another parent, not after many GB."""
    while os.getppid() == parent:
        time.sleep(_WAIT_S)
    os._exit(1)


if __name__ == "__main__":
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    print(json.dumps(_download(sys.argv[1])))
