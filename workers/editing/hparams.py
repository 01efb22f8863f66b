"""Editor hyperparameters: one dataclass, defaults chosen per model shape by a recorded sweep."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

Algo = Literal["memit", "alphaedit", "alphaedit_plus", "alphaedit_hybrid", "ultraedit"]
ALGOS: tuple[str, ...] = ("memit", "alphaedit", "alphaedit_plus", "alphaedit_hybrid", "ultraedit")
# Algorithms that optimise target values v* and read keys at the subject (UltraEdit needs neither); they all read
# the second moments C, so ``editq stats`` prepares them.
V_STAR_ALGOS: tuple[str, ...] = ("memit", "alphaedit", "alphaedit_plus", "alphaedit_hybrid")
# Algorithms that restrict the update to the null space of C (AlphaEdit's projector).
NULL_SPACE_ALGOS: tuple[str, ...] = ("alphaedit", "alphaedit_plus", "alphaedit_hybrid")
GUARDS: tuple[str, ...] = ("none", "revive")
V_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
V_EARLY_STOPS: tuple[str, ...] = ("nll", "mpes", "either")
_TUNED_FILE = Path(__file__).with_name("tuned_hparams.json")


@dataclass(frozen=True)
class EditHParams:
    """Settings of the locate-then-edit family (MEMIT, AlphaEdit, AlphaEdit+, AlphaEdit-hybrid) and of the guards.

    Published values are for GPT-J/Llama3-8B; ``tuned_hparams.json`` records what the sweep chose for other
    model shapes (see ``benchmarks/sweeps/``).
    """

    algo: Algo = "alphaedit"
    layers: tuple[int, ...] = (4, 5, 6, 7, 8)
    # v* optimisation (MEMIT compute_z).
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 5e-2
    v_max_batch_tokens: int = 8192
    # Cost levers of v* (workers/editing/values.py), each measured on/off in benchmarks/edit_compute.py.
    # Prefix cache: layers up to the edited one and positions before the subject computed once per batch.
    v_prefix_cache: bool = True
    # "bfloat16": each step's forward/backward under bf16 autocast (offset, Adam and losses stay float32); "auto":
    # bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AMX or AVX512-BF16), else float32.
    v_dtype: str = "auto"
    # When an edit stops: "nll" (mean target NLL < v_early_stop_loss, MEMIT), "mpes" (every target token is the most
    # probable one in every context by more than v_early_stop_margin nats, ENCORE), or "either".
    v_early_stop: str = "nll"
    v_early_stop_margin: float = 0.0
    # Key reads resume from the residual stream cached at the previously read layer (False: each read starts over).
    keys_resume: bool = True
    # Context templates: "{}" plus self-generated prefixes, sampled once per editor state with ``seed``.
    n_context_templates: int = 5
    context_template_tokens: int = 10
    seed: int = 0
    # MEMIT: weight lambda of the preserved-key second moment. AlphaEdit-hybrid (workers/editing/hybrid.py) uses the
    # same lambda C penalty, but only inside AlphaEdit's null space (plus AlphaEdit's l2 there).
    mom2_update_weight: float = 15000.0
    # AlphaEdit: null space = directions of E[kk^T] outside the top subspace holding this share of key energy.
    # Relative, because the published absolute threshold (2e-2) does not transfer between models.
    nullspace_energy: float = 0.8
    l2: float = 10.0
    solve_dtype: str = "float64"
    # AlphaEdit+ (workers/editing/alphaedit_plus.py). Each relaxation switches off on its own; all off = AlphaEdit.
    # Relaxed projector: add preserved eigen-directions of C (lowest eigenvalue first, ``aplus_search_step`` at a
    # time, at most ``aplus_search_max``) while the objective drops by more than eps per direction; None: off.
    aplus_search_eps: float | None = 1e-3
    aplus_search_step: int = 10
    aplus_search_max: int = 100
    # Penalty on previously edited keys: weight * (i + 1 if layer_scaled) * K_p diag(lambda) K_p^T, lambda the
    # conflict weights 1 - max |cos| to the new keys (all 1 when aplus_conflict is off).
    aplus_prev_weight: float = 1.0
    aplus_prev_layer_scaled: bool = False
    aplus_conflict: bool = True
    # Value smoothing: edits whose residual norm exceeds tau get T + 1 candidate steps (1/2 ... 1 of the residual);
    # the smallest step with the best efficacy on the batch's own prompts is kept. None: off. tau is absolute in
    # the residual stream's units (the reference uses 30 on GPT-J); 60 is about SmolLM2's median ||v1 - v0||.
    aplus_smooth_tau: float | None = 60.0
    aplus_smooth_steps: int = 10
    # UltraEdit (workers/editing/ultraedit.py): step size of the pseudo-targets (the reference uses 1e-6 on 7B
    # models), ridge of the least-squares fit, and whether keys/gradients are read under the context templates too
    # (the reference reads the plain prompt only).
    ultra_lr: float = 1e-6
    ultra_ridge: float = 1.0
    ultra_templates: bool = False
    # Collapse guards (workers/guards/). REVIVE filters each update out of the dominant singular subspace of the
    # pretrained matrix (chosen by energy share of sigma^2, or by rank when revive_rank is set); PRUNE caps the
    # singular values of the accumulated update W - W0 above max sigma(W0) with a log_alpha restraint.
    # Off by default: on SmolLM2 (benchmarks/README.md) REVIVE trades edit efficacy for perplexity monotonically in
    # the energy share; 0.5 was the best trade-off measured (MEMIT, 2000 edits: perplexity 23.4 instead of 28.1,
    # efficacy 0.91 instead of 0.95); 0.95 protects the model but makes edits fail (efficacy 0.40).
    guard: str = "none"
    revive_energy: float = 0.5
    revive_rank: int | None = None
    # "random": a control, not a guard: protect a random orthonormal subspace of the same rank instead of the
    # dominant one (does the dominant subspace matter, or is REVIVE only a dial on the update size?).
    revive_subspace: str = "dominant"
    prune: bool = False
    prune_alpha: float = 2.718281828459045
    # A guarded batch whose post-guard efficacy on its own prompts is below this is rejected (collapse_risk). Batch
    # efficacies measured with the guard on: >= 0.64 for energy <= 0.8, mean 0.40 at 0.95 (where edits fail).
    guard_min_efficacy: float = 0.5
    # Norm cap (workers/guards/norm_cap.py): per layer, ||W - W0||_F / ||W0||_F may not exceed this; an update that
    # would cross it is scaled down so the drift lands on the cap (an update that does not grow the drift passes).
    # None: off. Like the other guards, a capped batch whose own edits no longer take is rejected.
    norm_cap: float | None = None
    # Second-moment statistics corpus: self-sampled text (texts x tokens) unless a corpus file is given.
    stats_texts: int = 512
    stats_text_tokens: int = 128
    stats_max_len: int = 1024

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be a non-empty ascending list without repeats, got {self.layers}")
        if not 0.0 < self.nullspace_energy < 1.0:
            raise ValueError("nullspace_energy must be in (0, 1)")
        if self.ultra_lr <= 0 or self.ultra_ridge <= 0:
            raise ValueError("ultra_lr and ultra_ridge must be > 0")
        if self.v_dtype not in V_DTYPES:
            raise ValueError(f"v_dtype must be one of {V_DTYPES}, got {self.v_dtype!r}")
        if self.v_early_stop not in V_EARLY_STOPS:
            raise ValueError(f"v_early_stop must be one of {V_EARLY_STOPS}, got {self.v_early_stop!r}")
        if self.guard not in GUARDS:
            raise ValueError(f"guard must be one of {GUARDS}, got {self.guard!r}")
        if not 0.0 < self.revive_energy < 1.0:
            raise ValueError("revive_energy must be in (0, 1)")
        if self.revive_rank is not None and self.revive_rank < 0:
            raise ValueError("revive_rank must be >= 0")
        if self.revive_subspace not in ("dominant", "random"):
            raise ValueError("revive_subspace must be dominant or random")
        if self.prune_alpha <= 1.0:
            raise ValueError("prune_alpha (the log base) must be > 1")
        if not 0.0 <= self.guard_min_efficacy <= 1.0:
            raise ValueError("guard_min_efficacy must be in [0, 1]")
        if self.norm_cap is not None and not self.norm_cap > 0.0:
            raise ValueError("norm_cap must be > 0 (or None: off)")
        if self.algo == "alphaedit_hybrid" and (self.l2 <= 0.0 or self.mom2_update_weight < 0.0):
            raise ValueError("alphaedit_hybrid needs l2 > 0 (singular system otherwise), mom2_update_weight >= 0")
        if self.aplus_search_step < 1 or self.aplus_smooth_steps < 1:
            raise ValueError("aplus_search_step and aplus_smooth_steps must be >= 1")

    def with_overrides(self, **overrides: Any) -> EditHParams:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown hyperparameters: {sorted(unknown)}")
        if "layers" in overrides:
            overrides["layers"] = tuple(overrides["layers"])
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditHParams:
        return cls().with_overrides(**data)

    @classmethod
    def from_json(cls, path: Path) -> EditHParams:
        return cls.from_dict(json.loads(Path(path).read_text()))


def shape_key(config: Any) -> str:
    """Key identifying a model shape, e.g. ``llama-L30-d576-ff1536``."""
    return (
        f"{config.model_type}-L{config.num_hidden_layers}-d{config.hidden_size}"
        f"-ff{getattr(config, 'intermediate_size', None) or getattr(config, 'n_inner', None) or 0}"
    )


def default_hparams(config: Any, algo: Algo = "alphaedit") -> EditHParams:
    """Tuned values for this model shape when recorded, else MEMIT-style defaults on the lower-middle layers."""
    tuned = json.loads(_TUNED_FILE.read_text()) if _TUNED_FILE.exists() else {}
    entry = tuned.get(shape_key(config), {})
    base: dict[str, Any] = {k: v for k, v in entry.get("common", {}).items() if not k.startswith("_")}
    base.update(entry.get(algo, {}))
    if "layers" not in base:
        n = int(config.num_hidden_layers)
        start, stop = max(1, round(n * 0.12)), max(2, round(n * 0.3))
        base["layers"] = list(range(start, stop))
    return EditHParams(algo=algo).with_overrides(**base)
