"""Exact top-1 search over stored knowledge keys with the Knowledge Sentinel as a dynamic threshold.

Pure torch, no storage: ``KnowledgeRepository`` (Redis-durable) and the held-out evaluation both sit on it. Keys
live in one dense float32 matrix (rows moved on removal so it stays dense); a query costs one [N, r] x [r] product.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


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
    ``top-1 score > sentinel score``, scores being ``scale * q . k`` and ``scale * q . k_KS + sentinel_offset``."""

    def __init__(
        self, sentinel_key: torch.Tensor, scale: float, sentinel_offset: float = 0.0, initial_capacity: int = 64
    ) -> None:
        self.sentinel_key = sentinel_key.detach().float().cpu().flatten()
        self.rep_dim = self.sentinel_key.numel()
        self.scale = float(scale)
        self.sentinel_offset = float(sentinel_offset)
        self._keys = torch.zeros(max(1, initial_capacity), self.rep_dim)
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._prompts: dict[str, torch.Tensor] = {}
        self._statements: dict[str, str] = {}

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

    def add(self, edit_id: str, key: torch.Tensor, prompt: torch.Tensor, statement: str = "") -> None:
        """Insert or replace (same id: the newer key, prompt and statement win)."""
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
        self._ids.pop()
        self._keys[last] = 0
        del self._prompts[edit_id]
        self._statements.pop(edit_id, None)
        return True

    def clear(self) -> None:
        self._ids.clear()
        self._row.clear()
        self._prompts.clear()
        self._statements.clear()
        self._keys.zero_()

    @torch.no_grad()
    def search(self, queries: torch.Tensor) -> list[SearchResult]:
        """Top-1 and sentinel score for each query key in [n, r] (or one [r])."""
        q = queries.detach().float().cpu().reshape(-1, self.rep_dim)
        sentinel = (q @ self.sentinel_key * self.scale + self.sentinel_offset).tolist()
        if not self._ids:
            return [SearchResult(None, float("-inf"), s) for s in sentinel]
        scores = q @ self.keys.T * self.scale
        best, rows = scores.max(dim=1)
        return [
            SearchResult(self._ids[r], b, s) for r, b, s in zip(rows.tolist(), best.tolist(), sentinel, strict=True)
        ]

    @torch.no_grad()
    def lookup_all(self, query: torch.Tensor, k: int) -> list[RetrievalHit]:
        """Up to ``k`` entries that beat the sentinel for one query, best first (several edits one query needs,
        e.g. two facts about one subject)."""
        q = query.detach().float().cpu().reshape(1, self.rep_dim)
        sentinel = float(q[0] @ self.sentinel_key * self.scale + self.sentinel_offset)
        if not self._ids or k < 1:
            return []
        top = (q @ self.keys.T * self.scale)[0].topk(min(k, len(self._ids)))
        hits = []
        for score, row in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if score > sentinel:
                edit_id = self._ids[row]
                hits.append(RetrievalHit(edit_id, score, sentinel, self._prompts[edit_id],
                                         self._statements.get(edit_id, "")))
        return hits

    def lookup(self, query: torch.Tensor) -> RetrievalHit | None:
        """The hit for one query key, or None when nothing beats the sentinel."""
        result = self.search(query)[0]
        if not result.accepted or result.edit_id is None:
            return None
        edit_id = result.edit_id
        return RetrievalHit(
            edit_id, result.score, result.sentinel_score, self._prompts[edit_id], self._statements.get(edit_id, "")
        )
