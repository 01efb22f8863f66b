"""Scoring edits the way the retrieval tier serves them, over whatever model is current (evaluation, benchmarks).

``TierScorer`` holds the tier-routed edits in an in-memory RECIPE index and scores probe edits CounterFact-style:
each edit / paraphrase / neighbourhood query retrieves over ALL held edits, and the hit's injection (whichever edit
it is; nothing on a sentinel rejection) is put in front of the current model's input, as a replica with the default
``EDITQ_RETRIEVAL_TOP_K=1`` would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.schemas import EditRequest
from shared.settings import Settings
from workers.retrieval.evaluation import injected_prefixes, score_items
from workers.retrieval.index import KnowledgeIndex
from workers.retrieval.tier import RetrievalTier, default_checkpoint_path

log = logging.getLogger("editq.retrieval")
METRICS = ("efficacy", "generalization", "specificity")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class TierScorer:
    def __init__(self, tier: RetrievalTier, injection: str = "prompt") -> None:
        self.tier = tier
        self.injection = injection

    def add(self, edits: Sequence[EditRequest]) -> None:
        self.tier.add_many(edits)

    def _prefixes(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: set[str]) -> dict:
        store = self.tier.store
        assert isinstance(store, KnowledgeIndex)
        order = sorted(ids)
        if not order:
            return {}
        statements = [store.statement(i) for i in order]
        prompts = torch.stack([store.prompt(i) for i in order])
        values = injected_prefixes(self.injection, model.get_input_embeddings(), tokenizer, statements, prompts)
        return dict(zip(order, values, strict=True))

    @torch.no_grad()
    def score(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edits: Sequence[EditRequest]
    ) -> dict[str, float]:
        """efficacy / generalization / specificity (CounterFact's probability comparisons) with the tier active,
        plus ``rel_hit`` (own edit retrieved) and ``loc_reject`` (neighbours left untouched)."""
        queries: list[tuple[int, str, str, str, str]] = []  # (record, metric, text, should win, should lose)
        for i, r in enumerate(edits):
            true = str(r.target_true)
            queries.append((i, "efficacy", r.text, r.target_new, true))
            queries += [(i, "generalization", p, r.target_new, true) for p in r.paraphrase_prompts]
            queries += [(i, "specificity", p.prompt, p.target, r.target_new) for p in r.neighborhood_prompts]
        hits = self.tier.search([q[2] for q in queries])
        used = [h.edit_id if h.accepted else None for h in hits]
        prompts = self._prefixes(model, tokenizer, {pid for pid in used if pid is not None})
        items = [(q[2], cand, pid) for q, pid in zip(queries, used, strict=True) for cand in (q[3], q[4])]
        nll, _ = score_items(model, tokenizer, items, prompts)
        per: dict[str, dict[int, list[float]]] = {k: {} for k in METRICS}
        for q, a, b in zip(queries, nll[0::2], nll[1::2], strict=True):
            per[q[1]].setdefault(q[0], []).append(float(a < b))
        out = {k: _mean([_mean(v) for v in per[k].values()]) for k in METRICS}
        own = [pid == str(edits[q[0]].edit_id) for q, pid in zip(queries, used, strict=True) if q[1] == "efficacy"]
        out["rel_hit"] = _mean([float(x) for x in own])
        out["loc_reject"] = _mean([float(pid is None) for q, pid in zip(queries, used, strict=True)
                                   if q[1] == "specificity"])
        return out


def load_tier_scorer(settings: Settings, fingerprint: str) -> TierScorer | None:
    """The configured (or shipped) RECIPE checkpoint in an in-memory index when it was trained for this model, with
    the deployment's injection; None (logged) otherwise."""
    from workers.retrieval.modules import RecipeModel

    path = Path(settings.retrieval_checkpoint or default_checkpoint_path())
    if not path.is_file():
        log.warning("no RECIPE checkpoint at %s: tier edits are counted but not scored", path)
        return None
    trained_for = RecipeModel.load(path)[1].get("model_fingerprint")
    if trained_for and trained_for != fingerprint:
        log.warning("%s was trained for %s, not %s: tier edits not scored", path.name, trained_for, fingerprint)
        return None
    return TierScorer(RetrievalTier.load(path, settings=settings), settings.retrieval_injection)
