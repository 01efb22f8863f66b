"""The per-configuration loop of ``benchmarks/lifelong.py``, model-agnostic so tests run it on a tiny model.

The loop edits ``requests`` in order, in batches, never restoring the model. With a gate (``accept``), each batch goes
through ``Editor.apply(..., accept=...)``; a refused batch leaves the model unchanged and its edits go to the
retrieval tier. General health (``general``) and the tier's scorer (``tier``) are injected: the benchmark passes the
shipped general-text probe and RECIPE, a test passes probes built for its tiny tokenizer and a fake tier.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.sequential_collapse import VALUE_FLAGS, _write, split_config, value_overrides_of
from shared.schemas import EditRequest
from workers.editing.editor import Editor
from workers.evaluation.budget_backoff import BudgetBackoff
from workers.evaluation.general import (
    FULL,
    BaseReference,
    GeneralProbe,
    RetentionFact,
    fact_retention,
    general_health,
)
from workers.evaluation.metrics import counterfact_metrics
from workers.guards import GuardRejection

METRICS = ("efficacy", "generalization", "specificity")
#: gate(model, edited subjects incl. the batch's, the batch's edit ids) -> reading; raises GuardRejection to refuse.
Gate = Callable[[PreTrainedModel, list[str], list[str]], object]
#: general(model, subjects edited so far) -> {kl, top1_agreement, retention, ppl, fluency}
General = Callable[[PreTrainedModel, list[str]], dict[str, float]]


class TierScorer(Protocol):
    """Holds the tier-routed edits and scores probe edits with the tier active over the current model."""

    def add(self, edits: Sequence[EditRequest]) -> None: ...

    def score(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edits: Sequence[EditRequest]
    ) -> dict[str, float]: ...


@dataclass
class LoopOptions:
    name: str
    batch_size: int = 100
    eval_every: int = 500
    probe: int = 500
    seed: int = 0
    deadline: float = 0.0  # unix time by which the final checkpoint must be done; 0: none
    final_reserve: float = 60.0  # least seconds kept for the final checkpoint
    patience: int = 3  # the controller's health back-off (EDITQ_HEALTH_PATIENCE); 0: every batch tries the weights
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_config(name: str) -> tuple[str, bool]:
    """``today`` / ``budget`` / ``hybrid_budget`` / ``algo[+cap@drift][+l2@w][+energy@e][+budget]`` -> (algo,
    health budget on)."""
    named = {"today": ("alphaedit", False), "budget": ("alphaedit", True), "hybrid_budget": ("alphaedit_hybrid", True)}
    if name in named:
        return named[name]
    from workers.editing.hparams import V_STAR_ALGOS

    algo, flags = split_config(name)
    if algo not in V_STAR_ALGOS or any(f not in ("budget", *VALUE_FLAGS) for f in flags):
        raise ValueError(f"unknown configuration {name!r}")
    return algo, "budget" in flags


def config_hparams(name: str) -> dict[str, Any]:
    """Editor overrides a configuration name carries: ``+cap@0.3`` -> the norm cap at relative drift 0.3,
    ``+l2@100`` -> AlphaEdit's null-space ridge, ``+energy@0.9`` -> the key energy share the projector protects."""
    return value_overrides_of(name, split_config(name)[1])


def general_evaluator(
    tokenizer: PreTrainedTokenizerBase, probe: GeneralProbe, reference: BaseReference, facts: Sequence[RetentionFact],
    firm: Sequence[RetentionFact] | None = None, unseen: Sequence[RetentionFact] | None = None,
) -> General:
    """Full general health (every probe position given, all facts, all fluency prompts) as a plain dict. With
    ``firm`` (the facts the health gate draws from: those the base model knows by its margin) it also reports
    ``retention_firm``, and with ``unseen`` (firm facts a fixed gate sample never scores) ``retention_heldout``, which
    the gate's repeated tries cannot have been selected on."""

    def run(model: PreTrainedModel, subjects: list[str]) -> dict[str, float]:
        out = asdict(general_health(model, tokenizer, probe, reference, facts, subjects, FULL))
        if firm:
            out["retention_firm"] = fact_retention(model, tokenizer, firm, subjects)
        if unseen:
            out["retention_heldout"] = fact_retention(model, tokenizer, unseen, subjects)
        return out

    return run


def _log(name: str, message: str) -> None:
    print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _combine(parts: Sequence[tuple[int, dict[str, float] | None]]) -> dict[str, float]:
    """Record-weighted mean of per-part metrics (each part a per-record mean over ``n`` records)."""
    out = {}
    for key in METRICS:
        pairs = [(n, m[key]) for n, m in parts if n and m is not None and not math.isnan(m.get(key, math.nan))]
        total = sum(n for n, _ in pairs)
        out[key] = sum(n * v for n, v in pairs) / total if total else math.nan
    return out


class _Run:
    def __init__(self, editor: Editor, requests: Sequence[EditRequest], general: General, gate: Gate | None,
                 tier: TierScorer | None, opts: LoopOptions) -> None:
        self.editor, self.model, self.tok = editor, editor.model, editor.tokenizer
        self.requests, self.general, self.gate, self.tier, self.opts = requests, general, gate, tier, opts
        order = list(range(len(requests)))
        random.Random(opts.seed).shuffle(order)
        self.rank = {idx: pos for pos, idx in enumerate(order)}  # probe = the lowest-ranked edits served so far
        self.weights: list[int] = []  # request indices in the weights
        self.routed: list[int] = []  # request indices held by the tier
        self.pre: dict[int, dict[str, float]] = {}  # per-edit metrics on the base model (memo)
        self.edit_seconds = 0.0
        self.backoff = BudgetBackoff(opts.patience)  # its "version": batches in the weights so far
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {
            "config": opts.name, "batch_size": opts.batch_size, "eval_every": opts.eval_every,
            "n_planned": len(requests), "probe": opts.probe, "probe_seed": opts.seed, **opts.extra,
            "notes": [
                f"edit metrics on at most {opts.probe} served edits sampled uniformly (fixed seed {opts.seed}; "
                "nested: the served edits of lowest rank in one fixed random order)",
                "weights edits are scored on the model alone, tier edits with RECIPE retrieval over all tier-held "
                "edits prepended to the current model; served_* is the record-weighted mean of the two",
                "pre_* are the same edits' metrics on the base model without the tier",
                "retention excludes the subjects of every edit served so far (weights or tier)",
            ],
            "points": [], "batches": [],
        }

    def subjects(self, indices: Sequence[int]) -> list[str]:
        return [self.requests[i].subject for i in indices]

    def base_metrics(self, indices: Sequence[int]) -> dict[str, float]:
        """Mean per-edit metrics on the base model: the edited matrices are swapped for the pretrained ones and the
        current ones written back exactly; each edit is scored once (memo)."""
        missing = [i for i in indices if i not in self.pre]
        if missing:
            layout, base = self.editor.layout, self.editor.base_weights()
            current = {layer: layout.get_weight(self.model, layer).detach().clone() for layer in base}
            try:
                with torch.no_grad():
                    for layer, weight in base.items():
                        layout.set_weight(self.model, layer, weight)
                for i in missing:
                    self.pre[i] = counterfact_metrics(self.model, self.tok, [self.requests[i]]).as_dict()
            finally:
                with torch.no_grad():
                    for layer, weight in current.items():
                        layout.set_weight(self.model, layer, weight)
        return _combine([(1, self.pre[i]) for i in indices])

    def checkpoint(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        served = self.weights + self.routed
        n = len(served)
        point: dict[str, Any] = {
            "edits": n, "weights_edits": len(self.weights), "tier_edits": len(self.routed),
            "weights_share": len(self.weights) / n if n else math.nan,
            "tier_share": len(self.routed) / n if n else math.nan,
            "seconds": time.perf_counter() - self.started, "edit_seconds": self.edit_seconds,
            "seconds_per_edit": self.edit_seconds / n if n else math.nan,
        }
        point["general"] = self.general(self.model, self.subjects(served))
        base = self.result["points"][0]["general"] if self.result["points"] else point["general"]
        point["ppl_ratio"] = point["general"]["ppl"] / base["ppl"]
        probe = sorted(served, key=self.rank.__getitem__)[: self.opts.probe]
        routed = set(self.routed)
        in_w = [i for i in probe if i not in routed]
        in_t = [i for i in probe if i in routed]
        w = counterfact_metrics(self.model, self.tok, [self.requests[i] for i in in_w]).as_dict() if in_w else None
        t = None
        if in_t and self.tier is not None:
            t = self.tier.score(self.model, self.tok, [self.requests[i] for i in in_t])
        point["probe_edits"] = {"weights": len(in_w), "tier": len(in_t), "tier_scored": t is not None}
        point["weights"], point["tier"] = w, t
        served_m = _combine([(len(in_w), w), (len(in_t), t)])
        pre = self.base_metrics(probe) if probe else dict.fromkeys(METRICS, math.nan)
        for key in METRICS:
            point[f"served_{key}"] = served_m[key]
            point[f"pre_{key}"] = pre[key]
        point["eval_seconds"] = time.perf_counter() - t0
        self.result["points"].append(point)
        if self.opts.out is not None:
            _write(self.opts.out, self.result)
        g = point["general"]
        _log(self.opts.name, f"checkpoint {n} edits: KL {g['kl']:.4f} ppl x{point['ppl_ratio']:.3f} retention "
             f"{g['retention']:.3f} (firm {g.get('retention_firm', math.nan):.3f}) served efficacy "
             f"{served_m['efficacy']:.3f} tier share {point['tier_share']:.2f} "
             f"(eval {point['eval_seconds']:.0f} s)")
        return point

    def _to_tier(self, indices: list[int], batch: list[EditRequest]) -> None:
        self.routed.extend(indices)
        if self.tier is not None:
            self.tier.add(batch)

    def batch(self, begin: int) -> None:
        indices = list(range(begin, min(begin + self.opts.batch_size, len(self.requests))))
        batch = [self.requests[i] for i in indices]
        readings: list[object] = []
        accept = None
        if self.gate is not None:
            gate = self.gate
            subjects = self.subjects(self.weights + indices)
            ids = [str(r.edit_id) for r in batch]
            accept = lambda model: readings.append(gate(model, subjects, ids))  # noqa: E731
        record: dict[str, Any] = {"edits": len(self.weights) + len(self.routed) + len(batch)}
        t0 = time.perf_counter()
        version = sum(b["accepted"] for b in self.result["batches"])  # the weights change only when one is kept
        if self.gate is not None and not self.backoff.should_try(version):
            record.update(accepted=False, reason="health_budget", skipped=True,
                          message=f"health budget spent: {self.backoff.describe()}")
            self._to_tier(indices, batch)
        else:
            try:
                out = self.editor.apply(batch, accept=accept)
                self.weights.extend(indices)
                record.update(accepted=True, split={k: round(v, 2) for k, v in out.seconds.items()})
            except GuardRejection as refusal:
                self.backoff.refused(version)
                record.update(accepted=False, reason=refusal.reason, message=str(refusal))
                self._to_tier(indices, batch)
        record["seconds"] = time.perf_counter() - t0
        self.edit_seconds += record["seconds"]
        if readings and hasattr(readings[0], "__dataclass_fields__"):
            record["health"] = asdict(readings[0])  # type: ignore[call-overload]
        self.result["batches"].append(record)
        _log(self.opts.name, f"{record['edits']}/{len(self.requests)} edits: batch "
             f"{'applied' if record['accepted'] else 'to the tier'} in {record['seconds']:.1f} s "
             f"(weights {len(self.weights)}, tier {len(self.routed)})")


def run_loop(editor: Editor, requests: Sequence[EditRequest], general: General, gate: Gate | None,
             tier: TierScorer | None, opts: LoopOptions) -> dict[str, Any]:
    """Edit ``requests`` in order and checkpoint every ``opts.eval_every`` edits and at the end; returns the
    result (also written to ``opts.out`` at every checkpoint)."""
    run = _Run(editor, requests, general, gate, tier, opts)
    run.checkpoint()  # the base model: every later reading is relative to this one
    next_eval = opts.eval_every
    done = 0
    for begin in range(0, len(requests), opts.batch_size):
        if opts.deadline:
            per_batch = run.edit_seconds / max(1, len(run.result["batches"]))
            reserve = max(opts.final_reserve, 1.3 * max(p["eval_seconds"] for p in run.result["points"]))
            if time.time() + 1.5 * per_batch + reserve > opts.deadline:
                run.result["stopped_early"] = f"deadline after {done} edits"
                _log(opts.name, run.result["stopped_early"])
                break
        run.batch(begin)
        done = len(run.weights) + len(run.routed)
        if done >= next_eval and done < len(requests):
            run.checkpoint()
            next_eval += opts.eval_every
    if run.result["points"][-1]["edits"] != done:
        run.checkpoint()
    run.result["n_edits"] = done
    run.result["seconds_total"] = time.perf_counter() - run.started
    if opts.out is not None:
        _write(opts.out, run.result)
    return run.result
