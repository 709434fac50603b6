"""Which base models a job may name: a folder in the models directory, or an allowed Hub id.

The API only reads `config.json`; loading the weights is the worker's business.
"""

import json
from pathlib import Path
from typing import Any

from shared.settings import Settings


def local_config(settings: Settings, name: str) -> dict[str, Any] | None:
    """The model's config.json if `name` is a folder of the models directory, else None."""
    models_dir = settings.resolved_models_dir
    candidate = (models_dir / name / "config.json").resolve()
    if not candidate.is_relative_to(models_dir) or not candidate.is_file():
        return None
    try:
        return json.loads(Path(candidate).read_text())
    except (OSError, ValueError):
        return None


def max_positions(config: dict[str, Any]) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
