"""CounterFact and zsRE edit metrics over a list of edit requests, on the model as it is now."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.schemas import EditRequest
from workers.evaluation.scoring import candidate_nll, token_accuracy


@dataclass
class EditMetrics:
    efficacy: float
    generalization: float
    specificity: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def counterfact_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> EditMetrics:
    """Share of prompts where P(target_new) > P(target_true) (edit and paraphrase prompts), and share of
    neighbourhood prompts where the true answer still beats target_new; per-record means, then averaged."""
    pairs: list[tuple[str, str]] = []
    for r in requests:
        if r.target_true is None:
            raise ValueError(f"edit {r.edit_id}: CounterFact metrics need target_true")
        for prompt in (r.text, *r.paraphrase_prompts):
            pairs += [(prompt, r.target_new), (prompt, r.target_true)]
        for probe in r.neighborhood_prompts:
            pairs += [(probe.prompt, probe.target), (probe.prompt, r.target_new)]
    nll = candidate_nll(model, tokenizer, pairs).tolist()
    wins = [a < b for a, b in zip(nll[0::2], nll[1::2], strict=True)]
    eff, gen, spec = [], [], []
    i = 0
    for r in requests:
        eff.append(float(wins[i]))
        i += 1
        if r.paraphrase_prompts:
            gen.append(_mean([float(w) for w in wins[i : i + len(r.paraphrase_prompts)]]))
            i += len(r.paraphrase_prompts)
        if r.neighborhood_prompts:
            spec.append(_mean([float(w) for w in wins[i : i + len(r.neighborhood_prompts)]]))
            i += len(r.neighborhood_prompts)
    return EditMetrics(_mean(eff), _mean(gen), _mean(spec))


def zsre_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> EditMetrics:
    """zsRE: teacher-forced token accuracy of target_new on the question and its rephrasings, and of the NQ
    answer on the locality question (absolute accuracy, as in the MEMIT evaluation)."""
    groups: list[tuple[str, int]] = []
    pairs: list[tuple[str, str]] = []
    for r in requests:
        pairs.append((r.text, r.target_new))
        groups.append(("eff", 1))
        pairs += [(p, r.target_new) for p in r.paraphrase_prompts]
        groups.append(("gen", len(r.paraphrase_prompts)))
        pairs += [(p.prompt, p.target) for p in r.neighborhood_prompts]
        groups.append(("spec", len(r.neighborhood_prompts)))
    acc = token_accuracy(model, tokenizer, pairs).tolist()
    out: dict[str, list[float]] = {"eff": [], "gen": [], "spec": []}
    i = 0
    for name, size in groups:
        if size:
            out[name].append(_mean(acc[i : i + size]))
        i += size
    return EditMetrics(_mean(out["eff"]), _mean(out["gen"]), _mean(out["spec"]))


@torch.no_grad()
def edit_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], zsre: bool
) -> EditMetrics:
    return (zsre_metrics if zsre else counterfact_metrics)(model, tokenizer, requests)
