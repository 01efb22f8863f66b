"""REVIVE filter and PRUNE restraint on random matrices (properties), the guard policy inside the editor (a rejected
batch leaves everything exactly as before), and the rejection crossing a process boundary."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.schemas import EditRequest
from workers.editing.editor import Editor
from workers.editing.hparams import EditHParams
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.guards import GuardRejection
from workers.guards.policy import edit_success
from workers.guards.prune import log_restraint, prune_accumulated
from workers.guards.revive import Spectrum, protected_bases, revive_filter, spectrum_cached

SHAPES = st.tuples(st.integers(8, 40), st.integers(8, 48), st.integers(1, 6), st.integers(0, 6), st.integers(0, 9999))


def _rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(SHAPES)
def test_revive_removes_exactly_the_protected_component(shape: tuple[int, int, int, int, int]) -> None:
    d_out, d_in, rank, k, seed = shape
    gen = torch.Generator().manual_seed(seed)
    spectrum = Spectrum.of(_rand(d_out, d_in, gen=gen))
    u_k, v_k = protected_bases(spectrum, None, k)
    left, right = _rand(d_out, rank, gen=gen), _rand(d_in, rank, gen=gen)
    out = revive_filter(left, right, u_k, v_k)
    delta, safe = left @ right.T, out.left @ out.right.T
    eye_out, eye_in = torch.eye(d_out, dtype=torch.float64), torch.eye(d_in, dtype=torch.float64)
    expected = (eye_out - u_k @ u_k.T) @ delta @ (eye_in - v_k @ v_k.T)
    torch.testing.assert_close(safe, expected, rtol=1e-9, atol=1e-9)
    # nothing of the result acts in the protected subspaces, so W0's top-k triplets stay singular triplets
    assert torch.linalg.norm(u_k.T @ safe) < 1e-9 and torch.linalg.norm(safe @ v_k) < 1e-9
    # the removed part lies entirely in the protected subspaces: nothing of it is outside both
    removed = delta - safe
    assert torch.linalg.norm((eye_out - u_k @ u_k.T) @ removed @ (eye_in - v_k @ v_k.T)) < 1e-9
    share = 1 - safe.pow(2).sum() / delta.pow(2).sum()
    assert out.filtered_energy == pytest.approx(float(share), abs=1e-9)
    assert out.left.shape[1] == rank  # still low rank


@settings(max_examples=40, deadline=None)
@given(SHAPES)
def test_revive_leaves_an_update_outside_the_protected_subspace_untouched(shape: tuple) -> None:
    d_out, d_in, rank, k, seed = shape
    gen = torch.Generator().manual_seed(seed)
    spectrum = Spectrum.of(_rand(d_out, d_in, gen=gen))
    u_k, v_k = protected_bases(spectrum, None, k)
    left = _rand(d_out, rank, gen=gen)
    right = _rand(d_in, rank, gen=gen)
    left, right = left - u_k @ (u_k.T @ left), right - v_k @ (v_k.T @ right)
    out = revive_filter(left, right, u_k, v_k)
    torch.testing.assert_close(out.left @ out.right.T, left @ right.T, rtol=1e-10, atol=1e-10)
    assert out.filtered_energy == pytest.approx(0.0, abs=1e-9)


def test_protected_rank_by_energy_and_rank() -> None:
    spectrum = Spectrum(torch.eye(4, dtype=torch.float64), torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64),
                        torch.eye(4, dtype=torch.float64))
    assert spectrum.rank_for(energy=9 / 15 - 1e-9) == 1  # sigma^2 shares: 9, 4, 1, 1 of 15
    assert spectrum.rank_for(energy=9 / 15 + 1e-9) == 2
    assert spectrum.rank_for(energy=0.99) == 4
    assert spectrum.rank_for(energy=0.5, rank=3) == 3  # an explicit rank wins


def test_random_subspace_control_has_the_same_rank_and_is_not_the_dominant_one() -> None:
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    spectrum = Spectrum.of(w)
    u_d, v_d = protected_bases(spectrum, 0.5, None)
    u_r, v_r = protected_bases(spectrum, 0.5, None, subspace="random", seed=7)
    assert u_r.shape == u_d.shape and v_r.shape == v_d.shape
    torch.testing.assert_close(u_r.T @ u_r, torch.eye(u_r.shape[1], dtype=torch.float64))
    torch.testing.assert_close(v_r.T @ v_r, torch.eye(v_r.shape[1], dtype=torch.float64))
    assert torch.linalg.matrix_norm(u_d.T @ u_r) < u_d.shape[1] ** 0.5 - 0.1  # not the same subspace
    assert torch.equal(protected_bases(spectrum, 0.5, None, "random", seed=7)[0], u_r)  # deterministic
    with pytest.raises(ValueError, match="revive_subspace"):
        EditHParams(revive_subspace="top")


def test_spectrum_cache_round_trip(tmp_path) -> None:
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    first = spectrum_cached(w, tmp_path)
    assert len(list(tmp_path.glob("*.svd.safetensors"))) == 1
    again = spectrum_cached(torch.zeros(6, 9), tmp_path, sha256=next(tmp_path.glob("*")).name.split(".")[0])
    assert torch.equal(first.s, again.s)
    torch.testing.assert_close(again.weight(), w.double(), rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 30), st.integers(4, 30), st.floats(1.05, 5.0), st.integers(0, 9999))
def test_prune_keeps_values_below_the_cap_and_restrains_the_rest(d_out: int, d_in: int, alpha: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(_rand(d_out, min(d_out, d_in), gen=gen))[0]
    v = torch.linalg.qr(_rand(d_in, min(d_out, d_in), gen=gen))[0]
    s = torch.rand(min(d_out, d_in), generator=gen, dtype=torch.float64) * 20
    acc = (u * s) @ v.T
    cap = 10.0
    out = prune_accumulated(acc, cap, alpha)
    if bool((s <= cap).all()):
        assert out is None  # nothing above the cap: the update is left as it is
        return
    new_s = torch.linalg.svdvals(out)
    expected = torch.sort(log_restraint(s, cap, alpha), descending=True).values
    torch.testing.assert_close(new_s, expected, rtol=1e-8, atol=1e-8)
    below = torch.sort(s[s <= cap], descending=True).values
    torch.testing.assert_close(new_s[-below.numel():] if below.numel() else below, below, rtol=1e-8, atol=1e-8)
    # the singular vectors are kept: only the spectrum of W - W0 changes
    torch.testing.assert_close(u.T @ out @ v, torch.diag(log_restraint(s, cap, alpha)), rtol=1e-8, atol=1e-8)


def test_log_restraint_is_continuous_and_logarithmic() -> None:
    cap = 5.0
    s = torch.tensor([1.0, 5.0, 5.0 * math.e, 5.0 * math.e**2], dtype=torch.float64)
    torch.testing.assert_close(log_restraint(s, cap), torch.tensor([1.0, 5.0, 6.0, 7.0], dtype=torch.float64))
    assert float(log_restraint(torch.tensor([10.0], dtype=torch.float64), cap, alpha=2.0)) == pytest.approx(6.0)


def test_guard_rejection_pickles_with_its_fields() -> None:
    err = GuardRejection("too weak", [1.0, 0.0], ["a", "b"], {4: 0.9}, 0.8)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, GuardRejection) and back.reason == "collapse_risk"
    assert (back.per_edit_efficacy, back.edit_ids, back.filtered_energy) == ([1.0, 0.0], ["a", "b"], {4: 0.9})
    assert back.efficacy == 0.5 and str(back) == "too weak"


# --- the guard inside the editor, on a tiny random Llama ----------------------------------------------------------

REQUESTS = [
    EditRequest(subject="france", prompt="the capital of {} is", target_new="rome", target_true="paris"),
    EditRequest(subject="danielle darrieux", prompt="the mother tongue of {} is", target_new="english"),
]
CORPUS = "\n\n".join(["the capital of germany is berlin", "the eiffel tower is located in paris",
                      "who plays jazz piano", "the city of london is famous for music"] * 8)


def _hp(**kw: object) -> EditHParams:
    base = dict(algo="memit", layers=(1, 2), v_num_grad_steps=8, n_context_templates=1, context_template_tokens=3,
                mom2_update_weight=0.01, l2=0.01, nullspace_energy=0.5, clamp_norm_factor=4.0)
    return EditHParams(**{**base, **kw})


@pytest.fixture
def stats(tmp_path) -> SecondMomentCache:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    return SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))


def _snapshot(editor: Editor) -> dict:
    st_ = editor.state
    return {
        "model": {n: p.detach().clone() for n, p in editor.model.named_parameters()},
        "weights": {k: v.clone() for k, v in st_.weights.items()},
        "cov": {k: v.clone() for k, v in st_.prev_keys_cov.items()},
        "keys": {k: v.clone() for k, v in st_.prev_keys.items()},
        "ids": list(st_.edit_ids), "n": st_.n_batches,
    }


def _same(a: dict, b: dict) -> bool:
    def eq(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    tensors_equal = all(eq(a[k], b[k]) for k in ("model", "weights", "cov", "keys"))
    return tensors_equal and a["ids"] == b["ids"] and a["n"] == b["n"]


@pytest.mark.parametrize("algo", ["memit", "alphaedit_plus"])
def test_rejected_batch_leaves_model_and_state_exactly_as_before(algo, tiny_llama, tiny_tokenizer, stats) -> None:
    """Protecting the whole output space filters every update to nothing: the edits cannot take -> rejection."""
    editor = Editor(tiny_llama, tiny_tokenizer, _hp(algo=algo), stats, "tiny")
    editor.apply(REQUESTS[:1])  # some history, so there is state to disturb
    editor.state.hparams = editor.hparams.with_overrides(guard="revive", revive_rank=32, guard_min_efficacy=1.0)
    editor.guard = None
    before = _snapshot(editor)
    with pytest.raises(GuardRejection) as info:
        editor.apply(REQUESTS[1:])
    assert info.value.reason == "collapse_risk"
    assert info.value.per_edit_efficacy == [0.0] and info.value.edit_ids == [REQUESTS[1].edit_id]
    assert all(v == pytest.approx(1.0) for v in info.value.filtered_energy.values())
    assert _same(before, _snapshot(editor))


def test_revive_guarded_batch_keeps_the_protected_subspaces(tiny_llama, tiny_tokenizer, stats) -> None:
    editor = Editor(tiny_llama, tiny_tokenizer, _hp(guard="revive", revive_rank=4, guard_min_efficacy=0.0), stats,
                    "tiny")
    base = {layer: w.clone() for layer, w in editor.state.weights.items()}
    result = editor.apply(REQUESTS)
    assert set(result.filtered_energy) == {1, 2} and all(0 < v < 1 for v in result.filtered_energy.values())
    assert result.guard_efficacy is not None
    assert all(d.is_low_rank for d in result.deltas)  # the filter keeps the factor form
    for layer in (1, 2):
        spectrum = editor.base_spectra()[layer]
        u_k, v_k = spectrum.u[:, :4], spectrum.v[:, :4]
        change = (editor.state.weights[layer] - base[layer]).double()
        assert change.abs().max() > 1e-3
        assert (u_k.T @ change).abs().max() < 1e-5 and (change @ v_k).abs().max() < 1e-5
        live = editor.layout.get_weight(tiny_llama, layer).float().cpu()
        assert torch.equal(live, editor.state.weights[layer])


def test_prune_guarded_batch_restrains_the_accumulated_update(tiny_llama, tiny_tokenizer, stats) -> None:
    """Layer 1 sees the same proposal with and without PRUNE; the written change must be W0 + F(proposal) - W0.

    W0 is scaled down so that every real update exceeds sigma_max(W0) and the restraint is exercised."""
    with torch.no_grad():
        for layer in (1, 2):
            tiny_llama.model.layers[layer].mlp.down_proj.weight.mul_(0.01)
    twin = copy.deepcopy(tiny_llama)
    plain = Editor(twin, tiny_tokenizer, _hp(), stats, "tiny")
    pruned = Editor(tiny_llama, tiny_tokenizer, _hp(prune=True, prune_alpha=2.0, guard_min_efficacy=0.0), stats,
                    "tiny", templates=plain.state.templates)
    base = pruned.state.weights[1].double().clone()
    plain.apply(REQUESTS)
    result = pruned.apply(REQUESTS)
    assert result.diagnostics["pruned.1"] == 1.0 and not result.deltas[0].is_low_rank  # stored densely
    cap = float(torch.linalg.svdvals(base)[0])
    proposal = torch.linalg.svdvals(plain.state.weights[1].double() - base)
    assert float(proposal[0]) > cap
    written = torch.linalg.svdvals(pruned.state.weights[1].double() - base)
    torch.testing.assert_close(written, log_restraint(proposal, cap, 2.0), rtol=1e-4, atol=1e-5)


def test_edit_success_rule(tiny_llama, tiny_tokenizer) -> None:
    scores = edit_success(tiny_llama, tiny_tokenizer, REQUESTS)
    assert scores.shape == (2,) and set(scores.tolist()) <= {0.0, 1.0}


def test_guard_rejection_through_ray(ray_session) -> None:
    """Ray wraps worker exceptions; the controller must still see a GuardRejection with its fields."""
    @ray_session.remote
    def refuse() -> None:
        raise GuardRejection("refused", [0.0, 1.0], ["x", "y"], {4: 0.99}, 0.8)

    with pytest.raises(GuardRejection) as info:
        ray_session.get(refuse.remote())
    assert info.value.reason == "collapse_risk" and info.value.edit_ids == ["x", "y"]
