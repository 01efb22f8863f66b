"""Editor hyperparameters: one dataclass, defaults chosen per model shape by a recorded sweep."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

Algo = Literal["memit", "alphaedit"]
ALGOS: tuple[str, ...] = ("memit", "alphaedit")
_TUNED_FILE = Path(__file__).with_name("tuned_hparams.json")


@dataclass(frozen=True)
class EditHParams:
    """Settings of the locate-then-edit family (MEMIT, AlphaEdit).

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
    # Context templates: "{}" plus self-generated prefixes, sampled once per editor state with ``seed``.
    n_context_templates: int = 5
    context_template_tokens: int = 10
    seed: int = 0
    # MEMIT: weight of the preserved-key second moment.
    mom2_update_weight: float = 15000.0
    # AlphaEdit: null space = directions of E[kk^T] outside the top subspace holding this share of key energy.
    # Relative, because the published absolute threshold (2e-2) does not transfer between models.
    nullspace_energy: float = 0.8
    l2: float = 10.0
    solve_dtype: str = "float64"
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
