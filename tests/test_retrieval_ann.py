"""The ANN path of ``KnowledgeIndex`` (faiss candidates re-scored exactly) answers like exact search: same top-1 and
scores, replace and remove honoured (a removed id never comes back), the sentinel rule unchanged, top-k agreeing.

Each test runs an index with a low ANN threshold beside one that stays exact, on the same entries."""

from __future__ import annotations

import time

import pytest
import torch

from workers.retrieval.ann import MIN_ANN_ENTRIES, AnnConfig
from workers.retrieval.index import KnowledgeIndex

DIM = 256
N = 3000
PROMPT = torch.zeros(3, 4)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _near(keys: torch.Tensor, seed: int, cos: float = 0.6) -> torch.Tensor:
    """Queries at cosine ~``cos`` from each of ``keys`` (retrieval's real query-to-own-key median is 0.65)."""
    noise = _unit(*keys.shape, seed=seed)
    noise = torch.nn.functional.normalize(noise - (noise * keys).sum(1, keepdim=True) * keys, dim=1)
    return cos * keys + (1 - cos**2) ** 0.5 * noise


def _pair(keys: torch.Tensor, scale: float = 20.0, offset: float = 10.0) -> tuple[KnowledgeIndex, KnowledgeIndex]:
    sentinel = _unit(DIM, seed=99)
    config = AnnConfig(min_entries=MIN_ANN_ENTRIES, background_train=False)
    approx = KnowledgeIndex(sentinel, scale, offset, ann=config)
    exact = KnowledgeIndex(sentinel, scale, offset, ann=AnnConfig(min_entries=10**9))
    for i, key in enumerate(keys):
        approx.add(f"e{i}", key, PROMPT, f"statement {i}")
        exact.add(f"e{i}", key, PROMPT, f"statement {i}")
    approx.build_ann()
    assert approx.ann_stats["active"] and approx.ann_stats["live_keys"] == len(keys)
    assert not exact.ann_stats["active"]
    return approx, exact


def _same_top1(approx: KnowledgeIndex, exact: KnowledgeIndex, queries: torch.Tensor) -> None:
    got, want = approx.search(queries), exact.search(queries)
    assert [r.edit_id for r in got] == [r.edit_id for r in want]
    assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-4)
    assert [r.sentinel_score for r in got] == pytest.approx([r.sentinel_score for r in want], abs=1e-5)


def test_ann_top1_equals_exact_with_exact_scores():
    keys = _unit(N, DIM, seed=0)
    approx, exact = _pair(keys)
    queries = _near(keys[:500], seed=1)
    _same_top1(approx, exact, queries)
    assert [r.edit_id for r in approx.search(queries)] == [f"e{i}" for i in range(500)]
    for query in queries[:20]:  # one query at a time, as the tier asks
        assert approx.search(query)[0] == exact.search(query)[0]


def test_negative_scale_searches_the_other_end():
    keys = _unit(N, DIM, seed=2)
    approx, exact = _pair(keys, scale=-5.0, offset=0.0)
    _same_top1(approx, exact, -_near(keys[:200], seed=3))


def test_sentinel_rule_unchanged():
    keys = _unit(N, DIM, seed=4)
    approx, exact = _pair(keys)  # accept iff 20 q.k > 20 q.k_KS + 10, i.e. q.k beats the sentinel by 0.5
    queries = torch.cat([_near(keys[:100], seed=5, cos=0.8), _near(keys[100:200], seed=6, cos=0.3),
                         _unit(100, DIM, seed=7)])
    hits = [approx.lookup(q) for q in queries]
    want = [exact.lookup(q) for q in queries]
    assert [h and h.edit_id for h in hits] == [w and w.edit_id for w in want]
    assert all(h is not None and h.edit_id == f"e{i}" for i, h in enumerate(hits[:100]))
    assert all(h is None for h in hits[100:])  # too far from their key, or no key near at all
    for h in hits[:100]:
        assert h is not None and h.score > h.sentinel_score and h.statement.startswith("statement")


def test_replace_and_remove_through_the_ann():
    keys = _unit(N, DIM, seed=8)
    approx, exact = _pair(keys)
    fresh = _unit(100, DIM, seed=9)
    for i in range(100):  # replace: e0..e99 get new keys
        approx.add(f"e{i}", fresh[i], PROMPT)
        exact.add(f"e{i}", fresh[i], PROMPT)
    removed = {f"e{i}" for i in range(100, 400)}
    for edit_id in sorted(removed):  # remove: rows move, the ANN keeps tombstones
        assert approx.remove(edit_id) and exact.remove(edit_id)
    assert approx.ann_stats["tombstones"] == 400
    queries = torch.cat([_near(fresh, seed=10), _near(keys[:100], seed=11), keys[100:400], _near(keys[400:800], 12)])
    _same_top1(approx, exact, queries)
    got = [r.edit_id for r in approx.search(queries)]
    assert got[:100] == [f"e{i}" for i in range(100)]  # the replacement key finds its id
    assert not removed & set(got)  # a removed key, queried exactly, never returns its id
    assert approx.ann_stats["active"] and approx.ann_stats["pending"] == 0  # the replacements were flushed in

    for i in range(400, 1100):  # past the tombstone share: a new generation replaces the old one
        approx.remove(f"e{i}")
        exact.remove(f"e{i}")
        removed.add(f"e{i}")
    approx.build_ann()
    assert approx.ann_stats["builds"] == 2 and approx.ann_stats["tombstones"] == 0
    got = [r.edit_id for r in approx.search(keys[:1100])]
    assert not removed & set(got)
    _same_top1(approx, exact, _near(keys[1100:1600], seed=13))


def test_lookup_all_topk_agrees_with_exact():
    keys = _unit(N, DIM, seed=14)
    approx, exact = _pair(keys, offset=-20.0)  # a low sentinel: every candidate counts
    picks = torch.randint(0, N, (50, 3), generator=torch.Generator().manual_seed(15))
    queries = torch.nn.functional.normalize(keys[picks].sum(1), dim=1)  # three stored keys near each query
    for query, pick in zip(queries, picks, strict=True):
        got, want = approx.lookup_all(query, 5), exact.lookup_all(query, 5)
        assert [h.edit_id for h in got] == [h.edit_id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
        assert {h.edit_id for h in got[:3]} == {f"e{int(i)}" for i in pick}


def test_lazy_build_answers_exactly_until_ready_then_drops_below_threshold():
    keys = _unit(N, DIM, seed=16)
    sentinel = _unit(DIM, seed=99)
    index = KnowledgeIndex(sentinel, 20.0, 10.0, ann=AnnConfig(min_entries=2000, build_step_ms=1.0))
    exact = KnowledgeIndex(sentinel, 20.0, 10.0)
    for i, key in enumerate(keys):
        index.add(f"e{i}", key, PROMPT)
        exact.add(f"e{i}", key, PROMPT)
    queries = _near(keys[:50], seed=17)
    _same_top1(index, exact, queries)  # first search starts the build (training in a thread) and scans exactly
    assert index.ann_stats["building"] and not index.ann_stats["active"]
    deadline = time.monotonic() + 15
    while not index.ann_stats["active"] and time.monotonic() < deadline:  # each search adds keys for ~1 ms
        _same_top1(index, exact, queries[:1])
        time.sleep(0.01)
    assert index.ann_stats["active"] and index.ann_stats["live_keys"] == N
    _same_top1(index, exact, queries)
    for i in range(N - 900, N):  # 2100 left: still past the threshold, one ANN; 999, under half the threshold: gone
        index.remove(f"e{i}")
    assert index.ann_stats["active"]
    for i in range(999, N - 900):
        index.remove(f"e{i}")
    index.search(queries[:1])
    assert not index.ann_stats["active"] and index.ann_stats["live_keys"] == 0
    index.clear()
    assert index.search(queries[:1])[0].edit_id is None


def test_settings_defaults_are_the_index_defaults():
    from shared.settings import Settings

    assert AnnConfig.from_settings(Settings()) == AnnConfig()
    assert AnnConfig.from_settings(Settings(retrieval_ann_min_entries=5000)).min_entries == 5000
