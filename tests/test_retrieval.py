"""RECIPE retrieval tier: sentinel threshold, prompt injection, Redis durability, and the shipped checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shared.schemas import EditRequest, Probe
from workers.retrieval.index import KnowledgeIndex
from workers.retrieval.injection import embed_prompted, prompt_embeds
from workers.retrieval.modules import RecipeConfig, RecipeModel
from workers.retrieval.repository import CheckpointMismatchError, KnowledgeRepository
from workers.retrieval.tier import default_checkpoint_path
from workers.retrieval.training import TrainSettings, _hinged_nll, _rows_for, edit_losses

REDIS_URL = "redis://127.0.0.1:6379/0"


def _unit(i: int, dim: int = 4) -> torch.Tensor:
    v = torch.zeros(dim)
    v[i] = 1.0
    return v


# --------------------------------------------------------------------------------------------- sentinel / index


def test_sentinel_is_a_query_dependent_threshold() -> None:
    index = KnowledgeIndex(sentinel_key=_unit(3), scale=10.0)
    assert index.lookup(_unit(0)) is None  # nothing stored: always a miss
    index.add("a", _unit(0), torch.full((3, 2), 1.0))
    index.add("b", _unit(1), torch.full((3, 2), 2.0))
    hit = index.lookup(_unit(0))
    assert hit is not None and hit.edit_id == "a"
    assert hit.score == pytest.approx(10.0) and hit.sentinel_score == pytest.approx(0.0)
    assert torch.equal(hit.prompt, torch.full((3, 2), 1.0))
    # A query closest to the sentinel is rejected although "a"/"b" are its best stored items.
    assert index.lookup(_unit(3) + 0.2 * _unit(1)) is None
    # A tie goes to the sentinel (strictly greater is required).
    assert index.lookup((_unit(0) + _unit(3)) / math.sqrt(2)) is None
    # The offset raises the threshold for every query alike.
    strict = KnowledgeIndex(sentinel_key=_unit(3), scale=10.0, sentinel_offset=10.5)
    strict.add("a", _unit(0), torch.zeros(3, 2))
    assert strict.lookup(_unit(0)) is None
    results = index.search(torch.stack([_unit(1), _unit(3)]))
    assert [(r.edit_id, r.accepted) for r in results] == [("b", True), ("a", False)]


def test_index_remove_keeps_rows_consistent() -> None:
    index = KnowledgeIndex(sentinel_key=_unit(7, 8), scale=1.0, initial_capacity=2)  # grows past its capacity
    for i in range(6):
        index.add(f"e{i}", _unit(i, 8), torch.full((1, 1), float(i)))
    assert index.remove("e1") and index.remove("e4") and not index.remove("e4")
    assert len(index) == 4 and "e1" not in index and index.keys.shape == (4, 8)
    for i in (0, 2, 3, 5):  # rows moved on removal still belong to their ids
        hit = index.lookup(_unit(i, 8))
        assert hit is not None and hit.edit_id == f"e{i}" and hit.prompt.item() == float(i)
    assert index.lookup(_unit(1, 8)) is None and index.lookup(_unit(4, 8)) is None
    index.add("e2", _unit(6, 8), torch.full((1, 1), 9.0))  # re-adding an id replaces key and prompt
    assert len(index) == 4 and index.lookup(_unit(2, 8)) is None
    hit = index.lookup(_unit(6, 8))
    assert hit is not None and hit.edit_id == "e2" and hit.prompt.item() == 9.0


def test_hinged_sentinel_loss_stops_once_the_sentinel_wins() -> None:
    winning = torch.tensor([[0.0, 0.0, 5.0]]).log_softmax(1)
    losing = torch.tensor([[5.0, 0.0, 0.0]]).log_softmax(1)
    assert _hinged_nll(winning, 1.2).item() == 0.0
    assert _hinged_nll(losing, 1.2).item() > 4.0
    both = torch.cat([winning, losing])
    assert _hinged_nll(both, 1.2).item() == pytest.approx(_hinged_nll(losing, 1.2).item() / 2)


# --------------------------------------------------------------------------------------------- injection


def test_injection_places_prompt_before_query(tiny_llama, tiny_tokenizer) -> None:
    emb = tiny_llama.get_input_embeddings()
    hidden = tiny_llama.config.hidden_size
    rows = [tiny_tokenizer("the capital of france is")["input_ids"], tiny_tokenizer("paris")["input_ids"]]
    prompt = torch.randn(3, hidden)
    batch = embed_prompted(emb, rows, [prompt, None])
    assert batch.inputs_embeds.shape == (2, 3 + len(rows[0]), hidden)
    assert batch.offsets == [3, 0] and batch.lengths == [3 + len(rows[0]), len(rows[1])]
    assert torch.equal(batch.inputs_embeds[0, :3], prompt)
    assert torch.equal(batch.inputs_embeds[0, 3:], emb(torch.tensor(rows[0])))
    assert torch.equal(batch.inputs_embeds[1, : len(rows[1])], emb(torch.tensor(rows[1])))
    assert batch.attention_mask[1].tolist() == [1] * len(rows[1]) + [0] * (batch.inputs_embeds.shape[1] - len(rows[1]))
    single = prompt_embeds(emb, torch.tensor(rows[0]), prompt)
    assert torch.equal(single, batch.inputs_embeds[0])
    assert torch.equal(prompt_embeds(emb, rows[0], None), emb(torch.tensor(rows[0])))
    with pytest.raises(ValueError, match="prompt must be"):
        embed_prompted(emb, rows[:1], [torch.randn(3, hidden + 1)])


def test_injected_prompt_is_causal_padding_free_and_effective(tiny_llama, tiny_tokenizer) -> None:
    ids = tiny_tokenizer("the capital of france is")["input_ids"]
    emb = tiny_llama.get_input_embeddings()
    plain = tiny_llama(input_ids=torch.tensor([ids])).logits[0]
    unprompted = tiny_llama(inputs_embeds=prompt_embeds(emb, ids, None)[None]).logits[0]
    torch.testing.assert_close(unprompted, plain)  # the inputs_embeds path is the token path
    prompt = torch.randn(2, tiny_llama.config.hidden_size)
    batch = embed_prompted(emb, [ids, ids[:2]], [prompt, prompt])
    out = tiny_llama(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    alone = tiny_llama(inputs_embeds=prompt_embeds(emb, ids, prompt)[None]).logits[0]
    torch.testing.assert_close(out[0], alone, atol=1e-5, rtol=1e-4)  # right padding changes nothing
    prompt_only = tiny_llama(inputs_embeds=prompt[None]).logits[0]
    torch.testing.assert_close(alone[:2], prompt_only, atol=1e-5, rtol=1e-4)  # the prompt comes first (causal)
    assert not torch.allclose(alone[2:], plain, atol=1e-3)  # and it does change the query's logits


def _tiny_edit() -> EditRequest:
    return EditRequest(
        subject="france",
        prompt="the capital of {} is",
        target_new="rome",
        target_true="paris",
        paraphrase_prompts=["the city of france is"],
        neighborhood_prompts=[Probe(prompt="the capital of germany is", target="berlin")],
    )


def test_edit_losses_train_the_heads_not_the_llm(tiny_llama, tiny_tokenizer, tmp_path: Path) -> None:
    hidden = tiny_llama.get_input_embeddings().weight.shape[1]
    recipe = RecipeModel(RecipeConfig(llm_hidden=hidden, feature_dim=12, encoder_hidden=4, rep_dim=8))
    recipe.set_embed_rms(tiny_llama.get_input_embeddings().weight)
    settings = TrainSettings(
        data=tmp_path,
        out=tmp_path / "c.safetensors",
        work_dir=tmp_path,
        model_path=tmp_path,
        encoder_path=tmp_path,
        prompt_tokens=3,
        edit_hinge_scale=None,
    )
    keys = recipe.knowledge_keys(torch.randn(2, 12))
    losses = edit_losses(recipe, tiny_llama, tiny_tokenizer, [_tiny_edit(), _tiny_edit()], keys, settings)
    assert set(losses) == {"rel", "gen", "loc_kl"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loc_kl"].item() >= 0
    sum(losses.values()).backward()
    assert recipe.prompt_head.out.weight.grad is not None and recipe.prompt_head.out.weight.grad.abs().sum() > 0
    assert recipe.key_head.inp.weight.grad is not None
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_hybrid_training_rows_carry_the_served_statement_text(tiny_llama, tiny_tokenizer, tmp_path: Path) -> None:
    """``injection="hybrid"`` trains on what a hit serves: statement text in front of the edit and paraphrase rows
    (exactly the served prefix ids), none on the locality rows; the paraphrase rotates with the step."""
    from workers.retrieval.evaluation import statement
    from workers.retrieval.injection import text_prefix_ids

    edit = _tiny_edit().model_copy(update={"paraphrase_prompts": ["paris is the capital of", "the french capital is"]})
    plain = _rows_for(tiny_tokenizer, [edit], "prompt", step=0)
    prefix = text_prefix_ids(tiny_tokenizer, statement(edit))
    assert prefix, "the statement must tokenise to something"
    for step in (0, 1):
        hybrid = _rows_for(tiny_tokenizer, [edit], "hybrid", step=step)
        by_kind = {r.kind: r for r in hybrid}
        gen_text = edit.paraphrase_prompts[step]
        gen_ids = tiny_tokenizer(gen_text)["input_ids"]
        assert by_kind["gen"].ids[: len(prefix) + len(gen_ids)] == prefix + gen_ids
        assert by_kind["rel"].ids == prefix + plain[0].ids
        assert by_kind["loc"].ids == plain[2].ids and by_kind["ref"].ids == plain[3].ids
        assert [r.targets for r in hybrid] == [r.targets for r in _rows_for(tiny_tokenizer, [edit], "prompt", step)]
    hidden = tiny_llama.get_input_embeddings().weight.shape[1]
    recipe = RecipeModel(RecipeConfig(llm_hidden=hidden, feature_dim=12, encoder_hidden=4, rep_dim=8))
    recipe.set_embed_rms(tiny_llama.get_input_embeddings().weight)
    settings = TrainSettings(data=tmp_path, out=tmp_path / "c.safetensors", work_dir=tmp_path, model_path=tmp_path,
                             encoder_path=tmp_path, injection="hybrid")
    losses = edit_losses(recipe, tiny_llama, tiny_tokenizer, [edit], recipe.knowledge_keys(torch.randn(1, 12)),
                         settings)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="injection"):
        TrainSettings(data=tmp_path, out=tmp_path, work_dir=tmp_path, model_path=tmp_path, encoder_path=tmp_path,
                      injection="text")


def test_recipe_model_roundtrip_and_sizes(tmp_path: Path) -> None:
    recipe = RecipeModel(RecipeConfig(llm_hidden=32, feature_dim=12, encoder_hidden=4, rep_dim=8, prompt_tokens=3))
    feats = torch.randn(5, 12)
    # MLP_Q starts as a copy of MLP_K: a fresh tier scores pairs by the encoder's similarity.
    torch.testing.assert_close(recipe.query_keys(feats), recipe.knowledge_keys(feats))
    assert recipe.prompts(recipe.knowledge_keys(feats)).shape == (5, 3, 32)
    recipe.save(tmp_path / "r.safetensors", {"note": "x"})
    loaded, meta = RecipeModel.load(tmp_path / "r.safetensors")
    assert meta["note"] == "x" and loaded.config == recipe.config
    torch.testing.assert_close(
        loaded.prompts(loaded.knowledge_keys(feats)), recipe.prompts(recipe.knowledge_keys(feats))
    )


def test_shipped_checkpoint_is_small_and_recorded() -> None:
    path = default_checkpoint_path()
    assert path.is_file(), f"{path} is not shipped"
    assert path.stat().st_size < 15 * 1024 * 1024
    _, meta = RecipeModel.load(path)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["bytes"] == path.stat().st_size and record["model_fingerprint"] == meta["model_fingerprint"]
    for name in ("reliability", "generality", "locality", "rel_hit", "gen_hit", "loc_reject"):
        assert 0.0 <= record["val"]["100"][name] <= 1.0


# --------------------------------------------------------------------------------------------- Redis repository


def _repo(prefix: str, checkpoint: str = "ckpt-1") -> KnowledgeRepository:
    return KnowledgeRepository(_unit(3), 10.0, 0.0, (3, 2), checkpoint, url=REDIS_URL, prefix=prefix)


def test_repository_is_durable_and_shared(redis_prefix: str) -> None:
    first = _repo(redis_prefix)
    edit = _tiny_edit()
    first.add(edit, "the capital of france is rome", _unit(0), torch.full((3, 2), 0.5))
    assert first.lookup(_unit(0)) is not None
    second = _repo(redis_prefix)  # a new router (or a restart) loads what is stored
    hit = second.lookup(_unit(0))
    assert hit is not None and hit.edit_id == edit.edit_id
    assert torch.equal(hit.prompt, torch.full((3, 2), 0.5))
    assert hit.statement == "the capital of france is rome"  # text and hybrid injection put it in front
    stored = second.entry(str(edit.edit_id))
    assert stored is not None and stored.edit.target_new == "rome" and stored.statement.endswith("rome")
    other = edit.model_copy(update={"edit_id": "other-1"})
    second.add(other, "x", _unit(1), torch.zeros(3, 2))
    assert first.refresh() == 1 and "other-1" in first  # replayed from the change log
    replayed = first.lookup(_unit(1), refresh=False)
    assert replayed is not None and replayed.statement == "x"
    assert first.retire(str(edit.edit_id)) and not first.retire(str(edit.edit_id))
    second.refresh()
    assert first.lookup(_unit(0), refresh=False) is None and second.lookup(_unit(0), refresh=False) is None
    assert _repo(redis_prefix).lookup(_unit(1)) is not None and len(_repo(redis_prefix)) == 1
    with pytest.raises(CheckpointMismatchError):
        _repo(redis_prefix, checkpoint="ckpt-2")


def test_repository_reloads_when_the_log_was_trimmed(redis_prefix: str) -> None:
    reader = _repo(redis_prefix)
    writer = _repo(redis_prefix)
    writer.add(_tiny_edit(), "s", _unit(0), torch.zeros(3, 2))
    reader.refresh()
    for i in range(3):
        writer.add(_tiny_edit().model_copy(update={"edit_id": f"n{i}"}), "s", _unit(1), torch.zeros(3, 2))
    writer.redis.xtrim(f"{redis_prefix}:log", maxlen=1, approximate=False)
    reader.refresh()
    assert len(reader) == 4 and all(f"n{i}" in reader for i in range(3))


# --------------------------------------------------------------------------------------------- shipped checkpoint


@pytest.mark.slow
def test_shipped_checkpoint_holds_100_val_edits(smollm2, redis_prefix: str) -> None:
    """100 bundled CounterFact val edits held only in the tier (Redis-backed) on SmolLM2, against the JSON."""
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.retrieval.evaluation import evaluate_tier
    from workers.retrieval.tier import RetrievalTier

    model, tokenizer = smollm2
    edits = load_edits(bundled_counterfact_path(), limit=100).requests
    tier = RetrievalTier.load(redis_url=REDIS_URL, prefix=redis_prefix)
    tier.add_many(edits)
    again = RetrievalTier.load(redis_url=REDIS_URL, prefix=redis_prefix)
    assert len(again) == 100
    # Redis-backed lookups agree with the in-memory evaluation's decisions.
    hits = [again.lookup(e.text) for e in edits[:20]]
    own = sum(h is not None and h.edit_id == e.edit_id for h, e in zip(hits, edits[:20], strict=True))
    val = json.loads(default_checkpoint_path().with_suffix(".json").read_text())["val"]
    recorded = val["100"]
    # The record's numbers are for the injection the checkpoint was trained (and is served) with.
    metrics = evaluate_tier(tier.recipe, tier.encoder, model, tokenizer, edits, diagnostics=False,
                            injection=val.get("injection", "prompt"))
    assert own / 20 >= recorded["rel_hit"] - 0.1
    for name in ("reliability", "generality", "locality", "rel_hit", "gen_hit", "loc_reject"):
        assert getattr(metrics, name) >= recorded[name] - 0.05, (name, metrics.as_dict(), recorded)
    # A hit's prompt goes in front of the query; a retired edit is no longer returned.
    edit = next(e for e, h in zip(edits, hits, strict=False) if h is not None and h.edit_id == e.edit_id)
    hit = again.lookup(edit.text)
    ids = tokenizer(edit.text)["input_ids"]
    embeds = again.prompt_embeds(model.get_input_embeddings(), ids, hit)
    assert embeds.shape == (tier.recipe.config.prompt_tokens + len(ids), model.config.hidden_size)
    assert again.retire(str(edit.edit_id))
    tier.store.refresh()
    for router in (again, tier):
        after = router.lookup(edit.text)
        assert after is None or after.edit_id != edit.edit_id
