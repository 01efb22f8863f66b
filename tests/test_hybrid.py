"""AlphaEdit-hybrid (workers/editing/hybrid.py): property tests of the closed form on random float64 matrices, the
editor wiring on a tiny model, and (slow) a CounterFact check on SmolLM2."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_guards import REQUESTS
from workers.editing.alphaedit import alphaedit_update, null_space_projector
from workers.editing.editor import Editor
from workers.editing.hparams import ALGOS, NULL_SPACE_ALGOS, V_STAR_ALGOS, EditHParams
from workers.editing.hybrid import hybrid_update
from workers.editing.memit import memit_update
from workers.editing.stats import SecondMomentCache, StatsCorpus

SHAPES = st.tuples(st.integers(24, 64), st.integers(8, 32), st.integers(1, 8), st.integers(0, 10_000))
F64 = torch.float64


def _problem(shape: tuple[int, int, int, int], rank_share: float = 2 / 3) -> dict[str, torch.Tensor]:
    """Generic keys spanning a ``rank_share`` subspace plus a weak full-rank floor (so C is invertible and the null
    space still holds some key energy, as on SmolLM2), the null space of the top 99%, a batch and a history."""
    d_in, d_out, batch, seed = shape
    gen = torch.Generator().manual_seed(seed)
    rank = max(1, int(d_in * rank_share))
    basis = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=F64))[0]
    k0 = basis @ torch.randn(rank, 400, generator=gen, dtype=F64)
    k0 = k0 + 0.05 * torch.randn(d_in, 400, generator=gen, dtype=F64)
    mom2 = k0 @ k0.T / k0.shape[1]
    null = null_space_projector(mom2, preserved_energy=0.99, keep_preserved=True)
    prev = torch.randn(d_in, 3, generator=gen, dtype=F64)
    return {
        "mom2": mom2, "projector": null.projector, "preserved": null.preserved,
        "keys": torch.randn(d_in, batch, generator=gen, dtype=F64),
        "residual": torch.randn(d_out, batch, generator=gen, dtype=F64),
        "prev": prev @ prev.T, "w": torch.randn(d_out, d_in, generator=gen, dtype=F64),
    }


def _delta(p: dict[str, torch.Tensor], lam: float, l2: float = 1.0, projector: torch.Tensor | None = None):
    proj = p["projector"] if projector is None else projector
    left, right = hybrid_update(p["residual"], p["keys"], proj, p["mom2"], lam, l2, p["prev"])
    return left @ right.T


@settings(max_examples=25, deadline=None)
@given(SHAPES, st.floats(0.0, 1e3))
def test_hybrid_leaves_preserved_keys_unchanged(shape: tuple[int, int, int, int], lam: float) -> None:
    """(a) Delta k0 = 0 for every k0 in the preserved subspace (outputs unchanged to float tolerance)."""
    p = _problem(shape)
    assert p["preserved"].shape[1] > 0
    delta = _delta(p, lam)
    assert delta.abs().max() > 1e-8  # not trivially zero
    k0 = p["preserved"] @ torch.randn(p["preserved"].shape[1], 50, dtype=F64)
    before, after = p["w"] @ k0, (p["w"] + delta) @ k0
    assert torch.linalg.norm(after - before) / torch.linalg.norm(before) < 1e-10
    torch.testing.assert_close(delta @ p["projector"], delta, rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(SHAPES, st.floats(1e-3, 1e2))
def test_hybrid_with_zero_weight_is_alphaedit(shape: tuple[int, int, int, int], l2: float) -> None:
    """(b) lambda = 0 is AlphaEdit bit for bit (the same solve)."""
    p = _problem(shape)
    got = hybrid_update(p["residual"], p["keys"], p["projector"], p["mom2"], 0.0, l2, p["prev"])
    ref = alphaedit_update(p["residual"], p["keys"], p["projector"], l2, p["prev"])
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    got = hybrid_update(p["residual"], p["keys"], p["projector"], p["mom2"], 0.0, l2)  # no history either
    ref = alphaedit_update(p["residual"], p["keys"], p["projector"], l2)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


@settings(max_examples=25, deadline=None)
@given(SHAPES, st.floats(1e-2, 1e3))
def test_hybrid_without_null_space_is_memit(shape: tuple[int, int, int, int], lam: float) -> None:
    """(c) P = I (nothing preserved) and l2 = 0 is MEMIT's rule with the same lambda and history."""
    p = _problem(shape)
    eye = torch.eye(p["mom2"].shape[0], dtype=F64)
    left, right = memit_update(p["residual"], p["keys"], p["mom2"], lam, p["prev"])
    ref = left @ right.T
    got = _delta(p, lam, l2=0.0, projector=eye)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10 * float(ref.abs().max()))


@settings(max_examples=25, deadline=None)
@given(SHAPES, st.floats(0.0, 1e3), st.floats(1e-2, 1e2))
def test_hybrid_solves_its_normal_equations(shape: tuple[int, int, int, int], lam: float, l2: float) -> None:
    """(d) Delta = Y P minimises ||Delta K - R||^2 + tr(Delta (C_prev + lam C) Delta^T) + l2 ||Delta||^2: zero
    gradient in Y at Y = Delta."""
    p = _problem(shape)
    proj = p["projector"]
    y = _delta(p, lam, l2).clone().requires_grad_(True)
    delta = y @ proj
    penalty = p["prev"] + lam * p["mom2"]
    objective = ((delta @ p["keys"] - p["residual"]) ** 2).sum() + torch.trace(delta @ penalty @ delta.T)
    objective = objective + l2 * (delta**2).sum()
    objective.backward()
    scale = float(torch.linalg.norm(p["residual"] @ p["keys"].T)) + 1.0
    assert torch.linalg.norm(y.grad) < 1e-9 * scale * max(1.0, lam)


@settings(max_examples=20, deadline=None)
@given(SHAPES)
def test_larger_weight_gives_smaller_c_weighted_update(shape: tuple[int, int, int, int]) -> None:
    """(e) tr(Delta C Delta^T) is non-increasing in lambda (and the edit residual non-decreasing)."""
    p = _problem(shape)
    norms, misses = [], []
    for lam in (0.0, 0.1, 1.0, 10.0, 100.0, 1000.0):
        delta = _delta(p, lam)
        norms.append(float(torch.trace(delta @ p["mom2"] @ delta.T)))
        misses.append(float(torch.linalg.norm(delta @ p["keys"] - p["residual"])))
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(norms)), norms
    assert all(b >= a * (1 - 1e-9) for a, b in itertools.pairwise(misses)), misses
    assert norms[-1] < norms[0]


def test_hybrid_is_registered_and_validated() -> None:
    assert "alphaedit_hybrid" in ALGOS and "alphaedit_hybrid" in V_STAR_ALGOS and "alphaedit_hybrid" in NULL_SPACE_ALGOS
    with pytest.raises(ValueError, match="l2 > 0"):
        EditHParams(algo="alphaedit_hybrid", l2=0.0)
    with pytest.raises(ValueError, match="norm_cap"):
        EditHParams(norm_cap=0.0)
    assert EditHParams().norm_cap is None


CORPUS = "\n\n".join([
    "the capital of germany is berlin", "the eiffel tower is located in paris", "who plays jazz piano",
    "the city of london is famous for music", "what language is spoken in france ? french",
    "a tower in rome", "because i works at bbc", "therefore you plays music in lyon",
] * 6)


def _hp(**kw: object) -> EditHParams:
    base = dict(layers=(1, 2), v_num_grad_steps=8, n_context_templates=2, context_template_tokens=3,
                stats_texts=8, stats_text_tokens=8, nullspace_energy=0.9, l2=1.0, mom2_update_weight=10.0,
                clamp_norm_factor=4.0, v_dtype="float32")
    return EditHParams(**{**base, **kw})


def test_hybrid_editor_wiring(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    """On a tiny model: lambda = 0 writes AlphaEdit's deltas exactly; lambda > 0 stays in the null space, changes
    the update and shrinks its C-weighted norm."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    stats = SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))
    runs = {}
    ref = None
    for name, algo, lam in (("alpha", "alphaedit", 10.0), ("zero", "alphaedit_hybrid", 0.0),
                            ("hybrid", "alphaedit_hybrid", 10.0)):
        model = copy.deepcopy(tiny_llama)
        editor = Editor(model, tiny_tokenizer, _hp(algo=algo, mom2_update_weight=lam), stats, "tiny",
                        templates=None if ref is None else ref.state.templates)
        ref = ref or editor
        runs[name] = (editor, editor.apply(REQUESTS))
    alpha, zero, hybrid = (runs[k][1] for k in ("alpha", "zero", "hybrid"))
    for a, z in zip(alpha.deltas, zero.deltas, strict=True):
        assert torch.equal(a.dense(), z.dense())
    editor = runs["hybrid"][0]
    for layer, a, h in zip(hybrid.layers, alpha.deltas, hybrid.deltas, strict=True):
        p = editor.null_space(layer).projector.float()
        dense = h.dense()
        torch.testing.assert_close(dense @ p, dense, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(dense, a.dense())
    c = editor._mom2[1].double()  # the first layer sees the same keys and residuals in both runs
    c_norm = [float(torch.trace(d.dense().double() @ c @ d.dense().double().T)) for d in (alpha.deltas[0],
                                                                                         hybrid.deltas[0])]
    assert c_norm[1] < c_norm[0]


@pytest.mark.slow
def test_hybrid_on_smollm2_takes_with_a_smaller_update(smollm2) -> None:
    """8 CounterFact edits on SmolLM2 with its tuned settings: the hybrid still makes >= 75% take, with a smaller
    ||Delta W||_F than AlphaEdit on the same edits (same templates, same v*)."""
    from shared.settings import Settings
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.editing.hparams import default_hparams
    from workers.editing.layout import ModelLayout
    from workers.evaluation.metrics import edit_metrics
    from workers.model_io import model_fingerprint

    model, tokenizer = smollm2
    cfg = Settings()
    fingerprint = model_fingerprint(cfg.resolved_model_path())
    requests = load_edits(bundled_counterfact_path(), limit=8).requests  # counterfact_val_300.json
    layout = ModelLayout.from_model(model)
    norms, efficacy = {}, {}
    values, templates = None, None
    for algo in ("alphaedit", "alphaedit_hybrid"):
        hp = default_hparams(model.config, algo)
        stats = SecondMomentCache(cfg.stats_dir, fingerprint, StatsCorpus(
            n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
        base = {layer: layout.get_weight(model, layer).clone() for layer in hp.layers}
        try:
            editor = Editor(model, tokenizer, hp, stats, fingerprint, templates=templates)
            templates = editor.state.templates
            values = values if values is not None else editor.compute_values(requests)
            result = editor.apply(requests, values)
            norms[algo] = float(torch.sqrt(sum(d.dense().double().norm() ** 2 for d in result.deltas)))
            efficacy[algo] = edit_metrics(model, tokenizer, requests, zsre=False).efficacy
        finally:
            for layer, weight in base.items():
                layout.set_weight(model, layer, weight)
    assert efficacy["alphaedit_hybrid"] >= 0.75, efficacy
    assert norms["alphaedit_hybrid"] < norms["alphaedit"], norms
