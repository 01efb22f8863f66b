"""MEMIT's closed-form update for one layer (Meng et al., 2023), sequential variant.

    Delta = R K^T (lambda C + C_prev + K K^T)^-1

minimises ||Delta K - R||^2 + lambda ||Delta K0||^2 + ||Delta K_prev||^2: fit the batch's residuals R while
disturbing the preserved keys (second moment C of generic text) and previously edited keys as little as possible.
Returned as low-rank factors (left, right) with Delta = left @ right^T, rank <= batch size.
"""

from __future__ import annotations

import torch


def memit_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    mom2: torch.Tensor,
    mom2_weight: float,
    prev_keys_cov: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual R (d_out, u), keys K (d_in, u), normalised mom2 C (d_in, d_in) -> (R, adj) with Delta = R adj^T."""
    k = keys.to(dtype)
    system = mom2_weight * mom2.to(dtype) + k @ k.T
    if prev_keys_cov is not None:
        system = system + prev_keys_cov.to(dtype)
    adj = torch.linalg.solve(system, k)  # (d_in, u), system is symmetric
    return residual.to(dtype), adj
