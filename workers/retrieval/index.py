"""Top-1 search over stored knowledge keys with the Knowledge Sentinel as a dynamic threshold.

Pure torch (plus faiss past ``AnnConfig.min_entries``), no storage: ``KnowledgeRepository`` (Redis-durable) and the
held-out evaluation both sit on it. Keys live in one dense float32 matrix (rows moved on removal so it stays dense).
Below ``AnnConfig.min_entries`` (default 1e5) a query costs one exact [N, r] x [r] product; from there on a faiss
index (``ann.py``) proposes candidates, which are re-scored exactly against the matrix, so scores stay exact and
the sentinel rule is the same (measured recall and latency: docs/retrieval.md).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from workers.retrieval.ann import AnnConfig, AnnSearcher
from workers.retrieval.subject_gate import SubjectGate


@dataclass(frozen=True)
class RetrievalHit:
    """A stored edit that beat the sentinel for a query; ``prompt`` is [p, hidden] float32."""

    edit_id: str
    score: float
    sentinel_score: float
    prompt: torch.Tensor
    statement: str = ""  # the edit as text ("prompt target_new"): text and hybrid injection put it in front


@dataclass(frozen=True)
class SearchResult:
    """Top-1 candidate (or none stored) and the sentinel's score for one query; ``accepted`` is the decision."""

    edit_id: str | None
    score: float
    sentinel_score: float

    @property
    def accepted(self) -> bool:
        return self.edit_id is not None and self.score > self.sentinel_score


class KnowledgeIndex:
    """In-memory keys and prompts by edit id; ``search``/``lookup`` apply RECIPE's rule
    ``top-1 score > sentinel score``, scores being ``scale * q . k`` and ``scale * q . k_KS + sentinel_offset``.

    From ``ann.min_entries`` entries on, search/lookup/lookup_all take the top ``ann.candidates`` of a faiss index
    (plus entries added since it was last brought up to date) and re-score them exactly; below it, or while the
    first index is still being built, they scan every key. The index is built lazily: crossing the threshold starts
    a quantiser training in a background thread, after which each search spends at most ``ann.build_step_ms``
    adding keys to it until it is complete (``build_ann`` finishes it at once).

    Not thread-safe: callers hold one lock around every call (``RetrievalTier`` does; tests/test_retrieval_threads.py
    fails without it). The only thread this class starts trains a quantiser on its own copy of a key sample."""

    def __init__(
        self,
        sentinel_key: torch.Tensor,
        scale: float,
        sentinel_offset: float = 0.0,
        initial_capacity: int = 64,
        ann: AnnConfig | None = None,
    ) -> None:
        self.sentinel_key = sentinel_key.detach().float().cpu().flatten()
        self.rep_dim = self.sentinel_key.numel()
        self.scale = float(scale)
        self.sentinel_offset = float(sentinel_offset)
        self.ann_config = ann or AnnConfig()
        self._keys = torch.zeros(max(1, initial_capacity), self.rep_dim)
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._prompts: dict[str, torch.Tensor] = {}
        self._statements: dict[str, str] = {}
        self._ann = AnnSearcher(self.rep_dim, self.ann_config)
        self.gate = SubjectGate()  # which entries a query names (subject_gate.py); callers decide whether to use it

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._row

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    @property
    def keys(self) -> torch.Tensor:
        """[N, r] view of the stored keys, row i belonging to ``list(self)[i]``."""
        return self._keys[: len(self._ids)]

    def prompt(self, edit_id: str) -> torch.Tensor:
        return self._prompts[edit_id]

    def statement(self, edit_id: str) -> str:
        return self._statements.get(edit_id, "")

    def add(self, edit_id: str, key: torch.Tensor, prompt: torch.Tensor, statement: str = "",
            subject: str | None = None) -> None:
        """Insert or replace (same id: the newer key, prompt and statement win); ``subject`` feeds the subject gate
        (None: the entry is a candidate for every query)."""
        key = key.detach().float().cpu().flatten()
        if key.numel() != self.rep_dim:
            raise ValueError(f"key has {key.numel()} dims, index holds {self.rep_dim}")
        row = self._row.get(edit_id)
        if row is None:
            row = len(self._ids)
            if row == self._keys.shape[0]:
                grown = torch.zeros(2 * row, self.rep_dim)
                grown[:row] = self._keys
                self._keys = grown
            self._ids.append(edit_id)
            self._row[edit_id] = row
        self._keys[row] = key
        self._prompts[edit_id] = prompt.detach().float().cpu()
        self._statements[edit_id] = statement
        self._ann.added(edit_id)
        self.gate.add(edit_id, subject)

    def remove(self, edit_id: str) -> bool:
        """Drop an entry (the last row moves into its place); False if it was not there."""
        row = self._row.pop(edit_id, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._keys[row] = self._keys[last]
            self._ids[row] = moved
            self._row[moved] = row
            self._ann.moved(moved, row)
        self._ids.pop()
        self._keys[last] = 0
        del self._prompts[edit_id]
        self._statements.pop(edit_id, None)
        self._ann.removed(edit_id)
        self.gate.remove(edit_id)
        return True

    def clear(self) -> None:
        self._ids.clear()
        self._row.clear()
        self._prompts.clear()
        self._statements.clear()
        self._keys.zero_()
        self._ann.clear()
        self.gate.clear()

    def build_ann(self) -> None:
        """Bring the ANN fully up to date now, training included (no-op below ``ann.min_entries``): pays the lazy
        build's cost up front, e.g. after a bulk load."""
        self._ann.step(self._row, self._ids, self.keys, None)

    @property
    def ann_stats(self) -> dict:
        """The ANN's state: ``active`` (searches now go through it), live keys, tombstones, pending keys, builds."""
        entries = len(self._ids)
        return {"active": self._ann.active(entries) and self._ann.ready(entries), **self._ann.stats()}

    def _use_ann(self) -> bool:
        """Advance the ANN's lazy build by one step when past the threshold; True when this search can use it."""
        entries = len(self._ids)
        if not self._ann.active(entries) and self._ann.live is None and self._ann.build is None:
            return False
        self._ann.step(self._row, self._ids, self.keys, self.ann_config.build_step_ms / 1000)
        return self._ann.active(entries) and self._ann.ready(entries)

    def _top(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [n, k'] and rows [n, k'] of the best ``k' = min(k, N)`` entries per query, best first: exact, or
        ANN candidates (and pending entries) re-scored exactly."""
        k = min(k, len(self._ids))
        if not self._use_ann():
            scores = q @ self.keys.T * self.scale
            if k == 1:  # max, as before the ANN existed (same tie-breaking)
                best, rows = scores.max(dim=1)
                return best[:, None], rows[:, None]
            return scores.topk(k, dim=1)
        signed = (q if self.scale >= 0 else -q).numpy()
        wanted = max(self.ann_config.candidates, k)
        # Gathers in numpy (a view of the same matrix): torch's threaded index_select took ~8 ms for 256 rows on a
        # busy 2-core machine, numpy's ~0.05 ms.
        keys = self.keys.numpy()
        pending = torch.from_numpy(self._ann.pending_rows(self._row))
        pending_scores = q @ torch.from_numpy(keys[pending.numpy()]).T * self.scale  # [n, P]
        scores, rows = [], []
        for start in range(0, q.shape[0], 64):  # bounds the [b, K, r] gather
            block = q[start: start + 64]
            cand = torch.from_numpy(self._ann.candidates(signed[start: start + 64], wanted))  # [b, K], -1: none
            gathered = torch.from_numpy(keys[cand.clamp(min=0).numpy()])  # [b, K, r]
            s = torch.bmm(gathered, block[:, :, None]).squeeze(2) * self.scale
            valid = cand >= 0
            if not bool(valid.all()):
                s = s.masked_fill(~valid, float("-inf"))
            if pending.numel():
                s = torch.cat([s, pending_scores[start: start + 64]], dim=1)
                cand = torch.cat([cand, pending.expand(block.shape[0], -1)], dim=1)
            top = s.topk(min(k, s.shape[1]), dim=1)
            if top.values.shape[1] < k or not bool(torch.isfinite(top.values).all()):
                exact = (block @ self.keys.T * self.scale).topk(k, dim=1)  # too few live candidates: scan all
                scores.append(exact.values)
                rows.append(exact.indices)
                continue
            scores.append(top.values)
            rows.append(cand.gather(1, top.indices))
        return torch.cat(scores), torch.cat(rows)

    @torch.no_grad()
    def search(self, queries: torch.Tensor) -> list[SearchResult]:
        """Top-1 and sentinel score for each query key in [n, r] (or one [r])."""
        q = queries.detach().float().cpu().reshape(-1, self.rep_dim)
        sentinel = (q @ self.sentinel_key * self.scale + self.sentinel_offset).tolist()
        if not self._ids:
            return [SearchResult(None, float("-inf"), s) for s in sentinel]
        best, rows = self._top(q, 1)
        return [
            SearchResult(self._ids[r], b, s)
            for r, b, s in zip(rows[:, 0].tolist(), best[:, 0].tolist(), sentinel, strict=True)
        ]

    @torch.no_grad()
    def lookup_all(self, query: torch.Tensor, k: int) -> list[RetrievalHit]:
        """Up to ``k`` entries that beat the sentinel for one query, best first (several edits one query needs,
        e.g. two facts about one subject)."""
        q = query.detach().float().cpu().reshape(1, self.rep_dim)
        sentinel = float(q[0] @ self.sentinel_key * self.scale + self.sentinel_offset)
        if not self._ids or k < 1:
            return []
        values, rows = self._top(q, k)
        hits = []
        for score, row in zip(values[0].tolist(), rows[0].tolist(), strict=True):
            if score > sentinel:
                edit_id = self._ids[row]
                hits.append(RetrievalHit(edit_id, score, sentinel, self._prompts[edit_id],
                                         self._statements.get(edit_id, "")))
        return hits

    def candidates(self, query_text: str) -> set[str]:
        """The entries a query names (the subject gate)."""
        return self.gate.candidates(query_text)

    @torch.no_grad()
    def search_among(self, queries: torch.Tensor, among: Sequence[Collection[str]]) -> list[SearchResult]:
        """``search`` with query i restricted to the entries ``among[i]`` (the subject gate's candidates): exact
        over those rows, the sentinel rule unchanged; no candidate, no hit."""
        q = queries.detach().float().cpu().reshape(-1, self.rep_dim)
        sentinel = (q @ self.sentinel_key * self.scale + self.sentinel_offset).tolist()
        results = []
        for i, allowed in enumerate(among):
            ids = [e for e in allowed if e in self._row]
            if not ids:
                results.append(SearchResult(None, float("-inf"), sentinel[i]))
                continue
            scores = self.keys[[self._row[e] for e in ids]] @ q[i] * self.scale
            best = int(scores.argmax())
            results.append(SearchResult(ids[best], float(scores[best]), sentinel[i]))
        return results

    @torch.no_grad()
    def lookup_among(self, query: torch.Tensor, k: int, among: Collection[str]) -> list[RetrievalHit]:
        """``lookup_all`` among the entries ``among`` only (exact over those rows)."""
        q = query.detach().float().cpu().reshape(self.rep_dim)
        sentinel = float(q @ self.sentinel_key * self.scale + self.sentinel_offset)
        ids = [e for e in among if e in self._row]
        if not ids or k < 1:
            return []
        scores = self.keys[[self._row[e] for e in ids]] @ q * self.scale
        top = scores.topk(min(k, len(ids)))
        return [RetrievalHit(ids[j], s, sentinel, self._prompts[ids[j]], self._statements.get(ids[j], ""))
                for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True) if s > sentinel]

    def lookup(self, query: torch.Tensor) -> RetrievalHit | None:
        """The hit for one query key, or None when nothing beats the sentinel."""
        result = self.search(query)[0]
        if not result.accepted or result.edit_id is None:
            return None
        edit_id = result.edit_id
        return RetrievalHit(
            edit_id, result.score, result.sentinel_score, self._prompts[edit_id], self._statements.get(edit_id, "")
        )
