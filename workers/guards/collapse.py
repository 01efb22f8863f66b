"""Per-matrix collapse signals of an edited matrix W against its pretrained W0 (plain tensors, one SVD of W).

* sigma_max and the condition number sigma_max / sigma_min (PRUNE: its growth bounds how much stored associations
  are perturbed);
* relative drift ||W - W0||_F / ||W0||_F;
* subspace overlap: mean cos^2 of the principal angles between the top-k singular subspaces of W and W0, i.e.
  ||U_k(W)^T U_k(W0)||_F^2 / k, averaged over the left and the right subspaces (REVIVE's "low-rank subspace
  similarity": it drops sharply before editing collapses). 1 = unchanged, k/d for a random subspace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from workers.guards.revive import Spectrum

DEFAULT_TOP_K = 32  # about 5% of SmolLM2's rank 576: REVIVE finds the top 5% carries most general ability


@dataclass(frozen=True)
class MatrixHealth:
    sigma_max: float
    condition_number: float
    relative_drift: float
    subspace_overlap: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cos^2 of the principal angles between span(a) and span(b) (orthonormal columns, same count)."""
    k = a.shape[1]
    if k == 0:
        return 1.0
    cosines = torch.linalg.svdvals(a.T.to(torch.float64) @ b.to(torch.float64))
    return float(cosines.pow(2).sum() / k)


def matrix_health(weight: torch.Tensor, base: Spectrum, top_k: int = DEFAULT_TOP_K) -> MatrixHealth:
    """Collapse signals of ``weight`` (d_out, d_in) relative to the pretrained matrix whose SVD is ``base``."""
    w = weight.detach().to(base.s.device, torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w0 = base.weight()
    k = min(top_k, s.numel())
    overlap = 0.5 * (subspace_overlap(u[:, :k], base.u[:, :k]) + subspace_overlap(vh[:k].T, base.v[:, :k]))
    sigma_min = float(s[-1])
    return MatrixHealth(
        sigma_max=float(s[0]),
        condition_number=float(s[0]) / sigma_min if sigma_min > 0 else float("inf"),
        relative_drift=float(torch.linalg.norm(w - w0) / torch.linalg.norm(w0).clamp(min=1e-300)),
        subspace_overlap=overlap,
    )
