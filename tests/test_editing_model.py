"""Model-level properties on tiny random models: layout, hooks, batched v*, the editor and its saved state."""

from __future__ import annotations

import pytest
import torch

from shared.schemas import EditRequest
from workers.editing.editor import Editor
from workers.editing.hooks import add_at_positions, capture, run_until_stopped
from workers.editing.hparams import EditHParams
from workers.editing.keys import KeyReader, read_keys_and_output
from workers.editing.layout import ModelLayout, UnsupportedModelError
from workers.editing.prompts import key_rows, kl_rows, rewrite_rows
from workers.editing.state import EditorState
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.editing.values import compute_target_values

REQUESTS = [
    EditRequest(subject="france", prompt="the capital of {} is", target_new="rome", target_true="paris"),
    EditRequest(subject="danielle darrieux", prompt="the mother tongue of {} is", target_new="english"),
    EditRequest(subject="bbc one", prompt="{} , by", target_new="sega", target_true="bbc"),
]
CORPUS_TEXT = "\n\n".join(
    " ".join(words) for words in [WORDS.split() for WORDS in [
        "the capital of germany is berlin", "the eiffel tower is located in paris", "who plays jazz piano",
        "the city of london is famous for music", "what language is spoken in france ? french",
        "a tower in rome", "because i works at bbc", "therefore you plays music in lyon",
    ] * 6]
)


def _hp(**kw: object) -> EditHParams:
    base = dict(layers=(1, 2), v_num_grad_steps=8, n_context_templates=2, context_template_tokens=3,
                stats_texts=8, stats_text_tokens=8, nullspace_energy=0.9, l2=1.0, mom2_update_weight=10.0,
                clamp_norm_factor=4.0, v_dtype="float32")
    return EditHParams(**{**base, **kw})


@pytest.fixture
def stats(tmp_path, tiny_llama):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS_TEXT)
    return SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))


def test_layout_linear_and_conv1d_orientation(tiny_llama, tiny_gpt2) -> None:
    llama = ModelLayout.from_model(tiny_llama)
    assert llama.weight_name(1) == "model.layers.1.mlp.down_proj.weight"
    assert llama.weight_name(1) in tiny_llama.state_dict()
    assert llama.get_weight(tiny_llama, 1).shape == (32, 64)

    gpt2 = ModelLayout.from_model(tiny_gpt2)
    module = gpt2.mlp_out_module(tiny_gpt2, 1)
    assert tuple(module.weight.shape) == (128, 32)  # Conv1D stores (d_in, d_out)
    weight = gpt2.get_weight(tiny_gpt2, 1)
    assert weight.shape == (32, 128)
    x = torch.randn(5, 128)
    torch.testing.assert_close(module(x) - module.bias, x @ weight.T)  # (d_out, d_in) orientation
    delta = torch.randn(32, 128)
    gpt2.add_to_weight(tiny_gpt2, 1, delta)
    torch.testing.assert_close(module(x) - module.bias, x @ (weight + delta).T, rtol=1e-5, atol=1e-5)
    gpt2.set_weight(tiny_gpt2, 1, weight)
    assert torch.equal(gpt2.get_weight(tiny_gpt2, 1), weight)  # bit-exact round trip


def test_unknown_family_is_rejected(tiny_llama) -> None:
    tiny_llama.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="mystery"):
        ModelLayout.from_model(tiny_llama)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_hook_patches_only_the_chosen_batch_row(fixture: str, request: pytest.FixtureRequest) -> None:
    """A hook written for tuples would patch batch element 0 on tensor-returning layers; ours must not."""
    model = request.getfixturevalue(fixture)
    layout = ModelLayout.from_model(model)
    ids = torch.tensor([[2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    base = model(input_ids=ids).logits
    vec = torch.randn(1, model.config.hidden_size) * 10
    with add_at_positions(layout.block(model, 1), torch.tensor([1]), torch.tensor([2]), lambda: vec):
        patched = model(input_ids=ids).logits
    torch.testing.assert_close(patched[0], base[0])  # row 0 untouched
    torch.testing.assert_close(patched[1, :2], base[1, :2])  # causal: earlier positions untouched
    assert (patched[1, 2:] - base[1, 2:]).abs().max() > 1e-3


def test_capture_stops_early(tiny_llama) -> None:
    layout = ModelLayout.from_model(tiny_llama)
    targets = {"k": (layout.mlp_out_module(tiny_llama, 1), "input")}
    calls = []
    handle = layout.block(tiny_llama, 3).register_forward_hook(lambda *a: calls.append(1))
    with capture(targets, stop_after="k") as store:
        run_until_stopped(lambda: tiny_llama(input_ids=torch.tensor([[2, 3, 4]])))
    handle.remove()
    assert store["k"].shape == (1, 3, 64)
    assert not calls  # layer 3 never ran


def test_batched_values_equal_per_edit_values(tiny_llama, tiny_tokenizer) -> None:
    """One batched optimisation gives each edit the same v* as optimising it alone."""
    hp = _hp(v_num_grad_steps=6, v_early_stop_loss=0.0)
    layout = ModelLayout.from_model(tiny_llama)
    templates = ["{}", "the city of . {}", "because i . {}"]
    pad = tiny_tokenizer.pad_token_id

    def solve(requests: list[EditRequest]) -> torch.Tensor:
        rows = key_rows(tiny_tokenizer, requests, templates)
        _, v_init = read_keys_and_output(tiny_llama, layout, rows, len(requests), len(templates), [], 2, pad)
        return compute_target_values(
            tiny_llama, layout, rewrite_rows(tiny_tokenizer, requests, templates),
            kl_rows(tiny_tokenizer, requests), v_init, hp, pad,
        ).targets

    batched = solve(REQUESTS)
    alone = torch.cat([solve([r]) for r in REQUESTS])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


@pytest.mark.parametrize("algo", ["memit", "alphaedit"])
def test_editor_moves_outputs_to_targets(algo: str, tiny_llama, tiny_tokenizer, stats) -> None:
    """After the update the last edited block's output at the subject is much closer to v* than before."""
    # One template: the key the update is solved for is exactly the key the plain prompt produces.
    hp = _hp(algo=algo, mom2_update_weight=0.01, l2=0.01, nullspace_energy=0.5, n_context_templates=0)
    layout = ModelLayout.from_model(tiny_llama)
    editor = Editor(tiny_llama, tiny_tokenizer, hp, stats, "tiny")
    rows = key_rows(tiny_tokenizer, REQUESTS, editor.state.templates)
    read = lambda: read_keys_and_output(  # noqa: E731
        tiny_llama, layout, rows, len(REQUESTS), len(editor.state.templates), [], hp.layers[-1], 0
    )[1].float()
    before = read()
    result = editor.apply(REQUESTS)
    after = read()
    gap_before = (result.targets - before).norm(dim=1)
    gap_after = (result.targets - after).norm(dim=1)
    assert (gap_before > 0.1).all()
    assert (gap_after < 0.5 * gap_before).all(), (gap_before, gap_after)
    assert result.layers == [1, 2]
    assert all(d.left.shape[1] == len(REQUESTS) for d in result.deltas)  # rank <= batch size
    assert set(result.seconds) == {"keys", "values", "solve"}


def test_alphaedit_editor_respects_null_space(tiny_llama, tiny_tokenizer, stats) -> None:
    editor = Editor(tiny_llama, tiny_tokenizer, _hp(algo="alphaedit"), stats, "tiny")
    result = editor.apply(REQUESTS[:2])
    for layer, delta in zip(result.layers, result.deltas, strict=True):
        p = editor.null_space(layer).projector.float()
        dense = delta.dense()
        torch.testing.assert_close(dense @ p, dense, atol=1e-5, rtol=1e-4)  # rows of Delta live in range(P)


def test_state_save_load_round_trip(tmp_path, tiny_llama, tiny_tokenizer, stats) -> None:
    hp = _hp(algo="alphaedit")
    editor = Editor(tiny_llama, tiny_tokenizer, hp, stats, "tiny")
    editor.apply(REQUESTS[:2])
    path = editor.state.save(tmp_path / "state.safetensors")
    loaded = EditorState.load(path)
    assert loaded.templates == editor.state.templates
    assert loaded.edit_ids == editor.state.edit_ids and loaded.n_batches == 1
    for layer in hp.layers:
        assert torch.equal(loaded.prev_keys_cov[layer], editor.state.prev_keys_cov[layer])

    torch.manual_seed(123)
    fresh = type(tiny_llama)(tiny_llama.config).eval()
    Editor(fresh, tiny_tokenizer, hp, stats, "tiny", state=loaded)
    layout = ModelLayout.from_model(fresh)
    for layer in hp.layers:
        assert torch.equal(layout.get_weight(fresh, layer), layout.get_weight(tiny_llama, layer))
    with pytest.raises(ValueError, match="model"):
        Editor(fresh, tiny_tokenizer, hp, stats, "other-model", state=loaded)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_cached_prefix_values_equal_full_forward_values(family: str, request, tiny_tokenizer) -> None:
    """The fast v* path (lower layers and the subject's prefix computed once) follows the full-forward path."""
    model = request.getfixturevalue(family)
    layout = ModelLayout.from_model(model)
    templates = ["{}", "the city of . {}", "because i . {}"]
    rows = key_rows(tiny_tokenizer, REQUESTS, templates)
    _, v_init = read_keys_and_output(model, layout, rows, len(REQUESTS), len(templates), [], 1, 0)
    results = {}
    for cached in (False, True):
        hp = _hp(layers=(0, 1), v_num_grad_steps=6, v_early_stop_loss=0.0, v_prefix_cache=cached)
        results[cached] = compute_target_values(
            model, layout, rewrite_rows(tiny_tokenizer, REQUESTS, templates), kl_rows(tiny_tokenizer, REQUESTS),
            v_init, hp, 0,
        )
    assert results[False].deltas.norm() > 1.0  # the offsets moved: the comparison is not between zeros
    torch.testing.assert_close(results[True].targets, results[False].targets, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[True].nll, results[False].nll, rtol=1e-4, atol=1e-5)


def test_keys_read_once_per_layer_equal_fresh_reads_of_the_edited_model(tiny_llama, tiny_tokenizer, stats) -> None:
    """The edited keys the editor keeps (read while solving, resumed from the cached residual stream) equal keys
    read from scratch on the final edited model, and the reader re-ran fewer blocks than reads from scratch."""
    hp = _hp(algo="alphaedit", layers=(1, 2, 3))
    editor = Editor(tiny_llama, tiny_tokenizer, hp, stats, "tiny")
    result = editor.apply(REQUESTS)
    rows = key_rows(tiny_tokenizer, REQUESTS, editor.state.templates)
    fresh, _ = read_keys_and_output(
        tiny_llama, ModelLayout.from_model(tiny_llama), rows, len(REQUESTS), len(editor.state.templates),
        list(hp.layers), None, 0,
    )
    for layer in hp.layers:
        torch.testing.assert_close(result.edited_keys[layer], fresh[layer].T.float(), rtol=1e-5, atol=1e-6)
    reader = KeyReader(tiny_llama, ModelLayout.from_model(tiny_llama), rows, len(REQUESTS),
                       len(editor.state.templates), 0)
    for layer in hp.layers:
        reader.read(layer, hp.layers[-1])
    from_scratch = len(reader.chunks) * (hp.layers[-1] + 1) * len(hp.layers)
    assert reader.forwarded_blocks < from_scratch


def test_early_stop_rules() -> None:
    """nll: MEMIT's threshold; mpes: every target token the argmax by more than the margin; either: both."""
    from workers.editing.values import _stopped

    nll = torch.tensor([0.01, 0.5, 0.5, 0.01])
    margin = torch.tensor([-0.1, 0.3, 0.05, 2.0])
    assert _stopped(_hp(v_early_stop="nll"), nll, margin).tolist() == [True, False, False, True]
    mpes = _hp(v_early_stop="mpes", v_early_stop_margin=0.1)
    assert _stopped(mpes, nll, margin).tolist() == [False, True, False, True]
    either = _hp(v_early_stop="either", v_early_stop_margin=0.1)
    assert _stopped(either, nll, margin).tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="v_early_stop"):
        _hp(v_early_stop="sometimes")


def test_ultraedit_editor_takes_edits_and_keeps_its_normaliser(tmp_path, tiny_llama, tiny_tokenizer, stats) -> None:
    hp = _hp(algo="ultraedit", layers=(2, 3), ultra_lr=0.5)
    editor = Editor(tiny_llama, tiny_tokenizer, hp, stats, "tiny")
    rows = rewrite_rows(tiny_tokenizer, REQUESTS, ["{}"])

    def target_nll() -> float:
        from workers.editing.values import _FullRows

        terms = _FullRows(tiny_llama, editor.layout, rows, 2, 0).terms(range(len(rows)), torch.zeros(3, 32))
        return float(terms.nll.mean())

    before = target_nll()
    result = editor.apply(REQUESTS)
    assert target_nll() < before - 0.1
    assert result.v_steps == 0 and result.targets.numel() == 0  # no v* optimisation
    assert all(d.left.shape[1] <= sum(len(r.target_ids) for r in rows) for d in result.deltas)
    assert editor.state.moments[2][0] == sum(len(r.target_ids) for r in rows)  # positions counted once
    editor.apply(REQUESTS[:1])
    loaded = EditorState.load(editor.state.save(tmp_path / "state.safetensors"))
    torch.manual_seed(0)  # a follower on the same base model takes the version from its stored deltas and aux
    follower_model = type(tiny_llama)(tiny_llama.config).eval()
    follower = Editor(follower_model, tiny_tokenizer, hp, stats, "tiny")
    follower.apply_deltas(result.deltas, result.aux)
    assert set(result.aux) == {"moments.2", "moments.3"}
    for layer in hp.layers:
        assert torch.equal(follower.state.moments[layer], result.moments[layer])
    for layer in hp.layers:
        assert torch.equal(loaded.moments[layer], editor.state.moments[layer])
    with pytest.raises(ValueError, match="no target values"):
        editor.compute_values(REQUESTS)
