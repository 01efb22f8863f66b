"""Model-level collapse signals: canary perplexity, control-fact accuracy, retention of earlier edits.

* Canary perplexity on the fixed held-out prose (``heldout_text.txt``, no edited subject in it): general language
  ability.
* Control-fact accuracy on ``control_facts.json``: facts the base model completes greedily (every answer token is
  the argmax after the prompt), checked on SmolLM2; accuracy 1.0 before editing by construction.
* Retention: share of a rolling uniform (reservoir) sample of *earlier* edits that still take, with the editor's
  own success rule (``workers.guards.policy.edit_success``). An edit superseded by a later edit of the same subject
  and prompt leaves the sample (the newer fact is meant to win).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.metrics import metric_key
from shared.schemas import EditRequest
from workers.evaluation.runner import heldout_texts
from workers.evaluation.scoring import perplexity, token_accuracy
from workers.guards.policy import edit_success

CONTROL_FACTS = Path(__file__).with_name("control_facts.json")


@dataclass(frozen=True)
class ControlFact:
    prompt: str
    answer: str


def load_control_facts(model_name: str | None = None, path: Path = CONTROL_FACTS) -> list[ControlFact]:
    """The control facts, or none when they were checked on another model than ``model_name`` (a directory name):
    facts another model does not know would only measure that model's ignorance."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if model_name is not None and model_name != data.get("model"):
        return []
    return [ControlFact(f["prompt"], f["answer"]) for f in data["facts"]]


@torch.no_grad()
def control_fact_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[ControlFact]
) -> float:
    """Share of facts whose whole answer is still the greedy continuation (teacher-forced argmax on every token)."""
    if not facts:
        return float("nan")
    acc = token_accuracy(model, tokenizer, [(f.prompt, f.answer) for f in facts])
    return float((acc >= 1.0).float().mean())


def canary_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str] | None = None
) -> float:
    return perplexity(model, tokenizer, list(texts) if texts is not None else heldout_texts())


class RetentionSample:
    """A uniform sample (reservoir) of at most ``capacity`` applied edits, deterministic for a seed."""

    def __init__(self, capacity: int = 64, seed: int = 0) -> None:
        self.capacity = capacity
        self.items: list[EditRequest] = []
        self.seen = 0
        self._rng = random.Random(seed)

    def add(self, requests: Sequence[EditRequest]) -> None:
        """Offer newly applied edits; earlier sampled edits they supersede are dropped first."""
        replaced = {(r.subject, r.prompt) for r in requests}
        self.items = [r for r in self.items if (r.subject, r.prompt) not in replaced]
        for request in requests:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(request)
            else:
                slot = self._rng.randrange(self.seen)
                if slot < self.capacity:
                    self.items[slot] = request

    def clear(self) -> None:
        self.items.clear()
        self.seen = 0

    def retention(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float | None:
        if not self.items:
            return None
        return float(edit_success(model, tokenizer, self.items).mean())


def model_health(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[ControlFact],
    sample: RetentionSample | None = None,
    texts: Sequence[str] | None = None,
    perplexity: float | None = None,
) -> dict[str, float]:
    """The model-level gauges as flat manifest keys (``shared.metrics.metric_key``); ``perplexity`` is the canary
    perplexity when already measured on this model (the health gate scores it too)."""
    ppl = perplexity if perplexity is not None else canary_perplexity(model, tokenizer, texts)
    out = {metric_key("editq_canary_perplexity"): ppl}
    if facts:
        out[metric_key("editq_control_fact_accuracy_ratio")] = control_fact_accuracy(model, tokenizer, facts)
    kept = sample.retention(model, tokenizer) if sample is not None else None
    if kept is not None:
        out[metric_key("editq_edit_retention_ratio")] = kept
    return out
