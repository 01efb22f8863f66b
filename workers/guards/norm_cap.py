"""Norm anchoring: cap each edited matrix's accumulated drift ||W - W0||_F / ||W0||_F.

Sequential edits collapse a model by letting W wander ever further from its pretrained W0. The cap is the bluntest
anchor: with A = W - W0 (drift so far), the new update Delta = L R^T and the allowed drift c = cap ||W0||_F, the
update is scaled by the largest s in [0, 1] with ||A + s Delta||_F <= max(c, ||A||_F):

    a = ||Delta||^2,  b = <A, Delta>,  q = ||A||^2 - max(c, ||A||)^2 (<= 0)
    s = min(1, (-b + sqrt(b^2 - a q)) / a)

Below the cap nothing changes (s = 1); an update that would cross it lands the drift exactly on the cap; a drift
already above it (the cap lowered on a resumed state) may shrink but never grow. Scaling the left factor keeps the
update low rank, and <A, L R^T> = sum(L * (A R)) and ||L R^T||^2 = sum((L^T L) * (R^T R)) avoid the dense product.
"""

from __future__ import annotations

import math

import torch


def norm_cap_scale(drift: torch.Tensor, left: torch.Tensor, right: torch.Tensor, limit: float) -> float:
    """The factor s in [0, 1] for update ``left @ right^T`` on top of ``drift`` (= W - W0), ``limit`` = c absolute."""
    a_mat = drift.to(torch.float64)
    lt, rt = left.to(a_mat.device, torch.float64), right.to(a_mat.device, torch.float64)
    a = float(((lt.T @ lt) * (rt.T @ rt)).sum())
    if a <= 0.0:
        return 1.0
    b = float((lt * (a_mat @ rt)).sum())
    drift_sq = float((a_mat * a_mat).sum())
    bound_sq = max(limit * limit, drift_sq)
    if drift_sq + 2.0 * b + a <= bound_sq:
        return 1.0
    q = drift_sq - bound_sq
    return min(1.0, max(0.0, (-b + math.sqrt(max(b * b - a * q, 0.0))) / a))


def cap_update(
    drift: torch.Tensor, left: torch.Tensor, right: torch.Tensor, base_norm: float, cap: float
) -> tuple[torch.Tensor, float]:
    """(left scaled, s): the update's left factor scaled so the relative drift stays within ``cap``."""
    scale = norm_cap_scale(drift, left, right, cap * base_norm)
    return (left if scale == 1.0 else left * scale), scale
