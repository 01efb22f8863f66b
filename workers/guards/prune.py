"""PRUNE (Ma et al., ICLR 2025): restrain the large singular values of the accumulated update W - W0.

    sigma_bar = max sigma(W0);   W - W0 = U diag(s) V^T
    F(s) = log_alpha(s) - log_alpha(sigma_bar) + sigma_bar   for s > sigma_bar,   s otherwise
    W <- W0 + U diag(F(s)) V^T

F is continuous at sigma_bar and grows logarithmically above it, so values below the cap are untouched. The update
is restrained relative to W0 (the PRUNE baselines copied into the AlphaEdit repositories add F(W - W0) to W, which
counts the update twice). The result is not low rank, so the editor stores it as a dense delta.
"""

from __future__ import annotations

import math

import torch


def log_restraint(s: torch.Tensor, cap: float, alpha: float = math.e) -> torch.Tensor:
    """F(s) elementwise: identity up to ``cap``, ``log_alpha(s / cap) + cap`` above it."""
    if alpha <= 1.0:
        raise ValueError("alpha must be > 1")
    above = s > cap
    restrained = torch.log(s.clamp(min=cap) / cap) / math.log(alpha) + cap
    return torch.where(above, restrained, s)


def prune_accumulated(accumulated: torch.Tensor, cap: float, alpha: float = math.e) -> torch.Tensor | None:
    """Restrained ``W - W0`` (float64), or None when no singular value exceeds ``cap`` (nothing to change)."""
    acc = accumulated.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(acc, full_matrices=False)
    if not bool((s > cap).any()):
        return None
    return (u * log_restraint(s, cap, alpha)) @ vh
