"""Rolling a committed weight version out to the serving replicas: a gated canary first, then the rest.

``deploy(version, probes)``:

1. The canary (first ready replica) swaps and is *held* out of traffic. Gates: the swap's checksums and live-kernel
   check, and its agreement check (the replica's greedy answers on the version's fixed probe set are the reference
   answers computed with transformers on the same weights: ``workers/serving/agreement.py``); the probes (each
   edit answers ``target_new`` greedily, or beats ``target_true`` by mean log-prob); the control facts the canary
   answered right before the swap are still answered right. Then it takes traffic for ``serving_canary_soak_s``
   and its error rate since the swap is judged.
2. The other replicas swap ``serving_max_unavailable`` at a time (each checked by its own checksums, live-kernel
   and agreement checks; a replica that dies here is skipped: Ray restarts it and it rejoins at the live version).
3. Success moves the Redis ``live`` pointer (and the version's status) to the version. Any failed gate rolls every
   replica already on the version back to the previous live version, in reverse order, and the result says
   ``rolled_back`` with the reason; a replica that cannot roll back is restarted (it rejoins at the live version).

``reconcile()`` brings stragglers (replicas that joined during a rollout, held canaries of an interrupted one) to
the live version and restarts failed replicas (not one whose engine disagrees with the reference at its own version:
a restart reloads the same weights in the same dtype); run it periodically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from controller.rollout.router import ReplicaClient
from shared.metrics import MemoryMetrics, Metrics
from shared.schemas import EditRequest
from shared.streams import EditStreams
from workers.serving.config import ServingSettings
from workers.serving.schemas import (
    ControlFact,
    EditProbe,
    GenerateRequest,
    ReplicaState,
    ReplicaStatus,
    ScoreRequest,
    SwapReport,
)

log = logging.getLogger("editq.rollout")
MAX_NEIGHBOUR_FACTS, NEIGHBOURS_PER_EDIT = 16, 4  # clients' neighbourhood prompts judged per canary gate / edit
DEFAULT_CONTROL_FACTS_FILE = Path(__file__).resolve().parents[2] / "workers" / "evaluation" / "control_facts.json"


class GateResult(BaseModel):
    gate: Literal["swap", "agreement", "probes", "controls", "neighbours", "error_rate", "replica"]
    replica: str
    ok: bool
    detail: str = ""
    value: float | None = None


class ReplicaOutcome(BaseModel):
    replica: str
    from_version: int | None
    final_version: int | None
    swap: SwapReport | None = None
    rollback: SwapReport | None = None
    error: str | None = None


class RolloutResult(BaseModel):
    """``live``: every reachable replica runs the version and the live pointer moved. ``rolled_back``: a gate
    failed, replicas are back on ``previous`` (``reason`` says why). ``skipped``: no replica could take it."""

    version: int
    previous: int
    status: Literal["live", "rolled_back", "skipped"]
    reason: str | None = None
    canary: str | None = None
    gates: list[GateResult] = Field(default_factory=list)
    replicas: list[ReplicaOutcome] = Field(default_factory=list)
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0


def probes_from_requests(
    requests: Sequence[EditRequest], absent: bool = False, neighbours: bool = False
) -> list[EditProbe]:
    """The probes of a batch: each edit's own prompt must now answer its ``target_new`` (with ``absent``: must no
    longer, for edits a revert takes out); with ``neighbours``, the first few of the client's neighbourhood prompts
    ride along (the version's own edits only: a compaction's sample of old edits does not re-judge them)."""
    return [
        EditProbe(prompt=r.text, target_new=r.target_new, target_true=r.target_true, subject=r.subject,
                  neighbours=[ControlFact(prompt=n.prompt, answer=n.target)
                              for n in r.neighborhood_prompts[:NEIGHBOURS_PER_EDIT]] if neighbours else [],
                  absent=absent)
        for r in requests
    ]


def load_control_facts(settings: ServingSettings) -> list[ControlFact]:
    """The canary's control facts: the configured file, else the package's ``control_facts.json``. A configured
    file that is missing is an error, not a quiet fallback: the gate would judge the canary on other facts."""
    path = settings.serving_control_facts_path or DEFAULT_CONTROL_FACTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"serving_control_facts_path: no file at {path}")
    facts = [ControlFact(prompt=f["prompt"], answer=f["answer"]) for f in json.loads(path.read_text())["facts"]]
    return facts[: settings.serving_control_facts_n]


def mentions(text: str, subject: str) -> bool:
    """``subject`` as whole words in ``text`` (case-insensitive): 'Iran' does not mention 'ran', so a short subject
    cannot empty the control-fact gate."""
    return re.search(rf"(?<!\w){re.escape(subject.strip())}(?!\w)", text, re.IGNORECASE) is not None


def contains(text: str, answer: str) -> bool:
    return answer.strip().lower() in text.lower()


class _GateFailed(Exception):  # control flow inside deploy, never escapes
    def __init__(self, gate: GateResult) -> None:
        super().__init__(gate.detail)
        self.gate = gate


class RolloutManager:
    def __init__(
        self,
        clients: Sequence[ReplicaClient],
        settings: ServingSettings | None = None,
        streams: EditStreams | None = None,
        metrics: Metrics | None = None,
        control_facts: Sequence[ControlFact] | None = None,
    ) -> None:
        self.clients = list(clients)
        self.settings = settings or ServingSettings()
        self.streams = streams
        self.metrics = metrics or MemoryMetrics()
        self.control_facts = list(control_facts) if control_facts is not None else load_control_facts(self.settings)
        self._lock = asyncio.Lock()
        self._left_failed: set[str] = set()  # incarnations reported as failed for good (logged once each)

    # ---- helpers --------------------------------------------------------------------------------------------
    async def statuses(self) -> dict[str, ReplicaStatus | None]:
        async def one(client: ReplicaClient) -> ReplicaStatus | None:
            try:
                return await asyncio.wait_for(client.status(), 10)
            except Exception as err:
                log.warning("replica %s unreachable: %s", client.name, err)
                return None

        found = await asyncio.gather(*(one(c) for c in self.clients))
        return {c.name: s for c, s in zip(self.clients, found, strict=True)}

    async def _live(self, statuses: dict[str, ReplicaStatus | None]) -> int:
        if self.streams is not None:
            return await self.streams.live()
        versions = [s.version for s in statuses.values() if s is not None and s.version is not None]
        return max(set(versions), key=versions.count) if versions else 0

    async def _swap(self, client: ReplicaClient, version: int, hold: bool = False) -> tuple[SwapReport | None, str]:
        try:
            report = await client.apply_version(version, hold)
            return report, "" if report.ok else (report.error or "swap failed")
        except Exception as err:
            return None, f"{type(err).__name__}: {err}"[:500]

    async def _greedy(self, client: ReplicaClient, prompts: Sequence[str]) -> list[str]:
        params = {"max_tokens": self.settings.serving_probe_max_tokens, "temperature": 0.0, "internal": True}
        results = await asyncio.gather(*(client.generate(GenerateRequest(prompt=p, **params)) for p in prompts))
        return [r.text for r in results]

    async def _probe_gate(self, client: ReplicaClient, probes: Sequence[EditProbe]) -> GateResult:
        if not probes:
            return GateResult(gate="probes", replica=client.name, ok=True, detail="no probes given")
        answers = await self._greedy(client, [p.prompt for p in probes])
        failed, still_there = [], []
        for probe, text in zip(probes, answers, strict=True):
            takes = contains(text, probe.target_new)
            if not takes and probe.target_true:
                scores = (await client.score(ScoreRequest(
                    prompt=probe.prompt, candidates=[probe.target_new, probe.target_true]
                ))).mean_logprobs
                takes = scores[0] > scores[1]
            if takes != probe.absent:
                continue
            want = f"not {probe.target_new!r} (reverted)" if probe.absent else repr(probe.target_new)
            failed.append(f"{probe.prompt!r} -> {text.strip()[:40]!r} (want {want})")
            if probe.absent:
                still_there.append(probe.prompt)
        rate = 1 - len(failed) / len(probes)
        ok = rate >= self.settings.serving_probe_min_pass and not still_there  # a revert must hold, every one
        detail = f"{len(probes) - len(failed)}/{len(probes)} edits answer as the version says"
        if failed:
            detail += "; failing: " + "; ".join(failed[:5])
        return GateResult(gate="probes", replica=client.name, ok=ok, detail=detail, value=rate)

    def _facts(self, probes: Sequence[EditProbe]) -> list[ControlFact]:
        """Control facts, minus those about a subject this version edits (they are meant to change)."""
        subjects = [p.subject for p in probes if p.subject]
        return [f for f in self.control_facts if not any(mentions(f.prompt, s) for s in subjects)]

    def _neighbours(self, probes: Sequence[EditProbe]) -> list[ControlFact]:
        """The clients' own "must not change" prompts (a few per edit, round robin so no edit fills the cap), minus
        those that mention an edited subject or repeat a control fact."""
        subjects = [p.subject for p in probes if p.subject]
        seen = {f.prompt for f in self.control_facts}
        out: list[ControlFact] = []
        for rank in range(NEIGHBOURS_PER_EDIT):
            for probe in probes:
                if len(out) >= MAX_NEIGHBOUR_FACTS or rank >= len(probe.neighbours):
                    continue
                fact = probe.neighbours[rank]
                if fact.prompt not in seen and not any(mentions(fact.prompt, s) for s in subjects):
                    out.append(fact)
                    seen.add(fact.prompt)
        return out

    # ---- deploy ---------------------------------------------------------------------------------------------
    async def deploy(self, version: int, probes: Sequence[EditProbe] = ()) -> RolloutResult:
        """Roll ``version`` out (see the module docstring); never raises for a failed gate, returns the result."""
        async with self._lock:
            t0 = time.perf_counter()
            statuses = await self.statuses()
            previous = await self._live(statuses)
            ready = [c for c in self.clients
                     if (s := statuses[c.name]) is not None and s.state in (ReplicaState.ready, ReplicaState.canary)]
            result = RolloutResult(version=version, previous=previous, status="skipped")
            if not ready:
                result.reason = "no ready replica to canary the version on"
            else:
                await self._deploy(version, previous, ready, statuses, probes, result)
            result.seconds = time.perf_counter() - t0
            self.metrics.inc("editq_rollouts", result=result.status)
            log.info("rollout of version %d: %s in %.1f s%s", version, result.status, result.seconds,
                     f" ({result.reason})" if result.reason else "")
            return result

    async def _deploy(
        self, version: int, previous: int, ready: list[ReplicaClient], statuses: dict[str, ReplicaStatus | None],
        probes: Sequence[EditProbe], result: RolloutResult,
    ) -> None:
        canary, rest = ready[0], ready[1:]
        result.canary = canary.name
        updated: list[ReplicaClient] = []
        outcomes = {c.name: ReplicaOutcome(replica=c.name, from_version=statuses[c.name].version,
                                           final_version=statuses[c.name].version) for c in ready}
        result.replicas = list(outcomes.values())
        try:
            facts, neighbours = self._facts(probes), self._neighbours(probes)
            asked = [f.prompt for f in (*facts, *neighbours)]
            baseline = await self._greedy(canary, asked)
            before = await canary.status()
            updated.append(canary)
            await self._swap_gated(canary, version, True, outcomes, result)
            result.gates.append(await self._probe_gate(canary, probes))
            after = await self._greedy(canary, asked)
            n = len(facts)
            result.gates.append(self._control_gate(canary.name, facts, baseline[:n], after[:n]))
            if neighbours:  # the clients' own prompts: a share must hold, so one client cannot block every rollout
                gate = self._control_gate(canary.name, neighbours, baseline[n:], after[n:])
                ok = gate.value is None or gate.value >= self.settings.serving_neighbour_min_kept
                result.gates.append(gate.model_copy(update={"gate": "neighbours", "ok": ok}))
            if not all(g.ok for g in result.gates):
                raise _GateFailed(next(g for g in result.gates if not g.ok))
            await canary.release()
            await asyncio.sleep(self.settings.serving_canary_soak_s)
            result.gates.append(self._error_gate(canary.name, before, await canary.status()))
            if not result.gates[-1].ok:
                raise _GateFailed(result.gates[-1])
            step = self.settings.serving_max_unavailable
            for i in range(0, len(rest), step):
                wave = rest[i : i + step]
                updated += wave
                done = await asyncio.gather(
                    *(self._swap_gated(c, version, False, outcomes, result) for c in wave), return_exceptions=True
                )  # the whole wave settles before any rollback starts
                for error in done:
                    if isinstance(error, BaseException):
                        raise error
        except Exception as err:
            gate = err.gate if isinstance(err, _GateFailed) else GateResult(
                gate="replica", replica=canary.name, ok=False, detail=f"{type(err).__name__}: {err}"[:500]
            )
            if not isinstance(err, _GateFailed):
                result.gates.append(gate)
                log.exception("rollout of version %d failed", version)
            result.status = "rolled_back"
            result.reason = f"{gate.gate} gate failed on {gate.replica}: {gate.detail}"
            await self._rollback(updated, version, previous, outcomes)
            return
        result.status = "live"
        if self.streams is not None:
            await self.streams.set_live(version)
            await self.streams.set_version_status(version, "live")
        self.metrics.set("editq_live_version", version)

    async def _swap_gated(
        self, client: ReplicaClient, version: int, hold: bool, outcomes: dict[str, ReplicaOutcome],
        result: RolloutResult,
    ) -> None:
        report, error = await self._swap(client, version, hold)
        outcome = outcomes[client.name]
        outcome.swap, outcome.error = report, error or None
        agreement = report.agreement if report is not None else None
        if report is not None and report.ok:
            outcome.final_version = version
            result.gates.append(GateResult(
                gate="swap", replica=client.name, ok=True, value=report.pause_s,
                detail=f"checksums ok, live-kernel error {report.max_probe_error}, paused {report.pause_s:.3f} s",
            ))
            if agreement is not None:
                result.gates.append(GateResult(gate="agreement", replica=client.name, ok=True,
                                               value=len(agreement.near_ties), detail=agreement.summary()))
            return
        died = report is None and not hold and await self._gone(client)
        note = "replica died during its swap (it rejoins at the live version): " if died else ""
        refused = agreement is not None and not agreement.ok
        kind = "replica" if died else "agreement" if refused else "swap"
        gate = GateResult(gate=kind, replica=client.name, ok=died, detail=note + error)
        result.gates.append(gate)
        if not died:
            raise _GateFailed(gate)
        outcome.final_version = None

    async def _gone(self, client: ReplicaClient) -> bool:
        """Whether a replica's swap failed because the replica died (restarting, or a new incarnation)."""
        try:
            status = await asyncio.wait_for(client.status(), 10)
        except Exception:
            return True
        return status.state == ReplicaState.starting

    def _control_gate(
        self, name: str, facts: Sequence[ControlFact], baseline: Sequence[str], after: Sequence[str]
    ) -> GateResult:
        known = [(f, a) for f, b, a in zip(facts, baseline, after, strict=True) if contains(b, f.answer)]
        lost = [f"{f.prompt!r} -> {a.strip()[:40]!r} (was {f.answer!r})" for f, a in known if not contains(a, f.answer)]
        detail = f"{len(known) - len(lost)}/{len(known)} control facts kept"
        if lost:
            detail += "; lost: " + "; ".join(lost[:5])
        return GateResult(gate="controls", replica=name, ok=not lost, detail=detail,
                          value=(len(known) - len(lost)) / len(known) if known else 1.0)

    def _error_gate(self, name: str, before: ReplicaStatus, after: ReplicaStatus) -> GateResult:
        if after.incarnation != before.incarnation:
            return GateResult(gate="error_rate", replica=name, ok=False, detail="the canary restarted")
        failed = after.failed - before.failed
        total = failed + after.served - before.served
        mixed = after.mixed_versions - before.mixed_versions
        rate = failed / total if total else 0.0
        ok = rate <= self.settings.serving_max_error_rate and mixed == 0
        return GateResult(gate="error_rate", replica=name, ok=ok, value=rate,
                          detail=f"{failed} of {total} requests failed, {mixed} mixed versions since the swap")

    async def _rollback(
        self, updated: list[ReplicaClient], version: int, previous: int, outcomes: dict[str, ReplicaOutcome]
    ) -> None:
        for client in reversed(updated):
            outcome = outcomes[client.name]
            if await self._gone(client):  # restarting: it rejoins at the live version, which is still ``previous``
                outcome.final_version, outcome.error = None, outcome.error or "replica restarted during the rollout"
                continue
            report, error = await self._swap(client, previous)
            outcome.rollback = report
            if report is not None and report.ok:
                outcome.final_version = previous
                continue
            outcome.error, outcome.final_version = f"rollback failed: {error}", None
            log.error("replica %s could not roll back to %d (%s): restarting it", client.name, previous, error)
            try:
                await client.restart()
            except Exception as err:
                log.error("could not restart replica %s: %s", client.name, err)
        if self.streams is not None:
            await self.streams.set_version_status(version, "rolled_back")

    # ---- reconcile ------------------------------------------------------------------------------------------
    async def reconcile(self) -> list[SwapReport]:
        """Move every ready replica to the live version and restart failed ones (not during a rollout)."""
        async with self._lock:
            statuses = await self.statuses()
            live = await self._live(statuses)
            reports = []
            for client in self.clients:
                status = statuses[client.name]
                if status is None or status.state in NOT_NOW:
                    continue
                if status.state == ReplicaState.failed:
                    if _disagrees_at_own_version(status):
                        self._report_left_failed(status)
                        continue
                    log.warning("restarting failed replica %s (%s)", client.name, status.error)
                    await client.restart()
                elif status.version != live or status.state == ReplicaState.canary:
                    report, error = await self._swap(client, live)
                    if report is not None:
                        reports.append(report)
                    if error:
                        log.warning("replica %s could not move to live version %d: %s", client.name, live, error)
            return reports

    def _report_left_failed(self, status: ReplicaStatus) -> None:
        if status.incarnation not in self._left_failed:
            self._left_failed.add(status.incarnation)
            log.error("replica %s is left failed, not restarted: %s", status.name, status.error)


NOT_NOW = (ReplicaState.starting, ReplicaState.swapping, ReplicaState.draining)  # reconcile leaves these alone


def _disagrees_at_own_version(status: ReplicaStatus) -> bool:
    """A replica whose engine's answers are not the reference's at the version it holds (e.g. bf16 on CPU)."""
    report = status.agreement
    return report is not None and bool(report.disagreements) and report.version == status.version
