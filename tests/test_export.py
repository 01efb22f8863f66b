"""Versions as artifacts (workers/export.py): an exported HF directory loads with plain transformers and holds exactly
the committed matrices, so it answers like the editor's model at that version; a delta export holds only the changed
matrices; every file is checksummed and the edits it contains are listed (reverted ones apart)."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from shared.delta import tensor_sha256, to_checkpoint_orientation
from shared.weight_store import LocalWeightStore, build_manifest
from tests.test_compaction import _editor
from tests.test_guards import REQUESTS
from tests.test_undo import _store_versions
from workers.export import EXPORT_MANIFEST, ExportError, export_version


@pytest.fixture
def committed(tmp_path, tiny_llama, tiny_tokenizer, tiny_model_dir):
    """Two versions of edits on the tiny Llama (the model saved in ``tiny_model_dir``) in a real store."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    editor = _editor(tmp_path, model, tiny_tokenizer)
    store = LocalWeightStore(tmp_path / "store")
    _store_versions(editor, store)
    return editor, store


def test_an_hf_export_loads_with_transformers_and_answers_like_the_version(committed, tmp_path, tiny_model_dir):
    editor, store = committed
    out = tmp_path / "export-v2"
    manifest = export_version(store, tiny_model_dir, 2, out, "hf")
    assert manifest.lineage == [1, 2] and [e.edit_id for e in manifest.edits] == [r.edit_id for r in REQUESTS]
    recorded = json.loads((out / EXPORT_MANIFEST).read_text())
    for name, sha in recorded["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no editq
    layout = editor.layout
    for layer, weight in editor.state.weights.items():
        name = layout.weight_name(layer)
        assert tensor_sha256(layout.get_weight(exported, layer)) == manifest.matrices[name]
        assert torch.equal(layout.get_weight(exported, layer), weight)
    prompts = [r.text for r in REQUESTS]
    batch = editor.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = editor.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        theirs = exported.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    untouched = [n for n, _ in base.named_parameters() if n not in manifest.matrices]
    assert untouched and all(torch.equal(dict(base.named_parameters())[n], dict(exported.named_parameters())[n])
                             for n in untouched)
    with pytest.raises(ExportError, match="not empty"):
        export_version(store, tiny_model_dir, 2, out, "hf")


def test_a_delta_export_holds_only_the_changed_matrices(committed, tmp_path, tiny_model_dir) -> None:
    editor, store = committed
    out = tmp_path / "delta-v2"
    manifest = export_version(store, tiny_model_dir, 2, out, "delta")
    with safe_open(str(out / "delta.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        for layer, weight in editor.state.weights.items():
            name = editor.layout.weight_name(layer)
            transposed = editor.layout.is_transposed(editor.model, layer)
            assert torch.equal(handle.get_tensor(name), to_checkpoint_orientation(weight, transposed))
    assert names == set(manifest.matrices) == {editor.layout.weight_name(layer) for layer in editor.state.weights}
    assert set(manifest.files) == {"delta.safetensors"}


def test_reverted_edits_are_listed_apart(committed, tmp_path, tiny_model_dir) -> None:
    from workers.editing.compaction import compact, live_edits

    editor, store = committed
    gone = REQUESTS[0].edit_id
    done = compact(copy.copy(editor), live_edits(store, 2, exclude=[gone]), max_lost=None)
    store.put(build_manifest(3, 2, "tiny", [], "alphaedit", done.result.deltas, editor.checksums(), kind="revert",
                             reverted_edit_ids=[gone]), done.result.deltas, done.result.aux)
    manifest = export_version(store, tiny_model_dir, 3, tmp_path / "v3", "delta")
    assert manifest.reverted_edit_ids == [gone] and gone not in [e.edit_id for e in manifest.edits]
