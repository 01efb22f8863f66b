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

    # --- assets and the editing math -------------------------------------------------------------------------
    home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "editq",
        description="Cache root: converted models, second-moment statistics, editor states, weight versions.",
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
    algo: str = Field(default="alphaedit", description="Editing algorithm of the pipeline: memit or alphaedit.")

    # --- queue (Redis Streams) --------------------------------------------------------------------------------
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis holding streams and state.")
    namespace: str = Field(
        default="editq", description="Prefix of every Redis key, so several deployments (or tests) share a server."
    )
    stream_maxlen: int = Field(
        default=1_000_000, description="Approximate cap of the outcome and dead-letter streams (never the edit "
        "stream: trimming it on Redis 7.0 could drop entries that are still pending)."
    )
    max_deliveries: int = Field(
        default=5, ge=1, description="An edit stream entry delivered more often than this goes to the dead letters."
    )
    claim_idle_s: float = Field(
        default=60.0, gt=0, description="Pending entries idle longer than this are re-claimed by the janitor."
    )
    janitor_interval_s: float = Field(default=5.0, gt=0)

    # --- batching and dispatch --------------------------------------------------------------------------------
    batch_max_size: int = Field(default=50, ge=1, description="Most edits per weight update.")
    batch_max_wait_s: float = Field(
        default=2.0, ge=0, description="How long a partial batch waits for more edits before it is dispatched."
    )
    batch_retries: int = Field(default=2, ge=0, description="Retries of a failed batch before it is split.")
    retry_backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles per attempt.")
    n_edit_workers: int = Field(default=1, ge=1, description="Edit-worker actors; one per GPU in production.")
    worker_num_gpus: float = Field(default=0.0, ge=0, description="GPUs per edit worker (0 on CPU machines).")
    worker_num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per edit worker.")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description='Custom Ray resources per edit worker, e.g. {"edit": 1} to pin them to a '
        "KubeRay worker group (JSON in the environment).",
    )
    worker_call_timeout_s: float = Field(
        default=900.0, gt=0, description="A worker call slower than this counts as failed (hung worker)."
    )

    collapse_eval_every: int = Field(
        default=1, ge=1, description="Compute the model-level collapse metrics (canary perplexity, control facts, "
        "retention) every N versions; the per-matrix spectral metrics are computed for every version.",
    )

    # --- versioned weight store -------------------------------------------------------------------------------
    store_dir: Path | None = Field(
        default=None, description="Directory of the versioned weight store; defaults to home/versions/<namespace>."
    )

    # --- HTTP API ---------------------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000

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

    def resolved_store_dir(self) -> Path:
        return self.store_dir or self.home / "versions" / self.namespace


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once from the environment (tests build their own ``Settings`` instead)."""
    return Settings()
