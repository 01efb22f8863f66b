"""Approximate candidates for ``KnowledgeIndex`` past ~1e5 entries: a FAISS product-quantised fast-scan index.

``KnowledgeIndex`` keeps every key in its dense float32 matrix and stays the source of truth; this module only
proposes candidate rows. The caller re-scores the candidates (plus the few entries not yet in the ANN) exactly, so
a returned score is always the true ``scale * q . k`` and the sentinel rule is unchanged.

Index: ``faiss.IndexPQFastScan`` with the inner-product metric, ``pq_m`` sub-quantisers of 4 bits (``pq_m / 2``
bytes per key: 64 MB at 1e6 keys of 512 dims for the default 128, against 2 GB of float32 keys). It scans every
code (SIMD look-up tables), so recall does not depend on how keys cluster. Graph (HNSW) and inverted-file (IVF)
indexes were measured on the hardest case, random unit keys in 512 dims, and lost there: HNSW took 111 s to
build 1e5 keys on one core and reached recall@1 0.89 at efSearch 256; IVF needed to probe half its lists for
0.96 (docs/retrieval.md, benchmarks/retrieval_ann.py).

Maintenance, all incremental:

* A *generation* is one faiss index over a snapshot of entries; faiss labels are insertion positions, mapped to
  rows of the owner's key matrix (updated when the owner moves a row). Replacing or removing an entry leaves a
  tombstone (its label maps to row -1 and is skipped at query time).
* Entries added or replaced after a generation went live are *pending*: the caller scores them exactly, and
  ``step`` appends them to the live generation within a time budget.
* A new generation is built when the owner first reaches ``min_entries`` and again when tombstones exceed
  ``max_tombstone_fraction`` of the live one: its product quantiser trains in a background thread (about 1 s
  for 512-dim keys on one core, touching only its own copy of a key sample), then ``step`` fills it from the
  snapshot in chunks within ``build_step_ms`` per call; the previous generation (or exact search) answers until
  it is complete.

Not thread-safe: like ``KnowledgeIndex`` it relies on the caller holding one lock around every call (the retrieval
tier does); the training thread shares nothing with the caller until ``step`` takes its result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MIN_ANN_ENTRIES = 1024  # a 4-bit quantiser has 16 centroids per sub-space: below this, exact search is cheap anyway
_CHUNK = 1024  # keys appended per faiss call while building (~6 ms for 512-dim keys, pq_m=128, one core)


@dataclass(frozen=True)
class AnnConfig:
    """When and how ``KnowledgeIndex`` searches approximately; defaults equal the ``retrieval_ann_*`` settings."""

    min_entries: int = 100_000  # exact search below, ANN candidates + exact re-ranking from here on
    pq_m: int = 128  # sub-quantisers of 4 bits (pq_m / 2 bytes per key); the largest divisor of the key size <= this
    candidates: int = 256  # ANN candidates per query, re-scored exactly
    build_step_ms: float = 20.0  # most time one search spends adding keys to an index being built
    max_tombstone_fraction: float = 0.25  # rebuild once this share of the live index is replaced or removed keys
    train_sample: int = 16_384  # keys the product quantiser is trained on
    background_train: bool = True  # train in a thread so no query waits for it (False: in the calling thread)
    threads: int = 1  # faiss OpenMP threads while training the quantiser (see _faiss_threads)

    @classmethod
    def from_settings(cls, settings: Any) -> AnnConfig:
        """From an object with ``retrieval_ann_*`` attributes (``shared.settings.Settings``)."""
        return cls(
            min_entries=settings.retrieval_ann_min_entries,
            pq_m=settings.retrieval_ann_pq_m,
            candidates=settings.retrieval_ann_candidates,
            build_step_ms=settings.retrieval_ann_build_step_ms,
        )


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    """faiss's OpenMP threads for the calls inside, restored afterwards (libgomp keeps the setting per calling
    thread). Used around training only: with torch's own OpenMP pool in the same process, a busy 2-core machine made
    a two-thread training 5-20x slower (spinning threads) than one thread (~1 s). Searches are left alone: a
    single-query scan measured the same with one thread or two."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _sub_quantisers(dim: int, wanted: int) -> int:
    return max(m for m in range(1, min(dim, max(1, wanted)) + 1) if dim % m == 0)


class _Generation:
    """One faiss index over some entries; label = insertion position -> row in the owner's key matrix (-1: dead)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.label_of: dict[str, int] = {}
        self.label_row = np.full(4096, -1, dtype=np.int64)
        self.tombstones = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: Sequence[str], rows: np.ndarray, keys: np.ndarray) -> None:
        start = self.ntotal
        end = start + len(ids)
        if end > self.label_row.shape[0]:
            grown = np.full(max(end, 2 * self.label_row.shape[0]), -1, dtype=np.int64)
            grown[:start] = self.label_row[:start]
            self.label_row = grown
        self.index.add(np.ascontiguousarray(keys, dtype=np.float32))
        self.label_row[start:end] = rows
        for offset, edit_id in enumerate(ids):
            self.discard(edit_id)  # an id listed twice keeps only its last label
            self.label_of[edit_id] = start + offset

    def discard(self, edit_id: str) -> None:
        label = self.label_of.pop(edit_id, None)
        if label is not None:
            self.label_row[label] = -1
            self.tombstones += 1

    def moved(self, edit_id: str, row: int) -> None:
        label = self.label_of.get(edit_id)
        if label is not None:
            self.label_row[label] = row

    def candidate_rows(self, queries: np.ndarray, k: int) -> np.ndarray:
        """[n, k] owner rows of the approximate top-k (by inner product), -1 where dead or missing."""
        k = max(1, min(k, self.ntotal))
        _, labels = self.index.search(queries, k)
        return np.where(labels >= 0, self.label_row[np.clip(labels, 0, None)], -1)


class _Build:
    """A generation being trained (in a thread) and then filled from a snapshot of entry ids."""

    def __init__(self, dim: int, pq_m: int, sample: np.ndarray, queue: list[str], background: bool, threads: int
                 ) -> None:
        self.queue = queue
        self.position = 0
        self.missing: set[str] = set()  # ids added or replaced since the snapshot was taken (not in gen as they are)
        self.generation: _Generation | None = None  # set by ``trained`` in the owner's thread, once training ended
        self.error: BaseException | None = None
        self._result: _Generation | None = None
        self.seconds_training = 0.0
        self._done = threading.Event()
        self._dim, self._pq_m, self._sample, self._threads = dim, pq_m, sample, threads
        if background:
            threading.Thread(target=self._train, name="editq-ann-train", daemon=True).start()
        else:
            self._train()

    def _train(self) -> None:
        try:
            import faiss

            t0 = time.perf_counter()
            index = faiss.IndexPQFastScan(self._dim, self._pq_m, 4, faiss.METRIC_INNER_PRODUCT)
            with _faiss_threads(self._threads):
                index.train(self._sample)
            self.seconds_training = time.perf_counter() - t0
            self._result = _Generation(index)
        except BaseException as exc:  # reported by the owner's next step
            self.error = exc
        finally:
            self._sample = np.empty((0, self._dim), dtype=np.float32)
            self._done.set()

    def trained(self, wait: bool) -> bool:
        if wait:
            self._done.wait()
        if not self._done.is_set():
            return False
        self.generation = self._result
        return True

    def added(self, edit_id: str) -> None:
        if self.generation is not None:
            self.generation.discard(edit_id)
        self.missing.add(edit_id)

    def removed(self, edit_id: str) -> None:
        if self.generation is not None:
            self.generation.discard(edit_id)
        self.missing.discard(edit_id)


class AnnSearcher:
    """The ANN side of a ``KnowledgeIndex``: keeps generations in step with the owner's adds, removals and row
    moves, and proposes candidate rows. The owner calls ``added``/``removed``/``moved``/``clear`` as it changes,
    ``step`` before searching, then ``candidates``."""

    def __init__(self, dim: int, config: AnnConfig) -> None:
        self.dim = dim
        self.config = config
        self.pq_m = _sub_quantisers(dim, config.pq_m)
        self.live: _Generation | None = None
        self.pending: dict[str, None] = {}  # ids not in the live generation as they are now (insertion-ordered)
        self.build: _Build | None = None
        self.broken = False  # a build failed (logged): exact search from then on
        self.builds = 0
        self.seconds_training = 0.0

    def active(self, entries: int) -> bool:
        return not self.broken and entries >= max(self.config.min_entries, MIN_ANN_ENTRIES)

    # --- changes of the owner --------------------------------------------------------------------------------
    def added(self, edit_id: str) -> None:
        if self.live is not None:
            self.live.discard(edit_id)
            self.pending[edit_id] = None
        if self.build is not None:
            self.build.added(edit_id)

    def removed(self, edit_id: str) -> None:
        if self.live is not None:
            self.live.discard(edit_id)
            self.pending.pop(edit_id, None)
        if self.build is not None:
            self.build.removed(edit_id)

    def moved(self, edit_id: str, row: int) -> None:
        if self.live is not None:
            self.live.moved(edit_id, row)
        if self.build is not None and self.build.generation is not None:
            self.build.generation.moved(edit_id, row)

    def clear(self) -> None:
        self.live = None
        self.pending = {}
        self.build = None

    # --- maintenance ------------------------------------------------------------------------------------------
    def step(self, row_of: Mapping[str, int], ids: Sequence[str], keys: torch.Tensor, budget_s: float | None) -> None:
        """Advance builds and flush pending entries for up to ``budget_s`` (at least one chunk of each when there
        is work; None: finish everything now, training included)."""
        entries = len(ids)
        if entries < max(self.config.min_entries, MIN_ANN_ENTRIES) // 2:
            if self.live is not None or self.build is not None:
                self.clear()  # far below the threshold again: exact search, memory back
            return
        if not self.active(entries):
            return
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        if self.build is None and (
            self.live is None or self.live.tombstones > self.config.max_tombstone_fraction * self.live.ntotal
        ):
            self._start_build(ids, keys, background=self.config.background_train and budget_s is not None)
        if self.build is not None and self.build.trained(wait=budget_s is None):
            self._fill_build(row_of, keys, deadline)
        if self.live is not None and self.pending:
            self._flush_pending(row_of, keys, deadline)

    def _start_build(self, ids: Sequence[str], keys: torch.Tensor, background: bool) -> None:
        entries = len(ids)
        rng = np.random.default_rng(self.builds)
        picked = rng.choice(entries, size=min(entries, self.config.train_sample), replace=False)
        sample = keys[torch.from_numpy(np.sort(picked))].numpy().astype(np.float32, copy=True)
        self.build = _Build(self.dim, self.pq_m, sample, list(ids), background, self.config.threads)
        self.builds += 1

    def _fill_build(self, row_of: Mapping[str, int], keys: torch.Tensor, deadline: float | None) -> None:
        build = self.build
        assert build is not None
        if build.error is not None or build.generation is None:
            log.error("retrieval ANN build failed, exact search from now on: %r", build.error)
            self.broken = True
            self.clear()
            return
        self.seconds_training = build.seconds_training
        while build.position < len(build.queue):
            chunk = build.queue[build.position: build.position + _CHUNK]
            build.position += len(chunk)
            present = [edit_id for edit_id in chunk if edit_id in row_of]
            self._append(build.generation, present, row_of, keys)
            for edit_id in present:
                build.missing.discard(edit_id)
            if deadline is not None and time.perf_counter() >= deadline:
                return
        self.live = build.generation
        self.pending = dict.fromkeys(build.missing)
        build.queue = []
        self.build = None

    def _flush_pending(self, row_of: Mapping[str, int], keys: torch.Tensor, deadline: float | None) -> None:
        live = self.live
        assert live is not None
        while self.pending:
            chunk = []
            for edit_id in self.pending:
                chunk.append(edit_id)
                if len(chunk) == _CHUNK:
                    break
            for edit_id in chunk:
                del self.pending[edit_id]
            self._append(live, chunk, row_of, keys)
            if deadline is not None and time.perf_counter() >= deadline:
                return

    @staticmethod
    def _append(generation: _Generation, ids: list[str], row_of: Mapping[str, int], keys: torch.Tensor) -> None:
        if not ids:
            return
        rows = np.fromiter((row_of[edit_id] for edit_id in ids), dtype=np.int64, count=len(ids))
        generation.add(ids, rows, keys[torch.from_numpy(rows)].numpy())

    # --- queries ----------------------------------------------------------------------------------------------
    def ready(self, entries: int) -> bool:
        """True when candidates can be asked for: a live generation and few enough pending entries (otherwise an
        exact scan over everything costs no more)."""
        return self.live is not None and 2 * len(self.pending) <= entries

    def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        """[n, >=k] owner rows proposed by the live generation (-1: none), pending entries not included."""
        assert self.live is not None
        return self.live.candidate_rows(np.ascontiguousarray(queries, dtype=np.float32), k)

    def pending_rows(self, row_of: Mapping[str, int]) -> np.ndarray:
        return np.fromiter((row_of[edit_id] for edit_id in self.pending), dtype=np.int64, count=len(self.pending))

    def stats(self) -> dict[str, Any]:
        live = self.live
        return {
            "live_keys": 0 if live is None else live.ntotal - live.tombstones,
            "tombstones": 0 if live is None else live.tombstones,
            "pending": len(self.pending),
            "building": self.build is not None,
            "builds": self.builds,
            "pq_m": self.pq_m,
            "broken": self.broken,
            "seconds_training": self.seconds_training,
        }
