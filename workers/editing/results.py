"""What one applied batch produced: the editor's output contract (``BatchResult``) and its working record."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.delta import MatrixDelta
from workers.editing.alphaedit_plus import PlusSettings
from workers.editing.hparams import EditHParams

TARGETS_AUX = "targets"
COMPACTED_AUX = "compacted"


@dataclass
class BatchResult:
    edit_ids: list[str]
    layers: list[int]
    deltas: list[MatrixDelta]  # one per edited layer, in the stored (shared) format
    edited_keys: dict[int, torch.Tensor]  # keys of this batch on the edited model, (d_in, n) per layer
    targets: torch.Tensor  # v* per edit at the last edited layer, (n, d)
    v_nll: list[float]  # final target NLL of the v* optimisation per edit
    v_steps: int
    seconds: dict[str, float] = field(default_factory=dict)  # keys / values / solve / guard
    filtered_energy: dict[int, float] = field(default_factory=dict)  # REVIVE: share of each update removed
    guard_efficacy: float | None = None  # share of the batch's edits that take after the guard
    per_edit_success: list[float] | None = None  # 1.0 per edit that takes on its own prompt (when the guard checked)
    diagnostics: dict[str, float] = field(default_factory=dict)  # algorithm details, e.g. AlphaEdit+ choices
    moments: dict[int, torch.Tensor] = field(default_factory=dict)  # UltraEdit's normaliser after this batch
    compacted: bool = False  # a compaction: ``edited_keys`` are all live edits' keys and replace C_prev

    @property
    def aux(self) -> dict[str, torch.Tensor]:
        """Editor state that travels with the version (the store's aux tensors), so a worker that follows or
        rebuilds the version from the store can keep editing exactly as the leader would: the edited keys
        (AlphaEdit's C_prev), UltraEdit's lifelong normaliser, the edits' v* (``targets``, rows in ``edit_ids``
        order: compaction re-solves them later) and the compaction marker."""
        out = {f"keys.{layer}": k for layer, k in self.edited_keys.items()} | {
            f"moments.{layer}": m for layer, m in self.moments.items()
        }
        if self.targets.numel():
            out[TARGETS_AUX] = self.targets.detach().float().cpu().contiguous()
        if self.compacted:
            out[COMPACTED_AUX] = torch.ones(1)
        return out


@dataclass
class Solved:
    """The per-layer outcome of a batch while it is being solved (committed to the state only if it succeeds)."""

    ids: list[str]
    deltas: list[MatrixDelta] = field(default_factory=list)
    keys_after: dict[int, torch.Tensor] = field(default_factory=dict)
    moments: dict[int, torch.Tensor] = field(default_factory=dict)  # UltraEdit's normaliser after this batch
    filtered_energy: dict[int, float] = field(default_factory=dict)
    efficacy: float | None = None
    per_edit_success: list[float] | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)


def plus_settings(hp: EditHParams) -> PlusSettings:
    return PlusSettings(
        search_eps=hp.aplus_search_eps, search_step=hp.aplus_search_step, search_max=hp.aplus_search_max,
        prev_weight=hp.aplus_prev_weight, prev_layer_scaled=hp.aplus_prev_layer_scaled, conflict=hp.aplus_conflict,
        smooth_tau=hp.aplus_smooth_tau, smooth_steps=hp.aplus_smooth_steps,
    )
