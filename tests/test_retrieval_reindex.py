"""A checkpoint upgrade on a live tier (workers/retrieval/reindex.py), on real Redis: the stored edits are
re-encoded for the new heads, readers with the old heads keep serving their copy, writers with them are refused,
and an edit written during the migration is not lost."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from shared.schemas import EditRequest, Probe
from workers.retrieval.repository import CheckpointMismatchError, KnowledgeRepository

REDIS_URL = "redis://127.0.0.1:6379/0"
SHAPE = (3, 2)


def _unit(i: int, dim: int = 4) -> torch.Tensor:
    v = torch.zeros(dim)
    v[i] = 1.0
    return v


def _edit(i: int) -> EditRequest:
    return EditRequest(edit_id=f"e{i}", subject=f"subject {i}", prompt="{} works for", target_new=f"company {i}",
                       target_true="nobody", neighborhood_prompts=[Probe(prompt="x works for", target="y")])


def _repo(prefix: str, checkpoint: str, reencode=None) -> KnowledgeRepository:
    return KnowledgeRepository(_unit(3), 10.0, 0.0, SHAPE, checkpoint, url=REDIS_URL, prefix=prefix,
                               reencode=reencode)


def _new_heads(edits: Sequence[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """The "new checkpoint": edit i gets key unit((i + 1) % 3) and a prompt full of 10 + i."""
    ids = [int(str(e.edit_id)[1:]) for e in edits]
    keys = torch.stack([_unit((i + 1) % 3) for i in ids])
    return keys, torch.stack([torch.full(SHAPE, 10.0 + i) for i in ids])


def test_a_new_checkpoint_takes_over_the_prefix_without_losing_an_edit(redis_prefix: str) -> None:
    old = _repo(redis_prefix, "ckpt-1")
    for i in range(3):
        old.add(_edit(i), f"statement {i}", _unit(i), torch.zeros(SHAPE))
    with pytest.raises(CheckpointMismatchError):  # without its heads an instance cannot use the old keys
        _repo(redis_prefix, "ckpt-2")

    new = _repo(redis_prefix, "ckpt-2", reencode=_new_heads)
    assert len(new) == 3 and new.rejected_entries == 0  # re-encoded entries pass the checksum check
    assert new.redis.hget(f"{redis_prefix}:meta", "checkpoint") == b"ckpt-2"
    for i in range(3):
        hit = new.lookup(_unit((i + 1) % 3))
        assert hit is not None and hit.edit_id == f"e{i}" and hit.statement == f"statement {i}"
        assert torch.equal(hit.prompt, torch.full(SHAPE, 10.0 + i))

    # The old instance sees the hand-over, stops replaying, and keeps answering from its own consistent copy.
    old.refresh()
    assert old.superseded_by == "ckpt-2"
    hit = old.lookup(_unit(0))
    assert hit is not None and hit.edit_id == "e0" and torch.equal(hit.prompt, torch.zeros(SHAPE))
    # ...but may not write keys the new heads cannot read: refused, nothing stored.
    with pytest.raises(CheckpointMismatchError, match="e9"):
        old.add(_edit(9), "statement 9", _unit(2), torch.zeros(SHAPE))
    assert new.refresh() == 0 and "e9" not in new and new.entry("e9") is None
    assert new.redis.xlen(f"{redis_prefix}:log") == 4  # 3 adds + the hand-over

    # A second new instance finds the work done; retiring still works from every instance.
    again = _repo(redis_prefix, "ckpt-2", reencode=_new_heads)
    assert len(again) == 3
    assert old.retire("e1") and new.refresh() == 1 and "e1" not in new


def test_an_edit_written_during_the_migration_is_re_encoded_too(redis_prefix: str) -> None:
    writer = _repo(redis_prefix, "ckpt-1")
    writer.add(_edit(0), "statement 0", _unit(0), torch.zeros(SHAPE))
    calls = []

    def racing_heads(edits: Sequence[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(edits))
        if len(calls) == 1:  # the old indexer adds an edit while the new heads are encoding
            writer.add(_edit(1), "statement 1", _unit(1), torch.zeros(SHAPE))
        return _new_heads(edits)

    new = _repo(redis_prefix, "ckpt-2", reencode=racing_heads)
    assert calls == [1, 2]  # the first attempt was invalidated by the write and redone with both edits
    assert len(new) == 2 and new.rejected_entries == 0
    hit = new.lookup(_unit(2))
    assert hit is not None and hit.edit_id == "e1" and torch.equal(hit.prompt, torch.full(SHAPE, 11.0))


def test_the_tier_re_encodes_a_prefix_of_another_checkpoint(redis_prefix: str, tmp_path: Path) -> None:
    """The real heads: a tier loading a retrained checkpoint re-encodes what the shipped one stored."""
    from workers.retrieval.modules import RecipeModel
    from workers.retrieval.tier import RetrievalTier, default_checkpoint_path

    edits = [EditRequest(edit_id=f"t{i}", subject=s, prompt="{} is located in", target_new=t, target_true="Europe")
             for i, (s, t) in enumerate([("Mount Fuji", "Peru"), ("Lake Baikal", "Canada"), ("Sahara", "Norway")])]
    shipped = RetrievalTier.load(redis_url=REDIS_URL, prefix=redis_prefix)
    shipped.add_many(edits)
    recipe, meta = RecipeModel.load(default_checkpoint_path())
    with torch.no_grad():  # "retrained": other prompt vectors, slightly other keys
        recipe.prompt_head.out.weight.mul_(1.5)
        for p in recipe.key_head.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    retrained = tmp_path / "retrained.safetensors"
    recipe.save(retrained, {k: v for k, v in meta.items() if k not in ("format", "config")})

    tier = RetrievalTier.load(retrained, redis_url=REDIS_URL, prefix=redis_prefix)
    keys, prompts = tier.encode_edits(edits)
    for edit, prompt in zip(edits, prompts, strict=True):
        hit = tier.lookup(edit.text)
        assert hit is not None and hit.edit_id == edit.edit_id
        torch.testing.assert_close(hit.prompt, prompt.float())
    old_keys, _ = shipped.encode_edits(edits)
    assert not torch.allclose(keys, old_keys)  # the stored keys really changed
    assert shipped.lookup(edits[0].text) is not None  # the old tier keeps answering from memory
    assert shipped.store.superseded_by == tier.checkpoint_id
