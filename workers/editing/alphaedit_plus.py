"""AlphaEdit+ (Liu et al., Findings of ACL 2026): AlphaEdit with three relaxations for conflicting knowledge.

    J(Delta) = ||Delta K1 - R||^2 + w ||Delta K_p Lambda_p^1/2||^2 + l2 ||Delta||^2,   Delta in range(P_mod)^T
    Delta^T  = (P_mod (K1 K1^T + w K_p Lambda_p K_p^T) + l2 I)^-1 P_mod K1 R^T        (AlphaEdit's rule, reused)

1. **Relaxed projector.** P_mod = P + sum u u^T over preserved eigen-directions of C, lowest eigenvalue first,
   added ``step`` at a time while J drops by more than ``eps`` per added direction (relative); stop at the first
   group that does not (reference code: groups of 10, threshold eps * 10).
2. **Conflict weights.** Lambda_p[j] = 1 - max_i |cos(k_p_j, k_1_i)|: a previously edited key that looks like a
   new one is protected less, so a newer fact can replace an older, conflicting one. w = weight * (i + 1) when
   layer-scaled (the reference's beta * (i + 1)).
3. **Value smoothing.** Edits whose residual ||v1_i - v0_i|| exceeds tau get targets v_t = v1 + beta_t (v0 - v1),
   beta_t = (T - t) / 2T, t = 0..T, i.e. residual steps 1/2 ... 1; the update only depends on R linearly and the
   solve does not depend on R at all, so every candidate costs one matrix product. The reference keeps the
   candidate with the best rewrite+paraphrase accuracy on the batch's own records (first one on ties, i.e. the
   smallest step). That selects on evaluation prompts; here the caller's ``score`` decides, and the editor scores
   on the edit prompts only (``workers.guards.policy.edit_success``).

Reconstruction choices (no paper text was available, see ``editing-algorithms.md`` section 4): K_p are the keys of
earlier batches re-read on the edited model, the convention of editq's C_prev, so with all relaxations off
(eps None, conflict off, w = 1 unscaled, tau None) the update equals AlphaEdit's exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workers.editing.alphaedit import alphaedit_update

Score = Callable[[torch.Tensor, torch.Tensor], float]  # (left, right) of a candidate update -> batch efficacy


@dataclass(frozen=True)
class PlusSettings:
    search_eps: float | None = None
    search_step: int = 10
    search_max: int = 200
    prev_weight: float = 1.0
    prev_layer_scaled: bool = False
    conflict: bool = False
    smooth_tau: float | None = None
    smooth_steps: int = 10


@dataclass
class PlusInfo:
    added_directions: int = 0
    smoothed_edits: int = 0
    chosen_step: float = 1.0  # share of the residual kept for the smoothed edits
    residual_norm_median: float = float("nan")  # median ||v1 - v0||, to calibrate tau
    objective: float = float("nan")
    objective_gain: float = 0.0  # relative drop of J from the relaxed projector
    scores: list[float] = field(default_factory=list)


def conflict_weights(prev_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Lambda_p (M,): 1 - max over new keys of |cos| with each previous key; columns are keys."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.norm(x, dim=0, keepdim=True).clamp(min=1e-12)

    sims = (unit(prev_keys).T @ unit(keys.to(prev_keys))).abs()  # (M, n)
    return 1.0 - sims.max(dim=1).values


def previous_penalty(prev_keys: torch.Tensor, weights: torch.Tensor | None, scale: float) -> torch.Tensor:
    """scale * K_p diag(weights) K_p^T (d_in, d_in)."""
    weighted = prev_keys if weights is None else prev_keys * weights[None, :]
    return scale * (weighted @ prev_keys.T)


def objective(
    residual: torch.Tensor, right: torch.Tensor, keys: torch.Tensor, penalty: torch.Tensor | None, l2: float
) -> float:
    """J for Delta = R A^T in factor form: only n x n products, never the (d_out, d_in) matrix."""
    gram_r = residual.T @ residual  # (n, n)
    fit = residual @ (right.T @ keys - torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device))
    inner = l2 * (right.T @ right)
    if penalty is not None:
        inner = inner + right.T @ penalty @ right
    return float(fit.pow(2).sum() + (gram_r * inner).sum())


def relax_projector(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    candidates: torch.Tensor,
    penalty: torch.Tensor | None,
    l2: float,
    settings: PlusSettings,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Greedy P_mod: returns (P_mod, right factor, directions added, final J). ``candidates`` in ascending order.

    Adding a group B (orthonormal, orthogonal to range(P)) changes M = P G + l2 I by the rank-b term B (G B)^T, so
    each trial is a Woodbury update of M^-1, O(d^2 (n + b)), instead of a new O(d^3) solve; exact in float64 (tested
    against the direct solve). Without a search (eps None) the result is AlphaEdit's solve itself.
    """
    p = projector.to(dtype)
    k, r = keys.to(dtype), residual.to(dtype)
    pen = penalty.to(dtype) if penalty is not None else None
    if settings.search_eps is None or candidates.shape[1] == 0:
        _, right = alphaedit_update(r, k, p, l2, pen, dtype)
        return p, right, 0, objective(r, right, k, pen, l2)
    gram = k @ k.T if pen is None else k @ k.T + pen
    eye = torch.eye(p.shape[0], dtype=dtype, device=p.device)
    m_inv = torch.linalg.inv(p @ gram + l2 * eye)
    pk = p @ k
    right = m_inv @ pk
    best = objective(r, right, k, pen, l2)
    added, limit = 0, min(settings.search_max, candidates.shape[1])
    while added < limit:
        group = candidates[:, added : min(added + settings.search_step, limit)].to(dtype)
        g_group = gram @ group  # M_try = M + group @ g_group^T
        z = m_inv @ group
        core = torch.eye(group.shape[1], dtype=dtype, device=p.device) + g_group.T @ z
        pk_try = pk + group @ (group.T @ k)
        y = m_inv @ pk_try
        right_try = y - z @ torch.linalg.solve(core, g_group.T @ y)
        value = objective(r, right_try, k, pen, l2)
        if best <= 0 or (best - value) / best <= settings.search_eps * group.shape[1]:
            break
        m_inv = m_inv - z @ torch.linalg.solve(core, g_group.T @ m_inv)
        p, pk, right, best = p + group @ group.T, pk_try, right_try, value
        added += group.shape[1]
    return p, right, added, best


def smoothing_scales(residual_norms: torch.Tensor, tau: float, steps: int) -> list[torch.Tensor]:
    """Per candidate t = 0..T the factor (1 - beta_t mask_i) on each edit's residual; [ones] if none exceeds tau."""
    mask = (residual_norms > tau).to(torch.float64)
    if not bool(mask.any()):
        return [torch.ones_like(mask)]
    return [1.0 - ((steps - t) / (2 * steps)) * mask for t in range(steps + 1)]


def alphaedit_plus_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    l2: float,
    settings: PlusSettings,
    layer_index: int = 0,
    prev_keys: torch.Tensor | None = None,
    prev_keys_cov: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    residual_norms: torch.Tensor | None = None,
    score: Score | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, PlusInfo]:
    """(left, right, info) with Delta = left @ right^T for one layer.

    ``residual`` R (d_out, n) is already spread over the remaining layers; ``residual_norms`` (n,) are the unspread
    ||v1 - v0|| used by smoothing. Previous keys come raw (``prev_keys``, needed for conflict weights) or as their
    accumulated second moment (``prev_keys_cov``, enough when conflict weighting is off).
    """
    info = PlusInfo()
    scale = settings.prev_weight * ((layer_index + 1) if settings.prev_layer_scaled else 1.0)
    penalty = None
    if settings.conflict and prev_keys is not None and prev_keys.shape[1]:
        kp = prev_keys.to(keys.device, dtype)
        penalty = previous_penalty(kp, conflict_weights(kp, keys.to(dtype)), scale)
    elif prev_keys_cov is not None:
        penalty = scale * prev_keys_cov.to(keys.device, dtype)
    elif prev_keys is not None and prev_keys.shape[1]:
        penalty = previous_penalty(prev_keys.to(keys.device, dtype), None, scale)
    pool = candidates if candidates is not None else projector.new_zeros(projector.shape[0], 0)
    _, right, info.added_directions, info.objective = relax_projector(
        residual, keys, projector, pool, penalty, l2, settings, dtype
    )
    if info.added_directions:
        start = objective(residual.to(dtype), alphaedit_update(residual, keys, projector, l2, penalty, dtype)[1],
                          keys.to(dtype), penalty.to(dtype) if penalty is not None else None, l2)
        info.objective_gain = (start - info.objective) / start if start > 0 else 0.0
    left = residual.to(dtype)
    if residual_norms is not None:
        info.residual_norm_median = float(residual_norms.median())
    if settings.smooth_tau is None or residual_norms is None:
        return left, right, info
    scales = smoothing_scales(residual_norms.to(torch.float64), settings.smooth_tau, settings.smooth_steps)
    info.smoothed_edits = int((scales[0] < 1).sum())
    if len(scales) == 1 or score is None:
        return left, right, info
    options = [left * s.to(left)[None, :] for s in scales]
    info.scores = [float(score(option, right)) for option in options]
    best = max(range(len(options)), key=lambda t: (info.scores[t], -t))  # ties: the smallest step, as the reference
    info.chosen_step = 1.0 - (settings.smooth_steps - best) / (2 * settings.smooth_steps)
    return options[best], right, info
