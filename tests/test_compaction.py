"""Compaction (workers/editing/compaction.py): all live edits re-solved jointly on the base weights.

On a tiny model: the compacted matrices are exactly one joint solve of the live edits' stored v* on the base; a
follower that applies the version's delta and aux holds identical matrices and C_prev; a refused compaction leaves
everything as it was; the store gives back every edit with its v*. Slow: on SmolLM2, compaction of sequential
batches keeps every edit that took.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from shared.schemas import EditRequest
from shared.weight_store import LocalWeightStore, StoreError, build_manifest
from tests.test_guards import REQUESTS
from tests.test_hybrid import CORPUS, _hp
from workers.editing.compaction import CompactionRefused, LiveEdits, compact, live_edits
from workers.editing.editor import Editor
from workers.editing.results import COMPACTED_AUX, TARGETS_AUX
from workers.editing.stats import SecondMomentCache, StatsCorpus


def _editor(tmp_path, model, tokenizer, algo: str = "alphaedit", templates=None) -> Editor:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    stats = SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))
    return Editor(model, tokenizer, _hp(algo=algo), stats, "tiny", templates=templates)


def _sequential(editor: Editor) -> list[tuple[EditRequest, torch.Tensor]]:
    pairs = []
    for request in REQUESTS:  # one edit per batch: the most sequential pile
        out = editor.apply([request])
        pairs += list(zip([request], out.targets, strict=True))
    return pairs


@pytest.mark.parametrize("algo", ["alphaedit", "memit", "alphaedit_hybrid"])
def test_compaction_is_one_joint_solve_on_the_base(tmp_path, tiny_llama, tiny_tokenizer, algo) -> None:
    editor = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer, algo)
    base = {layer: w.clone() for layer, w in editor.state.weights.items()}
    pairs = _sequential(editor)
    live = LiveEdits.latest(pairs)
    done = compact(editor, live, max_lost=None)
    assert done.result.compacted and done.result.edit_ids == []
    assert COMPACTED_AUX in done.result.aux and TARGETS_AUX not in done.result.aux

    # The same edits with the same v*, solved as one batch on a fresh copy of the base model.
    joint = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer, algo, templates=editor.state.templates)
    joint.prepare()
    reader = joint.reader(live.requests)
    hp = joint.hparams
    first = reader.read(hp.layers[0], hp.layers[-1])
    solved = joint.solve_layers(live.requests, live.targets, {}, reader, first)
    for delta, layer in zip(solved.deltas, hp.layers, strict=True):
        expected = delta.apply(base[layer])
        torch.testing.assert_close(editor.state.weights[layer], expected, rtol=1e-6, atol=1e-6)  # a few float32 ulps
        assert not torch.equal(editor.state.weights[layer], base[layer])
    # C_prev now holds exactly the live edits' keys on the compacted model.
    for layer, keys in done.result.edited_keys.items():
        assert keys.shape[1] == len(live)
        torch.testing.assert_close(editor.state.prev_keys_cov[layer], keys.double() @ keys.double().T)


def test_a_follower_applies_a_compaction_bit_for_bit(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    leader = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer)
    follower = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer, templates=leader.state.templates)
    for request in REQUESTS:
        out = leader.apply([request])
        follower.apply_deltas(out.deltas, out.aux)
    done = compact(leader, LiveEdits.latest(
        [(r, t) for r, t in zip(REQUESTS, [leader.compute_values([r]).targets[0] for r in REQUESTS], strict=True)]
    ), max_lost=None)
    follower.apply_deltas(done.result.deltas, done.result.aux)
    assert follower.checksums() == leader.checksums()
    for layer, cov in leader.state.prev_keys_cov.items():
        assert torch.equal(follower.state.prev_keys_cov[layer], cov)  # replaced, not added to


def test_a_refused_compaction_changes_nothing(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    editor = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer)
    pairs = _sequential(editor)
    weights = {layer: w.clone() for layer, w in editor.state.weights.items()}
    covs = {layer: c.clone() for layer, c in editor.state.prev_keys_cov.items()}
    live_model = {n: p.clone() for n, p in editor.model.named_parameters()}

    def refuse(model) -> None:
        raise RuntimeError("past the budget")

    with pytest.raises(RuntimeError, match="budget"):
        compact(editor, LiveEdits.latest(pairs), accept=refuse)
    with pytest.raises(ValueError, match="targets for"):
        compact(editor, LiveEdits([r for r, _ in pairs], torch.zeros(1, 4)))
    for layer, w in weights.items():
        assert torch.equal(editor.state.weights[layer], w)
        assert torch.equal(editor.state.prev_keys_cov[layer], covs[layer])
    for name, param in editor.model.named_parameters():
        assert torch.equal(param, live_model[name]), name


def test_the_latest_edit_of_a_prompt_is_the_live_one() -> None:
    a = REQUESTS[0]
    b = a.model_copy(update={"target_new": "rome", "edit_id": "later"})
    c = REQUESTS[1]
    live = LiveEdits.latest([(a, torch.zeros(4)), (c, torch.ones(4)), (b, torch.full((4,), 2.0))])
    assert [r.edit_id for r in live.requests] == [c.edit_id, "later"]
    assert live.targets[:, 0].tolist() == [1.0, 2.0]


def test_live_edits_come_back_from_the_store(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    editor = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer)
    store = LocalWeightStore(tmp_path / "store")
    parent = 0
    for version, batch in enumerate((REQUESTS[:1], REQUESTS[1:]), start=1):
        out = editor.apply(batch)
        manifest = build_manifest(version, parent, "tiny", out.edit_ids, "alphaedit", out.deltas,
                                  editor.checksums(), edits=list(batch))
        store.put(manifest, out.deltas, out.aux)
        parent = version
    live = live_edits(store, parent)
    assert [r.edit_id for r in live.requests] == [r.edit_id for r in REQUESTS]
    assert live.targets.shape == (len(REQUESTS), tiny_llama.config.hidden_size)
    # A version written without its edits (older stores) cannot be compacted, and says so.
    out = editor.apply(REQUESTS[:1])
    store.put(build_manifest(3, 2, "tiny", out.edit_ids, "alphaedit", out.deltas, editor.checksums()),
              out.deltas, out.aux)
    with pytest.raises(StoreError, match="cannot be compacted"):
        live_edits(store, 3)


@pytest.mark.slow
def test_compaction_on_smollm2_keeps_every_edit_that_took(smollm2) -> None:
    """3 sequential batches of 8 CounterFact edits with the shipped AlphaEdit settings, then compaction: every
    edit that took before takes after, and the model is restored exactly afterwards."""
    from shared.settings import Settings
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.editing.hparams import default_hparams
    from workers.editing.layout import ModelLayout
    from workers.model_io import model_fingerprint

    model, tokenizer = smollm2
    cfg = Settings()
    fingerprint = model_fingerprint(cfg.resolved_model_path())
    requests = load_edits(bundled_counterfact_path(), limit=24).requests
    hp = default_hparams(model.config, "alphaedit")
    layout = ModelLayout.from_model(model)
    base = {layer: layout.get_weight(model, layer).clone() for layer in hp.layers}
    stats = SecondMomentCache(cfg.stats_dir, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    try:
        editor = Editor(model, tokenizer, hp, stats, fingerprint)
        pairs = []
        for i in range(0, 24, 8):
            out = editor.apply(requests[i : i + 8])
            pairs += list(zip(requests[i : i + 8], out.targets, strict=True))
        live = LiveEdits.latest(pairs)
        before = editor.checksums()
        # v* that promise nothing (zeros) make the edits stop taking: refused, the editor unchanged.
        with pytest.raises(CompactionRefused, match="would lose"):
            compact(editor, LiveEdits(live.requests, torch.zeros_like(live.targets)), max_lost=0)
        assert editor.checksums() == before
        done = compact(editor, live, max_lost=None)
        assert sum(done.took_before) >= 18  # the sequential edits mostly took
        assert done.lost == [], f"compaction lost {done.lost}"
        assert done.efficacy() >= done.efficacy(after=False)
    finally:
        for layer, weight in base.items():
            layout.set_weight(model, layer, weight)


def test_the_pipeline_compacts_periodically_and_on_request(ray_session, redis_url, tiny_model_dir, tmp_path) -> None:
    """Two edit versions, then a periodic compaction (version 3, no edits of its own, every edit still applied once);
    ``editq compact``'s request makes another one. Workers rebuild the compacted versions bit for bit."""
    import asyncio

    from controller.pipeline.compaction import request_compaction
    from controller.pipeline.runtime import start_controller, stop_controller
    from shared.streams import EditStreams
    from shared.weight_store import rebuild
    from tests.pipeline_helpers import Probe, pipeline_settings, tiny_requests
    from tests.test_pipeline import _submit

    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, batch_max_size=2,
                                 compact_every_versions=2, compact_max_lost=None)
    probe = Probe(settings)
    requests = tiny_requests(4)
    _submit(settings, requests)
    actor, run_ref = start_controller(settings)
    try:
        states = probe.wait_terminal([r.edit_id for r in requests])
        assert set(states.values()) == {"applied"}
        deadline = time.monotonic() + 120
        while probe.head() < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        compaction = probe.store.manifest(3)
        assert compaction.kind == "compaction" and compaction.edit_ids == [] and compaction.parent == 2
        assert compaction.metrics["compaction_edits"] == 4
        edited = [m for m in probe.committed_manifests() if m.kind == "edit"]
        assert sorted(e for m in edited for e in m.edit_ids) == sorted(r.edit_id for r in requests)
        assert all(len(m.edits) == len(m.edit_ids) for m in edited)

        async def ask() -> None:
            streams = EditStreams.from_url(settings.redis_url, settings.namespace)
            await request_compaction(streams, "test")
            await streams.close()

        asyncio.run(ask())
        while probe.head() < 4 and time.monotonic() < deadline + 60:
            time.sleep(0.5)
        assert probe.store.manifest(4).kind == "compaction"
    finally:
        stop_controller(actor, run_ref)
    from workers.model_io import load_model

    model, _ = load_model(tiny_model_dir, device="cpu")
    base = {name: p.detach().float() for name, p in model.state_dict().items()}
    rebuilt = rebuild(probe.store, base, 4)  # verifies every matrix against its manifest checksum
    assert rebuilt
    probe.cleanup()
