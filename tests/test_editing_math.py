"""Property tests of the closed-form update rules on random matrices."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.editing.alphaedit import alphaedit_update, null_space_projector
from workers.editing.memit import memit_update
from workers.editing.ultraedit import RunningMoments, pseudo_values, ultraedit_update

SHAPES = st.tuples(st.integers(24, 64), st.integers(8, 32), st.integers(1, 8), st.integers(0, 10_000))


def _preserved_keys(d_in: int, rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    basis = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))[0]
    return basis @ torch.randn(rank, n, generator=gen, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(SHAPES)
def test_alphaedit_leaves_preserved_keys_unchanged(shape: tuple[int, int, int, int]) -> None:
    d_in, d_out, batch, seed = shape
    gen = torch.Generator().manual_seed(seed)
    rank = d_in * 2 // 3
    k0 = _preserved_keys(d_in, rank, 400, gen)
    null = null_space_projector(k0 @ k0.T / k0.shape[1], preserved_energy=1 - 1e-9)
    assert null.null_dim == d_in - rank
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    keys = torch.randn(d_in, batch, generator=gen, dtype=torch.float64)
    residual = torch.randn(d_out, batch, generator=gen, dtype=torch.float64)
    prev = _preserved_keys(d_in, 3, 5, gen)
    left, right = alphaedit_update(residual, keys, null.projector, l2=1.0, prev_keys_cov=prev @ prev.T)
    delta = left @ right.T
    assert delta.abs().max() > 1e-6  # the update is not trivially zero
    before, after = w @ k0, (w + delta) @ k0
    assert torch.linalg.norm(after - before) / torch.linalg.norm(before) < 1e-10


@settings(max_examples=25, deadline=None)
@given(SHAPES)
def test_alphaedit_reduces_edit_residual(shape: tuple[int, int, int, int]) -> None:
    d_in, d_out, batch, seed = shape
    gen = torch.Generator().manual_seed(seed)
    k0 = _preserved_keys(d_in, d_in // 2, 300, gen)
    null = null_space_projector(k0 @ k0.T / k0.shape[1], preserved_energy=1 - 1e-9)
    keys = torch.randn(d_in, batch, generator=gen, dtype=torch.float64)
    residual = torch.randn(d_out, batch, generator=gen, dtype=torch.float64)
    left, right = alphaedit_update(residual, keys, null.projector, l2=1e-3)
    remaining = residual - (left @ right.T) @ keys
    assert torch.linalg.norm(remaining) < 0.05 * torch.linalg.norm(residual)


@settings(max_examples=25, deadline=None)
@given(SHAPES, st.floats(1e-3, 1e3))
def test_memit_update_is_the_least_squares_optimum(shape: tuple[int, int, int, int], lam: float) -> None:
    """Delta minimises ||Delta K - R||^2 + lam tr(Delta C Delta^T) + tr(Delta Cp Delta^T): zero gradient there."""
    d_in, d_out, batch, seed = shape
    gen = torch.Generator().manual_seed(seed)
    k0 = torch.randn(d_in, 200, generator=gen, dtype=torch.float64)
    mom2 = k0 @ k0.T / 200
    prev = torch.randn(d_in, 4, generator=gen, dtype=torch.float64)
    keys = torch.randn(d_in, batch, generator=gen, dtype=torch.float64)
    residual = torch.randn(d_out, batch, generator=gen, dtype=torch.float64)
    left, right = memit_update(residual, keys, mom2, lam, prev @ prev.T)
    delta = (left @ right.T).requires_grad_(True)
    objective = ((delta @ keys - residual) ** 2).sum() + lam * torch.trace(delta @ mom2 @ delta.T)
    objective = objective + torch.trace(delta @ prev @ prev.T @ delta.T)
    objective.backward()
    assert torch.linalg.norm(delta.grad) < 1e-8 * max(1.0, float(torch.linalg.norm(residual @ keys.T)))


@settings(max_examples=20, deadline=None)
@given(SHAPES)
def test_memit_residual_shrinks_as_preservation_weight_falls(shape: tuple[int, int, int, int]) -> None:
    d_in, d_out, batch, seed = shape
    gen = torch.Generator().manual_seed(seed)
    k0 = torch.randn(d_in, 200, generator=gen, dtype=torch.float64)
    mom2 = k0 @ k0.T / 200
    keys = torch.randn(d_in, batch, generator=gen, dtype=torch.float64)
    residual = torch.randn(d_out, batch, generator=gen, dtype=torch.float64)
    norms = []
    for lam in (1e4, 1e2, 1.0, 1e-6):
        left, right = memit_update(residual, keys, mom2, lam)
        norms.append(float(torch.linalg.norm(residual - left @ right.T @ keys)))
    assert norms == sorted(norms, reverse=True)
    assert norms[-1] < 1e-4 * float(torch.linalg.norm(residual))  # K has full column rank: exact fit as lam -> 0
    assert norms[0] > 0.5 * float(torch.linalg.norm(residual))  # strong preservation barely moves


def test_null_space_projector_properties() -> None:
    gen = torch.Generator().manual_seed(1)
    scales = torch.logspace(0, -3, 48, dtype=torch.float64)[:, None]
    x = torch.randn(48, 500, generator=gen, dtype=torch.float64) * scales
    mom2 = x @ x.T / 500
    for energy in (0.5, 0.8, 0.95, 0.999):
        null = null_space_projector(mom2, energy)
        p = null.projector
        assert torch.allclose(p @ p, p, atol=1e-10)
        assert torch.allclose(p, p.T, atol=1e-12)
        assert round(float(torch.trace(p))) == null.null_dim
        kept_energy = float(torch.trace(mom2) - torch.trace(p @ mom2))
        assert kept_energy >= energy * float(torch.trace(mom2)) - 1e-9
    dims = [null_space_projector(mom2, e).null_dim for e in (0.5, 0.8, 0.95, 0.999)]
    assert dims == sorted(dims, reverse=True) and dims[0] > dims[-1]


@settings(max_examples=25, deadline=None)
@given(SHAPES, st.floats(1e-3, 1e2))
def test_ultraedit_update_solves_its_ridge_least_squares(shape: tuple[int, int, int, int], ridge: float) -> None:
    """Delta^T = argmin_X ||K X - V||^2 + ridge ||X||^2: the gradient K^T (K X - V) + ridge X vanishes there."""
    d_in, d_out, n, seed = shape
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    left, right = ultraedit_update(keys, values, ridge)
    x = (left @ right.T).T  # (d_in, d_out)
    grad = keys.T @ (keys @ x - values) + ridge * x
    assert torch.linalg.norm(grad) < 1e-8 * (1 + torch.linalg.norm(keys.T @ values))
    assert left.shape == (d_out, n) and right.shape == (d_in, n)  # rank <= n


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 10_000))
def test_running_moments_equal_moments_of_everything_seen(batches: int, size: int, seed: int) -> None:
    """Chan's merge of batch after batch gives the mean and (unbiased) std of all rows at once."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(int(torch.randint(1, 7, (1,), generator=gen)), size, generator=gen, dtype=torch.float64) * 4
             + 2 for _ in range(batches)]
    moments = RunningMoments.empty(size)
    for part in parts:
        moments.update(part)
    every = torch.cat(parts)
    torch.testing.assert_close(moments.mean, every.mean(0))
    if every.shape[0] > 1:
        torch.testing.assert_close(moments.std, every.std(0))
    again = RunningMoments.unpack(moments.pack())
    assert again.n == moments.n and torch.equal(again.mean, moments.mean) and torch.equal(again.m2, moments.m2)


def test_ultraedit_pseudo_values_point_down_the_normalised_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    keys, grads = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
    moments = RunningMoments.empty(12)
    moments.update(torch.cat([keys, grads], dim=1))
    values = pseudo_values(keys, grads, moments, lr=0.1)
    g_hat = moments.normalise(torch.cat([keys, grads], dim=1))[:, 8:]
    cos = torch.nn.functional.cosine_similarity(values, g_hat, dim=1)
    torch.testing.assert_close(cos, -torch.ones(5, dtype=torch.float64))
