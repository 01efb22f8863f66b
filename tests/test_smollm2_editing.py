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
