"""Bring a database to the newest schema with the Alembic scripts in `migrations/`."""

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from shared.settings import get_settings


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url or get_settings().resolved_database_url)
    return config


def upgrade(url: str | None = None) -> None:
    settings = get_settings()
    target = url or settings.resolved_database_url
    if target.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(target), "head")
