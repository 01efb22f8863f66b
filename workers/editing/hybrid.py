"""AlphaEdit-hybrid: AlphaEdit's null-space constraint plus MEMIT's C-weighted penalty inside the null space.

Why: on a flat key spectrum (SmolLM2) the null space P of ``nullspace_energy`` = 0.7 still holds ~30% of the
generic keys' energy, and AlphaEdit guards it only with a flat ``l2 ||Delta||^2``. MEMIT weights the same
directions by their key energy (lambda C). The hybrid keeps the hard constraint on the preserved subspace and
adds MEMIT's penalty where AlphaEdit has none:

    min_Delta  ||Delta K - R||^2 + tr(Delta C_prev Delta^T) + lambda tr(Delta C Delta^T) + l2 ||Delta||_F^2
    s.t.       Delta = Delta P

(on the feasible set tr(Delta C Delta^T) = ||Delta P C^1/2||^2 and ||Delta||^2 = ||Delta P||^2). Writing
Delta = Y P, the gradient in Y is [(Delta K - R) K^T + Delta (C_prev + lambda C) + l2 Delta] P = 0, and with
Delta P = Delta this is

    Delta ((K K^T + C_prev + lambda C) P + l2 I) = R K^T P
    Delta^T = (P (K K^T + C_prev + lambda C) + l2 I)^-1 P K R^T.

That is AlphaEdit's solve with ``lambda C`` added to the preserved-key penalty, so the rule is AlphaEdit's
(``alphaedit_update``) with C_prev -> C_prev + lambda C: lambda = 0 is AlphaEdit bit for bit, P = I with l2 = 0
is MEMIT's ``(lambda C + C_prev + K K^T)^-1`` and every solution still lies in range(P) (the preserved keys'
outputs stay unchanged). With P != I the system needs l2 > 0 (P A is singular). Because P is a spectral projector
of C, P C = C P: the penalty acts only through C's small eigenvalues, the directions AlphaEdit left unguarded.

A separate algorithm (``alphaedit_hybrid``) rather than an AlphaEdit setting, so it carries its own per-model tuned
defaults (``tuned_hparams.json``), results and manifests name it, and AlphaEdit's defaults stay untouched.
"""

from __future__ import annotations

import torch

from workers.editing.alphaedit import alphaedit_update


def hybrid_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    mom2: torch.Tensor,
    mom2_weight: float,
    l2: float,
    prev_keys_cov: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual R (d_out, u), keys K (d_in, u), projector P, normalised mom2 C -> (R, A) with Delta = R A^T."""
    penalty = prev_keys_cov.to(dtype) if prev_keys_cov is not None else None
    if mom2_weight != 0.0:
        weighted = mom2_weight * mom2.to(dtype)
        penalty = weighted if penalty is None else penalty + weighted
    return alphaedit_update(residual, keys, projector, l2, penalty, dtype)
