"""The norm cap (workers/guards/norm_cap.py): drift ||W - W0||_F / ||W0||_F is held at the cap, untouched below it,
and wired into the editor through SpectralGuard."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_guards import REQUESTS
from workers.editing.editor import Editor
from workers.editing.hparams import EditHParams
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.guards.norm_cap import cap_update, norm_cap_scale
from workers.guards.policy import SpectralGuard

F64 = torch.float64
CASES = st.tuples(st.integers(4, 40), st.integers(4, 40), st.integers(1, 6), st.integers(0, 10_000))


def _case(case: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d_out, d_in, rank, seed = case
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    drift = 0.05 * torch.randn(d_out, d_in, generator=gen, dtype=F64)
    left = torch.randn(d_out, rank, generator=gen, dtype=F64)
    right = torch.randn(d_in, rank, generator=gen, dtype=F64) / d_in**0.5
    return w0, drift, left, right


def _ratio(w0: torch.Tensor, drift: torch.Tensor) -> float:
    return float(torch.linalg.norm(drift) / torch.linalg.norm(w0))


@settings(max_examples=50, deadline=None)
@given(CASES, st.floats(1.05, 5.0))
def test_capped_drift_lands_on_the_cap(case: tuple[int, int, int, int], headroom: float) -> None:
    w0, drift, left, right = _case(case)
    full = _ratio(w0, drift + left @ right.T)
    now = _ratio(w0, drift)
    cap = now + (full - now) / headroom  # between the current drift and the uncapped one
    if not now < cap < full:
        return
    scaled, scale = cap_update(drift, left, right, float(torch.linalg.norm(w0)), cap)
    assert 0.0 <= scale < 1.0
    torch.testing.assert_close(scaled, left * scale)
    assert abs(_ratio(w0, drift + scaled @ right.T) - cap) < 1e-9 * cap


@settings(max_examples=50, deadline=None)
@given(CASES)
def test_update_below_the_cap_is_untouched(case: tuple[int, int, int, int]) -> None:
    w0, drift, left, right = _case(case)
    cap = _ratio(w0, drift + left @ right.T) * 1.01
    scaled, scale = cap_update(drift, left, right, float(torch.linalg.norm(w0)), cap)
    assert scale == 1.0 and scaled is left


@settings(max_examples=50, deadline=None)
@given(CASES)
def test_drift_already_above_the_cap_never_grows(case: tuple[int, int, int, int]) -> None:
    """E.g. a resumed state with a lowered cap: an update may shrink the drift, never grow it."""
    _, drift, left, right = _case(case)
    limit = 0.5 * float(torch.linalg.norm(drift))
    back = -(drift @ right) @ torch.linalg.pinv(right.T @ right)  # least-squares step back towards W0
    for lt in (left, back):
        scale = norm_cap_scale(drift, lt, right, limit)
        assert float(torch.linalg.norm(drift + scale * lt @ right.T)) <= float(torch.linalg.norm(drift)) * (1 + 1e-9)
    assert norm_cap_scale(drift, back, right, limit) > 0.0
    assert norm_cap_scale(drift, torch.zeros_like(left), right, limit) == 1.0


def test_guard_is_active_with_the_cap_only() -> None:
    assert not SpectralGuard.active(EditHParams())
    assert SpectralGuard.active(EditHParams(norm_cap=0.1))


CORPUS = "\n\n".join([
    "the capital of germany is berlin", "the eiffel tower is located in paris", "who plays jazz piano",
    "the city of london is famous for music", "what language is spoken in france ? french",
] * 6)


def test_editor_holds_each_layer_at_the_cap(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    stats = SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))
    hp = EditHParams(algo="memit", layers=(1, 2), v_num_grad_steps=8, n_context_templates=0, stats_texts=8,
                     stats_text_tokens=8, mom2_update_weight=1.0, clamp_norm_factor=4.0, v_dtype="float32")
    plain = Editor(copy.deepcopy(tiny_llama), tiny_tokenizer, hp, stats, "tiny")
    base = {layer: w.double().clone() for layer, w in plain.state.weights.items()}
    plain.apply(REQUESTS)
    free = {layer: _ratio(base[layer], plain.state.weights[layer].double() - base[layer]) for layer in base}
    cap = 0.5 * min(free.values())
    capped = Editor(tiny_llama, tiny_tokenizer, hp.with_overrides(norm_cap=cap, guard_min_efficacy=0.0), stats,
                    "tiny", templates=plain.state.templates)
    result = capped.apply(REQUESTS)
    for layer, delta in zip(result.layers, result.deltas, strict=True):
        assert delta.is_low_rank  # the cap keeps the factor form
        assert 0.0 < result.diagnostics[f"norm_cap_scale.{layer}"] < 1.0
        drift = _ratio(base[layer], capped.state.weights[layer].double() - base[layer])
        assert abs(drift - cap) < 1e-5 * cap  # float32 rounding of the written matrix
