"""The per-layer guard the editor applies before writing an update, and the per-batch accept/reject policy.

Per layer: REVIVE filters the proposed update (factors stay low rank), the norm cap optionally scales it so the
relative drift ||W - W0|| / ||W0|| stays within ``norm_cap`` (still low rank), then PRUNE optionally restrains the
accumulated update W - W0 (dense; it only shrinks singular values, so a capped drift stays capped). Per batch, after
all layers: the guarded model must still make the batch's own edits take; if the share that does is below
``guard_min_efficacy``, the batch is rejected with ``GuardRejection`` (reason ``collapse_risk``) instead of being
applied silently weakened. The editor then restores the model exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.delta import MatrixDelta
from shared.schemas import EditRequest
from workers.evaluation.scoring import candidate_nll
from workers.guards.norm_cap import cap_update
from workers.guards.prune import prune_accumulated
from workers.guards.revive import Spectrum, protected_bases, revive_filter


class GuardSettings(Protocol):
    """The guard's knobs, as the editor's hyperparameters carry them (``workers.editing.hparams.EditHParams``
    satisfies this). A protocol, so the guards never import the editing package back."""

    guard: str
    revive_energy: float
    revive_rank: int | None
    revive_subspace: str
    seed: int
    norm_cap: float | None
    prune: bool
    prune_alpha: float
    guard_min_efficacy: float

COLLAPSE_RISK = "collapse_risk"
# Without target_true an edit counts as taken when its mean target NLL is below ln 2, i.e. the geometric-mean
# probability of its target tokens is above 1/2.
NLL_SUCCESS = math.log(2.0)


class GuardRejection(RuntimeError):
    """A batch the guard refused: applying it filtered would weaken its edits too much. Model state is unchanged.

    Picklable with all fields (it crosses Ray's process boundary inside ``RayTaskError``).
    """

    def __init__(
        self,
        message: str,
        per_edit_efficacy: Sequence[float],
        edit_ids: Sequence[str] = (),
        filtered_energy: dict[int, float] | None = None,
        min_efficacy: float = 0.0,
        reason: str = COLLAPSE_RISK,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.per_edit_efficacy = [float(x) for x in per_edit_efficacy]
        self.edit_ids = list(edit_ids)
        self.filtered_energy = dict(filtered_energy or {})
        self.min_efficacy = float(min_efficacy)

    @property
    def efficacy(self) -> float:
        values = self.per_edit_efficacy
        return sum(values) / len(values) if values else float("nan")

    def __reduce__(self) -> tuple:
        return (
            type(self),
            (self.message, self.per_edit_efficacy, self.edit_ids, self.filtered_energy, self.min_efficacy,
             self.reason),
        )


@torch.no_grad()
def edit_success(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> torch.Tensor:
    """Per edit 1.0 if it takes on its own prompt, else 0.0: P(target_new) > P(target_true) when the true target is
    known (CounterFact's efficacy), otherwise mean target NLL below ``NLL_SUCCESS``."""
    pairs: list[tuple[str, str]] = []
    for r in requests:
        pairs.append((r.text, r.target_new))
        if r.target_true is not None:
            pairs.append((r.text, r.target_true))
    nll = candidate_nll(model, tokenizer, pairs).tolist()
    out, i = [], 0
    for r in requests:
        if r.target_true is not None:
            out.append(float(nll[i] < nll[i + 1]))
            i += 2
        else:
            out.append(float(nll[i] < NLL_SUCCESS))
            i += 1
    return torch.tensor(out)


@dataclass(frozen=True)
class GuardedDelta:
    delta: MatrixDelta
    filtered_energy: float
    pruned: bool
    cap_scale: float = 1.0  # factor the norm cap scaled the update by (1.0: not capped or cap off)


class SpectralGuard:
    """REVIVE, the norm cap and/or PRUNE for the edited matrices of one editor, relative to their pretrained W0."""

    def __init__(self, hparams: GuardSettings, base: dict[int, torch.Tensor], spectra: dict[int, Spectrum],
                 device: torch.device | str = "cpu") -> None:
        self.hp = hparams
        self.device = torch.device(device)
        self.base = {layer: w.detach().to("cpu", torch.float32) for layer, w in base.items()}
        self.spectra = spectra
        self.bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.base_norms = {layer: float(torch.linalg.norm(w.double())) for layer, w in self.base.items()}
        if hparams.guard == "revive":
            for layer, spectrum in spectra.items():
                u_k, v_k = protected_bases(spectrum, hparams.revive_energy, hparams.revive_rank,
                                           hparams.revive_subspace, seed=hparams.seed + layer)
                self.bases[layer] = (u_k.to(self.device), v_k.to(self.device))

    @staticmethod
    def active(hparams: GuardSettings) -> bool:
        return hparams.guard != "none" or hparams.prune or hparams.norm_cap is not None

    def protected_rank(self, layer: int) -> int:
        return int(self.bases[layer][0].shape[1]) if layer in self.bases else 0

    def apply(
        self, layer: int, left: torch.Tensor, right: torch.Tensor, current: torch.Tensor, name: str,
        transposed: bool,
    ) -> GuardedDelta:
        """The delta to write for update ``left @ right^T`` on top of ``current`` (the layer's matrix now)."""
        filtered = 0.0
        if layer in self.bases:
            u_k, v_k = self.bases[layer]
            result = revive_filter(left, right, u_k, v_k)
            left, right, filtered = result.left, result.right, result.filtered_energy
        scale = 1.0
        if self.hp.norm_cap is not None:
            drift = current.to(self.device, torch.float64) - self.base[layer].to(self.device, torch.float64)
            left, scale = cap_update(drift, left, right, self.base_norms[layer], self.hp.norm_cap)
        delta = MatrixDelta.from_factors(name, left, right, transposed=transposed)
        if not self.hp.prune:
            return GuardedDelta(delta, filtered, False, scale)
        w0 = self.base[layer].to(self.device, torch.float64)
        accumulated = delta.apply(current).to(self.device, torch.float64) - w0
        restrained = prune_accumulated(accumulated, self.spectra[layer].sigma_max, self.hp.prune_alpha)
        if restrained is None:
            return GuardedDelta(delta, filtered, False, scale)
        dense = (w0 + restrained) - current.to(self.device, torch.float64)
        return GuardedDelta(MatrixDelta.from_dense(name, dense, transposed=transposed), filtered, True, scale)


def check_batch(
    efficacy: torch.Tensor, hparams: GuardSettings, edit_ids: Sequence[str], filtered_energy: dict[int, float]
) -> None:
    """Raise ``GuardRejection`` when the guarded batch's efficacy is below ``guard_min_efficacy``."""
    mean = float(efficacy.mean()) if efficacy.numel() else float("nan")
    if efficacy.numel() and mean < hparams.guard_min_efficacy:
        energy = ", ".join(f"layer {k}: {v:.2f}" for k, v in sorted(filtered_energy.items()))
        raise GuardRejection(
            f"guarded update makes {mean:.0%} of the batch's edits take (< {hparams.guard_min_efficacy:.0%}); "
            f"filtered energy {energy or 'n/a'}",
            efficacy.tolist(), edit_ids, filtered_energy, hparams.guard_min_efficacy,
        )
