"""AlphaEdit+: with its relaxations off it is AlphaEdit (math and editor); each relaxation does what it says."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.schemas import EditRequest
from workers.editing.alphaedit import alphaedit_update, null_space_projector
from workers.editing.alphaedit_plus import (
    PlusSettings,
    alphaedit_plus_update,
    conflict_weights,
    objective,
    relax_projector,
    smoothing_scales,
)
from workers.editing.editor import Editor
from workers.editing.hparams import EditHParams
from workers.editing.state import EditorState
from workers.editing.stats import SecondMomentCache, StatsCorpus

OFF = PlusSettings()  # eps None, conflict off, weight 1 unscaled, tau None
SHAPES = st.tuples(st.integers(16, 48), st.integers(8, 24), st.integers(1, 6), st.integers(0, 12), st.integers(0, 9999))


def _problem(d_in: int, d_out: int, n: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3.0, 0.01, d_in, dtype=torch.float64)[:, None]
    k0 = torch.randn(d_in, 300, generator=gen, dtype=torch.float64) * scale
    null = null_space_projector(k0 @ k0.T / 300, 0.7, keep_preserved=True)
    keys = torch.randn(d_in, n, generator=gen, dtype=torch.float64)
    residual = torch.randn(d_out, n, generator=gen, dtype=torch.float64)
    prev = torch.randn(d_in, m, generator=gen, dtype=torch.float64)
    return null, keys, residual, prev


@settings(max_examples=30, deadline=None)
@given(SHAPES)
def test_reduces_to_alphaedit_with_relaxations_off(shape: tuple[int, int, int, int, int]) -> None:
    null, keys, residual, prev = _problem(*shape)
    ref_left, ref_right = alphaedit_update(residual, keys, null.projector, 2.0, prev @ prev.T)
    for kwargs in ({"prev_keys": prev}, {"prev_keys_cov": prev @ prev.T}):
        left, right, info = alphaedit_plus_update(residual, keys, null.projector, 2.0, OFF, layer_index=3,
                                                  candidates=null.preserved, **kwargs)
        torch.testing.assert_close(left @ right.T, ref_left @ ref_right.T, rtol=1e-9, atol=1e-10)
        assert info.added_directions == 0


@settings(max_examples=20, deadline=None)
@given(SHAPES)
def test_relaxed_projector_woodbury_equals_direct_solve_and_lowers_the_objective(shape: tuple) -> None:
    null, keys, residual, prev = _problem(*shape)
    pen = prev @ prev.T
    cfg = PlusSettings(search_eps=0.0, search_step=3, search_max=9)
    p_mod, right, _added, value = relax_projector(residual, keys, null.projector, null.preserved, pen, 1.0, cfg)
    _, direct = alphaedit_update(residual, keys, p_mod, 1.0, pen)
    torch.testing.assert_close(right, direct, rtol=1e-8, atol=1e-10)
    _, start = alphaedit_update(residual, keys, null.projector, 1.0, pen)
    assert value <= objective(residual, start, keys, pen, 1.0) + 1e-12
    # P_mod stays an orthogonal projector containing P
    torch.testing.assert_close(p_mod @ p_mod, p_mod, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p_mod @ null.projector, null.projector, rtol=1e-9, atol=1e-9)


def test_search_stops_when_the_gain_is_below_eps() -> None:
    null, keys, residual, _prev = _problem(32, 12, 4, 5, 1)
    never = PlusSettings(search_eps=1e9, search_step=2, search_max=20)
    assert relax_projector(residual, keys, null.projector, null.preserved, None, 1.0, never)[2] == 0


def test_objective_matches_its_dense_definition() -> None:
    null, keys, residual, prev = _problem(20, 7, 3, 4, 2)
    pen = 3.0 * prev @ prev.T
    left, right = alphaedit_update(residual, keys, null.projector, 0.5, pen)
    delta = left @ right.T
    dense = (delta @ keys - residual).pow(2).sum() + torch.trace(delta @ pen @ delta.T) + 0.5 * delta.pow(2).sum()
    assert objective(residual, right, keys, pen, 0.5) == pytest.approx(float(dense), rel=1e-9)


def test_conflict_weights_protect_similar_old_keys_less() -> None:
    new = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    prev = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(conflict_weights(prev, new), torch.tensor([0.0, 1.0, 1 - 2**-0.5], dtype=torch.float64))


def test_smoothing_scales_only_touch_large_residuals() -> None:
    scales = smoothing_scales(torch.tensor([1.0, 5.0]), tau=2.0, steps=10)
    assert len(scales) == 11
    assert all(float(s[0]) == 1.0 for s in scales)  # below tau: the full step always
    torch.testing.assert_close(torch.stack([s[1] for s in scales]), torch.linspace(0.5, 1.0, 11, dtype=torch.float64))
    assert len(smoothing_scales(torch.tensor([1.0]), tau=2.0, steps=10)) == 1


def test_smoothing_keeps_the_smallest_step_among_equally_good_candidates() -> None:
    null, keys, residual, _ = _problem(24, 8, 2, 0, 3)
    cfg = PlusSettings(smooth_tau=0.0, smooth_steps=4)
    seen: list[float] = []

    def score(left: torch.Tensor, right: torch.Tensor) -> float:
        seen.append(float(left.norm()))
        return 1.0 if len(seen) >= 3 else 0.0  # candidates t = 2, 3, 4 "work"

    left, _, info = alphaedit_plus_update(residual, keys, null.projector, 1.0, cfg, residual_norms=torch.ones(2),
                                          score=score)
    assert len(seen) == 5 and info.chosen_step == pytest.approx(0.75)  # t = 2: beta = 1/4
    torch.testing.assert_close(left, residual * 0.75)


# --- editor level on the tiny Llama ----------------------------------------------------------------------------

REQUESTS = [
    EditRequest(subject="france", prompt="the capital of {} is", target_new="rome", target_true="paris"),
    EditRequest(subject="danielle darrieux", prompt="the mother tongue of {} is", target_new="english"),
    EditRequest(subject="bbc one", prompt="{} , by", target_new="sega", target_true="bbc"),
]
CORPUS = "\n\n".join(["the capital of germany is berlin", "the eiffel tower is located in paris",
                      "what language is spoken in france ? french", "because i works at bbc"] * 8)


def _hp(algo: str, **kw: object) -> EditHParams:
    base = dict(algo=algo, layers=(1, 2), v_num_grad_steps=6, n_context_templates=1, context_template_tokens=3,
                nullspace_energy=0.6, l2=0.5, clamp_norm_factor=4.0, aplus_search_eps=None, aplus_conflict=False,
                aplus_smooth_tau=None)
    return EditHParams(**{**base, **kw})


@pytest.fixture
def stats(tmp_path) -> SecondMomentCache:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    return SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))


def test_editor_alphaedit_plus_off_equals_alphaedit(tiny_llama, tiny_tokenizer, stats) -> None:
    import copy

    twin = copy.deepcopy(tiny_llama)
    ref = Editor(twin, tiny_tokenizer, _hp("alphaedit"), stats, "tiny")
    plus = Editor(tiny_llama, tiny_tokenizer, _hp("alphaedit_plus"), stats, "tiny", templates=ref.state.templates)
    for batch in (REQUESTS[:2], REQUESTS[2:]):  # the second batch sees C_prev of the first
        a, b = ref.apply(batch), plus.apply(batch)
        for da, db in zip(a.deltas, b.deltas, strict=True):
            torch.testing.assert_close(db.dense(), da.dense(), rtol=1e-4, atol=1e-6)
    assert plus.state.prev_keys == {}  # raw keys are kept only for conflict weighting


def test_editor_alphaedit_plus_relaxed_keeps_and_saves_previous_keys(tmp_path, tiny_llama, tiny_tokenizer, stats):
    hp = _hp("alphaedit_plus", aplus_search_eps=1e-6, aplus_search_step=4, aplus_conflict=True, aplus_smooth_tau=0.0,
             aplus_smooth_steps=2)
    editor = Editor(tiny_llama, tiny_tokenizer, hp, stats, "tiny")
    first = editor.apply(REQUESTS[:2])
    second = editor.apply(REQUESTS[2:])
    assert {k for k in second.diagnostics if k.startswith("aplus_added_directions")} == {
        "aplus_added_directions.1", "aplus_added_directions.2"}
    assert first.diagnostics["aplus_chosen_step.1"] in (0.5, 0.75, 1.0)
    for layer in (1, 2):
        keys = editor.state.prev_keys[layer]
        assert keys.shape == (64, 3)
        torch.testing.assert_close(keys.double() @ keys.double().T, editor.state.prev_keys_cov[layer])
    loaded = EditorState.load(editor.state.save(tmp_path / "state.safetensors"))
    assert all(torch.equal(loaded.prev_keys[k], v) for k, v in editor.state.prev_keys.items())
