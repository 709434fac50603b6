"""Every setting of Tunery, read from `TUNERY_*` environment variables."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GIB = 1024**3


class Settings(BaseSettings):
    """With nothing set, everything lives under `home`: SQLite, stored files and a local queue."""

    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    home: Path = Field(default=Path(".tunery"), description="Root of the embedded defaults.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file under home."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://...); default: a local filesystem queue."
    )
    storage_url: str | None = Field(
        default=None, description="Where datasets and artifacts are stored (file:// or a path)."
    )
    models_dir: Path | None = Field(
        default=None, description="Local base models, one folder each; default: home/models."
    )
    allowed_base_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hugging Face Hub ids that jobs may use, comma-separated."
    )
    max_dataset_bytes: int = Field(default=GIB, gt=0)
    heartbeat_timeout_s: float = Field(default=60, gt=0)
    checkpoint_interval_s: float = Field(default=600, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    requeue_unclaimed_after_s: float = Field(
        default=300, gt=0, description="Send the doorbell again for a job queued this long."
    )
    sweep_interval_s: float = Field(default=10, gt=0, description="How often the sweeper looks.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto",
        description="Where a worker trains: `auto` (the GPU if torch can use one; a worker on a "
        "host whose GPU torch cannot use refuses to start), `cuda` (refuse to start without "
        "one) or `cpu`.",
    )
    token_cache_max_bytes: int = Field(
        default=20 * GIB,
        ge=0,
        description="The sweeper trims each worker's token cache to this size, least recently "
        "used entries first.",
    )
    dry_run_wait_s: float = Field(
        default=30, ge=0, description="How long POST /jobs waits for a dry run's answer."
    )
    broker_visibility_timeout_s: float = Field(
        default=3600,
        gt=0,
        description="Redis redelivers a task not acknowledged this long (the claim makes a "
        "redelivery harmless; tests lower it to prove so).",
    )
    database_retry_s: float = Field(
        default=300,
        gt=0,
        description="How long the worker retries a write it cannot skip (a stage event, the "
        "end of a job) while the database is unreachable.",
    )

    @field_validator("allowed_base_models", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'tunery.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def queue_dir(self) -> Path:
        """Folder of the local filesystem queue, used when no broker URL is set."""
        return (self.home / "queue").resolve()

    @property
    def storage_root(self) -> Path:
        url = self.storage_url
        if not url:
            return (self.home / "storage").resolve()
        return Path(url.removeprefix("file://")).resolve()

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.home / "models").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
