"""The worker's efficacy check, which decides which edits of an applied version stay in the retrieval tier: an edit
counts as taken when its own prompt prefers target_new over target_true (CounterFact's efficacy rule)."""

from __future__ import annotations

import torch

from shared.schemas import EditRequest
from workers.edit_worker import EditWorker
from workers.editing.results import BatchResult


def _worker(model=None, tokenizer=None, check: bool = True) -> EditWorker:
    """An EditWorker with only what ``missed_edits`` reads (a full one loads stats and a weight store)."""
    worker = EditWorker.__new__(EditWorker)
    worker.index, worker.model, worker.tokenizer, worker.efficacy_check = 0, model, tokenizer, check
    return worker


def _result(ids: list[str], success: list[float] | None) -> BatchResult:
    empty = torch.zeros(0)
    return BatchResult(ids, [], [], {}, empty, [], 0, per_edit_success=success)


FRANCE_ROME = EditRequest(edit_id="rome", subject="France", prompt="The capital of {} is", target_new="Rome",
                          target_true="Paris")
FRANCE_PARIS = EditRequest(edit_id="paris", subject="France", prompt="The capital of {} is", target_new="Paris",
                           target_true="Rome")


def test_the_unedited_model_has_not_taken_a_counterfactual_edit(smollm2) -> None:
    model, tokenizer = smollm2
    seconds: dict[str, float] = {}
    missed = _worker(model, tokenizer).missed_edits(
        _result(["rome", "paris"], None), [FRANCE_ROME, FRANCE_PARIS], seconds
    )
    assert missed == ["rome"]  # SmolLM2 knows Paris: the counterfactual has not taken, the fact it knows has
    assert seconds["efficacy_check"] > 0


def test_the_guards_scores_are_reused_and_the_check_can_be_switched_off() -> None:
    seconds: dict[str, float] = {}
    worker = _worker()  # no model: the guard's per-edit scores must be used as they are
    assert worker.missed_edits(_result(["a", "b", "c"], [1.0, 0.0, 1.0]), [], seconds) == ["b"]
    assert _worker(check=False).missed_edits(_result(["a"], [0.0]), [], {}) == []
