"""Integration on the real SmolLM2-135M-Instruct (CPU): a batch of CounterFact edits takes, and the state
survives a save/load round trip bit for bit."""

from __future__ import annotations

import pytest
import torch

from shared.settings import Settings
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.editor import Editor
from workers.editing.hparams import default_hparams
from workers.editing.layout import ModelLayout
from workers.editing.state import EditorState
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.evaluation.metrics import edit_metrics
from workers.model_io import load_model, model_fingerprint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def edited(smollm2, tmp_path_factory):
    """Apply 10 CounterFact edits with AlphaEdit (SmolLM2's tuned settings) once for the module's tests."""
    model, tokenizer = smollm2
    settings = Settings()
    path = settings.resolved_model_path()
    fingerprint = model_fingerprint(path)
    requests = load_edits(bundled_counterfact_path(), limit=10).requests
    hp = default_hparams(model.config, "alphaedit")
    stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    pre = edit_metrics(model, tokenizer, requests, zsre=False)
    base = {layer: ModelLayout.from_model(model).get_weight(model, layer) for layer in hp.layers}
    editor = Editor(model, tokenizer, hp, stats, fingerprint)
    result = editor.apply(requests)
    post = edit_metrics(model, tokenizer, requests, zsre=False)
    state_path = editor.state.save(tmp_path_factory.mktemp("state") / "state.safetensors")
    yield {"model": model, "tokenizer": tokenizer, "pre": pre, "post": post, "editor": editor,
           "result": result, "state_path": state_path, "base": base, "stats": stats, "fingerprint": fingerprint}
    layout = ModelLayout.from_model(model)
    for layer, weight in base.items():  # leave the session model unedited for other modules
        layout.set_weight(model, layer, weight)


def test_batch_of_ten_edits_takes_and_keeps_neighbours(edited) -> None:
    pre, post = edited["pre"], edited["post"]
    assert pre.efficacy <= 0.5  # the model did not already prefer the new targets
    assert post.efficacy >= 0.9
    assert post.generalization >= 0.6
    assert post.specificity >= pre.specificity - 0.1


def test_update_is_low_rank_and_only_touches_edited_layers(edited) -> None:
    result, model = edited["result"], edited["model"]
    layout = ModelLayout.from_model(model)
    assert result.layers == list(edited["editor"].hparams.layers)
    for layer, delta in zip(result.layers, result.deltas, strict=True):
        assert delta.is_low_rank and delta.rank <= 10
        torch.testing.assert_close(
            layout.get_weight(model, layer) - edited["base"][layer], delta.dense(), rtol=1e-4, atol=1e-6
        )


def test_saved_state_reloads_identical_weights(edited) -> None:
    model = edited["model"]
    state = EditorState.load(edited["state_path"])
    fresh, tokenizer = load_model(Settings().resolved_model_path(), device="cpu")
    Editor(fresh, tokenizer, state.hparams, edited["stats"], edited["fingerprint"], state=state)
    live = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(param, live[name]), name
    assert state.edit_ids == edited["editor"].state.edit_ids


@pytest.fixture(scope="module")
def value_batch(smollm2):
    """A fixed batch of 6 CounterFact edits, its rows and v_init on the unedited SmolLM2."""
    from workers.editing.keys import read_keys_and_output
    from workers.editing.prompts import key_rows, kl_rows, rewrite_rows

    model, tokenizer = smollm2
    requests = load_edits(bundled_counterfact_path(), limit=6).requests
    templates = ["{}", "The following is true. {}"]
    layout = ModelLayout.from_model(model)
    hp = default_hparams(model.config, "alphaedit")
    rows = key_rows(tokenizer, requests, templates)
    _, v_init = read_keys_and_output(model, layout, rows, len(requests), len(templates), [], hp.layers[-1],
                                     tokenizer.pad_token_id)
    return {"requests": requests, "layout": layout, "hp": hp, "v_init": v_init,
            "rewrite": rewrite_rows(tokenizer, requests, templates), "kl": kl_rows(tokenizer, requests)}


def _values(smollm2, batch, **overrides):
    from workers.editing.values import compute_target_values

    model, tokenizer = smollm2
    hp = batch["hp"].with_overrides(**overrides)
    return compute_target_values(model, batch["layout"], batch["rewrite"], batch["kl"], batch["v_init"], hp,
                                 tokenizer.pad_token_id)


def test_cached_prefix_values_equal_full_forward_values_on_smollm2(smollm2, value_batch) -> None:
    fixed = dict(v_num_grad_steps=8, v_early_stop_loss=0.0, v_dtype="float32")
    full = _values(smollm2, value_batch, v_prefix_cache=False, **fixed)
    cached = _values(smollm2, value_batch, v_prefix_cache=True, **fixed)
    assert full.deltas.norm(dim=1).min() > 1.0
    torch.testing.assert_close(cached.targets, full.targets, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(cached.nll, full.nll, rtol=1e-3, atol=1e-3)


def test_bf16_values_give_the_float32_edit_outcome(smollm2, value_batch) -> None:
    """bf16 steps reach the same targets: every edit's NLL under the threshold both ways, offsets close."""
    f32 = _values(smollm2, value_batch, v_dtype="float32")
    bf16 = _values(smollm2, value_batch, v_dtype="bfloat16")
    assert (f32.nll < 0.05).all() and (bf16.nll < 0.05).all()
    # An edit already at its target before any step keeps a zero offset; one at the threshold may take a step in
    # one precision and none in the other. Every edit that moved in both must have moved the same way.
    moved = (f32.deltas.norm(dim=1) > 1.0) & (bf16.deltas.norm(dim=1) > 1.0)
    assert moved.sum() >= 4
    cos = torch.nn.functional.cosine_similarity(f32.deltas[moved], bf16.deltas[moved], dim=1)
    assert cos.min() > 0.9, cos
    ratio = bf16.deltas[moved].norm(dim=1) / f32.deltas[moved].norm(dim=1)
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio
    model = smollm2[0]
    assert model.config._attn_implementation == "sdpa"  # the eager attention of bf16 CPU steps was restored


def test_bf16_edits_take_like_float32_edits(smollm2) -> None:
    """The whole edit (v*, spread, AlphaEdit solve) with bf16 steps: the same edits take as with float32."""
    model, tokenizer = smollm2
    settings = Settings()
    path = settings.resolved_model_path()
    fingerprint = model_fingerprint(path)
    requests = load_edits(bundled_counterfact_path(), limit=12).requests[6:]
    layout = ModelLayout.from_model(model)
    outcomes = {}
    for dtype in ("float32", "bfloat16"):
        hp = default_hparams(model.config, "alphaedit").with_overrides(v_dtype=dtype)
        stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
            n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
        base = {layer: layout.get_weight(model, layer) for layer in hp.layers}
        try:
            Editor(model, tokenizer, hp, stats, fingerprint).apply(requests)
            outcomes[dtype] = edit_metrics(model, tokenizer, requests, zsre=False)
        finally:
            for layer, weight in base.items():
                layout.set_weight(model, layer, weight)
    assert outcomes["float32"].efficacy == outcomes["bfloat16"].efficacy == 1.0
    assert abs(outcomes["float32"].generalization - outcomes["bfloat16"].generalization) <= 1 / 6 + 1e-9
