"""One place for configuration: every knob is an ``EDITQ_*`` environment variable (or a ``.env`` entry)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """Process-wide settings; construct with overrides in tests, read from the environment otherwise."""

    model_config = SettingsConfigDict(env_prefix="EDITQ_", env_file=".env", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "editq",
        description="Cache root: converted models, second-moment statistics, editor states.",
    )
    model_path: Path | None = Field(
        default=None, description="HF-format model directory; defaults to the fetched SmolLM2 under home."
    )
    encoder_path: Path | None = Field(
        default=None, description="Sentence-encoder directory; defaults to the fetched MiniLM under home."
    )
    device: str = Field(default="auto", description="'auto' picks cuda when available, else cpu.")
    torch_threads: int | None = Field(default=None, description="torch intra-op threads; None keeps torch's choice.")
    seed: int = 0
    hparams_path: Path | None = Field(
        default=None, description="JSON file overriding the editor hyperparameters chosen for the model."
    )

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def stats_dir(self) -> Path:
        return self.home / "stats"

    def resolved_model_path(self) -> Path:
        return self.model_path or self.models_dir / DEFAULT_MODEL_NAME

    def resolved_encoder_path(self) -> Path:
        return self.encoder_path or self.models_dir / DEFAULT_ENCODER_NAME


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once from the environment (tests build their own ``Settings`` instead)."""
    return Settings()
