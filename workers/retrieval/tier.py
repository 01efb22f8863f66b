"""``RetrievalTier``: the RECIPE tier as the router sees it (load once; add, retire, lookup, build prompt embeds).

The store is a ``KnowledgeRepository`` (Redis, durable, shared) when a Redis URL is given, else an in-memory
``KnowledgeIndex`` (evaluation, single process). Queries should be the user's text without a chat template: the
retriever was trained on plain CounterFact prompts and a template would dilute every query alike.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from shared.schemas import EditRequest
from shared.settings import Settings
from workers.retrieval.ann import AnnConfig
from workers.retrieval.encoder import SentenceEncoder
from workers.retrieval.evaluation import statement
from workers.retrieval.index import KnowledgeIndex, RetrievalHit, SearchResult
from workers.retrieval.injection import prompt_embeds
from workers.retrieval.modules import RecipeModel

if TYPE_CHECKING:
    from workers.retrieval.repository import KnowledgeRepository

log = logging.getLogger("editq.retrieval")
CHECKPOINT_DIR = Path(__file__).with_name("checkpoints")
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "smollm2-135m-recipe.safetensors"


def default_checkpoint_path() -> Path:
    """The shipped checkpoint, trained for SmolLM2-135M-Instruct (see the JSON beside it)."""
    return DEFAULT_CHECKPOINT


def checkpoint_id(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class RetrievalTier:
    """Encoder + RECIPE heads + a knowledge store; one per replica process, safe to use from many threads.

    A replica answers each request in a worker thread (``asyncio.to_thread``), and a lookup can replay the Redis
    change log (rows move when an entry is retired), so every store access holds one lock; encoding a query (the
    expensive part) runs outside it."""

    def __init__(
        self,
        recipe: RecipeModel,
        encoder: SentenceEncoder,
        ckpt_id: str,
        redis_url: str | None = None,
        prefix: str = "editq:retrieval",
        subject_gate: bool = False,
        ann: AnnConfig | None = None,
    ) -> None:
        self.recipe = recipe.eval()
        self.subject_gate = subject_gate  # lookups only among the edits a query names (subject_gate.py)
        self.encoder = encoder
        self.checkpoint_id = ckpt_id
        self._lock = threading.RLock()
        with torch.no_grad():
            sentinel = recipe.search_keys(recipe.sentinel_key(encoder))
        shape = (recipe.config.prompt_tokens, recipe.config.llm_hidden)
        if redis_url is None:
            self.store: KnowledgeIndex | KnowledgeRepository = KnowledgeIndex(
                sentinel, recipe.scale, recipe.sentinel_offset, ann=ann
            )
        else:
            from workers.retrieval.repository import KnowledgeRepository

            self.store = KnowledgeRepository(
                sentinel, recipe.scale, recipe.sentinel_offset, shape, ckpt_id, url=redis_url, prefix=prefix, ann=ann,
                reencode=self._encode_unlocked,  # a prefix of an older checkpoint is re-encoded for these heads
            )

    @classmethod
    def load(
        cls,
        checkpoint: Path | str | None = None,
        encoder_path: Path | str | None = None,
        redis_url: str | None = None,
        prefix: str = "editq:retrieval",
        settings: Settings | None = None,
    ) -> RetrievalTier:
        """Load the checkpoint (default: the shipped SmolLM2 one) and the encoder it was trained with."""
        settings = settings or Settings()
        path = Path(checkpoint) if checkpoint is not None else default_checkpoint_path()
        recipe, meta = RecipeModel.load(path)
        encoder = SentenceEncoder(encoder_path or settings.resolved_encoder_path(), pooling=recipe.config.pooling)  # type: ignore[arg-type]
        expected = meta.get("encoder_fingerprint")
        if expected and expected != encoder.fingerprint:
            raise ValueError(f"{path} was trained with encoder {expected}, but {encoder.path} is {encoder.fingerprint}")
        return cls(recipe, encoder, checkpoint_id(path), redis_url=redis_url, prefix=prefix,
                   subject_gate=settings.retrieval_subject_gate, ann=AnnConfig.from_settings(settings))

    @classmethod
    def for_model(cls, settings: Settings) -> RetrievalTier | None:
        """The tier for the served model when enabled and a checkpoint trained for that model exists, else None
        (logged: RECIPE's prompts live in one LLM's embedding space, so another model's checkpoint cannot serve)."""
        from workers.model_io import model_fingerprint

        if not settings.retrieval_enabled:
            return None
        path = Path(settings.retrieval_checkpoint or default_checkpoint_path())
        if not path.is_file():
            log.warning("retrieval tier off: no RECIPE checkpoint at %s", path)
            return None
        _, meta = RecipeModel.load(path)
        trained_for = meta.get("model_fingerprint")
        served = model_fingerprint(settings.resolved_model_path())
        if trained_for and trained_for != served:
            log.warning("retrieval tier off: %s was trained for %s, the served model is %s (train one with "
                        "`editq retrieval train`)", path.name, trained_for, served)
            return None
        return cls.load(path, redis_url=settings.redis_url, prefix=settings.retrieval_prefix(), settings=settings)

    def __len__(self) -> int:
        with self._lock:
            return len(self.store)

    @torch.no_grad()
    def encode_edits(self, edits: Sequence[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Search keys [n, r] and continuous prompts [n, p, hidden] of edits (one encoder pass + two small MLPs)."""
        return self._encode_unlocked(edits)

    @torch.no_grad()
    def _encode_unlocked(self, edits: Sequence[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.recipe.knowledge_keys(self.encoder.features([statement(e) for e in edits]))
        return self.recipe.search_keys(keys), self.recipe.prompts(keys)

    def add(self, edit: EditRequest) -> None:
        self.add_many([edit])

    def add_many(self, edits: Sequence[EditRequest]) -> None:
        if not edits:
            return
        keys, prompts = self.encode_edits(edits)
        with self._lock:
            for edit, key, prompt in zip(edits, keys, prompts, strict=True):
                if isinstance(self.store, KnowledgeIndex):
                    self.store.add(str(edit.edit_id), key, prompt, statement(edit), edit.subject)
                else:
                    self.store.add(edit, statement(edit), key, prompt)

    def retire(self, edit_id: str) -> bool:
        with self._lock:
            if isinstance(self.store, KnowledgeIndex):
                return self.store.remove(edit_id)
            return self.store.retire(edit_id)

    def _query_keys(self, texts: Sequence[str]) -> torch.Tensor:
        return self.recipe.search_keys(self.recipe.query_keys(self.encoder.features(list(texts))))

    @torch.no_grad()
    def search(self, query_texts: Sequence[str]) -> list[SearchResult]:
        """Top-1 candidate and sentinel score per query (for metrics: hits vs sentinel rejections)."""
        keys = self._query_keys(query_texts)
        with self._lock:
            return self.store.search(keys)

    @torch.no_grad()
    def lookup(self, query_text: str) -> RetrievalHit | None:
        """The retrieved edit for a query, or None when the sentinel rejects every stored item."""
        if self.subject_gate:
            hits = self.lookup_all(query_text, 1)
            return hits[0] if hits else None
        key = self._query_keys([query_text])[0]
        with self._lock:
            return self.store.lookup(key)

    @torch.no_grad()
    def lookup_all(self, query_text: str, k: int) -> list[RetrievalHit]:
        """Up to ``k`` retrieved edits above the sentinel for a query, best first. With the subject gate only among
        the edits the query names, and a query that names none costs no encoding at all."""
        among = None
        if self.subject_gate:
            with self._lock:
                among = self.store.candidates(query_text)
            if not among:
                return []
        key = self._query_keys([query_text])[0]
        with self._lock:
            return self.store.lookup_all(key, k) if among is None else self.store.lookup_among(key, k, among)

    def prompt_embeds(
        self, embedding_layer: nn.Module, query_ids: torch.Tensor | Sequence[int], hit: RetrievalHit | None
    ) -> torch.Tensor:
        """[p + L, hidden] (or [L, hidden] without a hit) input embeddings for the frozen LLM / vLLM."""
        hidden = int(embedding_layer.weight.shape[1])
        if hidden != self.recipe.config.llm_hidden:
            raise ValueError(
                f"checkpoint emits {self.recipe.config.llm_hidden}-d prompts, the model embeds to {hidden}: "
                "RECIPE must be trained per LLM"
            )
        return prompt_embeds(embedding_layer, query_ids, None if hit is None else hit.prompt)
