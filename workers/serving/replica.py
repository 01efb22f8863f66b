"""A serving replica: one vLLM ``AsyncLLM`` that hot-swaps committed weight versions while it serves.

A plain class, made a Ray actor by the controller (``controller.rollout.router.spawn_replicas``). On start (and after
any restart Ray does) it loads the base model, then catches up to the live version (Redis ``live`` pointer) before it
reports ``ready``, so no replica ever serves an unknown version.

A swap (``apply_version``): materialise the target's full changed matrices (base + verified deltas), write them to a
safetensors file, then close the admission gate, drain (``pause_generation(mode="wait")``, bounded; after the
timeout ``mode="abort"``, and the router retries what was aborted), reload in place through the worker extension,
verify (checksums of what each worker read, and each live kernel's output on inputs in the row space of the
change), reset the prefix cache (its result checked), label the version in vLLM, resume. A failed check reloads the
previous matrices the same way before resuming, so the replica is always on exactly one known version.

Served = evaluated (``agreement.py``): at start and after every swap, before taking traffic, the engine's greedy
answers on the version's probes must be the reference's. A start that disagrees leaves the replica ``failed``; a
swap that disagrees is undone like any failed check (so a canary's disagreement rolls the version back).

No response mixes versions: the gate stops new requests before the drain, and the drain lets every admitted
request finish on the old weights, so each request runs entirely between two swaps. The version stamped on a
response is fixed at admission; vLLM's own per-token ``weight_versions`` spans are checked against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.metrics import Metrics, default_metrics
from shared.streams import EditStreams
from shared.weight_store import BASE_VERSION, LocalWeightStore
from workers.serving.agreement import AgreementError, AgreementGate
from workers.serving.config import ServingSettings
from workers.serving.engine import create_engine, resolve_dtype, sampling_params, scoring_params
from workers.serving.logprobs import token_logprobs
from workers.serving.retrieval import QueryRetrieval, query_text
from workers.serving.schemas import (
    GenerateRequest,
    GenerateResult,
    MixedVersionError,
    ReplicaConfig,
    ReplicaState,
    ReplicaStatus,
    ReplicaUnavailableError,
    RequestAbortedError,
    RetrievedEdit,
    ScoreRequest,
    ScoreResult,
    StreamChunk,
    SwapReport,
)
from workers.serving.swap import SwapCheckError, SwapFiles, drain, load_and_verify, reset_prefix_cache, write_swap_files
from workers.serving.weights import BaseReader, VersionMatrices, materialise

log = logging.getLogger("editq.replica")


class Replica:
    def __init__(self, config: ReplicaConfig | dict) -> None:
        config = ReplicaConfig.model_validate(config)
        self.name = config.name
        self.settings = ServingSettings(**config.settings)
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = datetime.now(UTC)
        self.state = ReplicaState.starting
        self.version: int | None = None
        self.current: VersionMatrices | None = None
        self.engine: Any = None
        self.tokenizer: Any = None
        self.retrieval: QueryRetrieval | None = None
        self.store = LocalWeightStore(self.settings.resolved_store_dir())
        self.base = BaseReader(self.settings.resolved_model_path())
        self.metrics: Metrics = default_metrics()
        # One folder per replica name: a restarted replica clears what a killed predecessor left mid-swap.
        self.work_dir = (self.settings.serving_work_dir or Path(tempfile.gettempdir())) / f"editq-{self.name}"
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        self.counts = {"served": 0, "failed": 0, "mixed": 0, "swaps": 0, "tier_lookups": 0, "tier_hits": 0}
        self.error: str | None = None
        self.last_swap: SwapReport | None = None
        self.agreement: AgreementGate | None = None  # served = evaluated checks, from the engine's start
        self._in_flight = 0
        self._admitting = 0
        self._start_task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self._admitted: asyncio.Event | None = None
        try:  # Ray runs an async actor's __init__ inside its event loop: start right away
            asyncio.get_running_loop()
            self._ensure_started()
        except RuntimeError:
            pass  # started on the first call instead

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def _ensure_started(self) -> asyncio.Task:
        if self._start_task is None:
            self._lock = asyncio.Lock()
            self._admitted = asyncio.Event()
            self._admitted.set()
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        return self._start_task

    async def _start(self) -> None:
        try:
            t0 = time.perf_counter()
            self.retrieval = await asyncio.to_thread(self._load_retrieval)
            self.engine, self.tokenizer = await asyncio.to_thread(
                create_engine, self.settings, self.retrieval is not None
            )
            if self.retrieval is not None:
                self.retrieval.tokenizer = self.tokenizer
            self.version, self.current = BASE_VERSION, VersionMatrices(BASE_VERSION)
            await self.engine.update_weight_version(str(BASE_VERSION))
            log.info("%s: engine up in %.1f s", self.name, time.perf_counter() - t0)
            self.agreement = AgreementGate(self.name, self.store, self.settings.resolved_model_path(),
                                           self.tokenizer, self.metrics, resolve_dtype(self.settings.serving_dtype))
            if not (report := await self.agreement.check(self.engine, BASE_VERSION)).ok:
                raise AgreementError(report.summary())
            await self._catch_up()
            self.state = ReplicaState.ready
            self.metrics.set("editq_replica_version", self.version, replica=self.name)
            log.info("%s: ready at version %d", self.name, self.version)
        except Exception as err:
            self.state = ReplicaState.failed
            self.error = f"start failed: {type(err).__name__}: {err}"[:1000]
            log.exception("%s: start failed", self.name)

    def _load_retrieval(self) -> QueryRetrieval | None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.settings.resolved_model_path(), local_files_only=True)
        return QueryRetrieval.load(self.settings, tokenizer)

    async def _catch_up(self) -> None:
        """Follow the live pointer until it stops moving (a rollout may finish while we catch up)."""
        s = self.settings
        streams = EditStreams.from_url(s.redis_url, s.namespace, s.stream_maxlen)
        try:
            for _ in range(20):
                live = await streams.live()
                if live == self.version:
                    return
                report = await self._swap(live)
                if not report.ok:
                    raise RuntimeError(f"could not load live version {live}: {report.error}")
            raise RuntimeError("the live version kept moving while catching up")
        finally:
            await streams.close()

    async def wait_ready(self, timeout_s: float | None = None) -> ReplicaStatus:
        """Wait until the engine is up and at the live version (or start failed); returns the status."""
        task = self._ensure_started()
        await asyncio.wait_for(asyncio.shield(task), timeout_s or self.settings.serving_startup_timeout_s)
        return await self.status()

    async def status(self) -> ReplicaStatus:
        self._ensure_started()
        if self.engine is not None and self.engine.errored and self.state != ReplicaState.failed:
            self.state, self.error = ReplicaState.failed, "vLLM engine is dead"
        return ReplicaStatus(
            name=self.name, state=self.state, version=self.version, incarnation=self.incarnation,
            started_at=self.started_at, in_flight=self._in_flight, served=self.counts["served"],
            failed=self.counts["failed"], mixed_versions=self.counts["mixed"], swaps=self.counts["swaps"],
            last_swap=self.last_swap, agreement=self.agreement.last if self.agreement else None, error=self.error,
            tier_lookups=self.counts["tier_lookups"], tier_hits=self.counts["tier_hits"],
        )

    async def check_health(self) -> ReplicaStatus:
        """Raises when the replica cannot serve (Ray-style health check); else its status."""
        status = await self.status()
        if status.state == ReplicaState.failed:
            raise RuntimeError(f"{self.name} failed: {status.error}")
        if self.engine is not None:
            await self.engine.check_health()
        return status

    async def drain(self, timeout_s: float = 60.0) -> ReplicaStatus:
        """Stop taking requests and let the admitted ones finish (bounded), before a planned restart: the router
        sends new requests elsewhere, so restarting the replica after this fails none. Holds the swap lock, so no
        swap runs meanwhile; ``in_flight`` in the answer is what the timeout left running."""
        self._ensure_started()
        async with self._lock:
            self.state = ReplicaState.draining
            deadline = time.monotonic() + timeout_s
            while (self._in_flight or self._admitting) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        log.info("%s: drained (%d request(s) still in flight)", self.name, self._in_flight)
        return await self.status()

    async def shutdown(self) -> None:
        """Stop the engine's processes and remove swap files (call before killing the actor for good)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.state = ReplicaState.failed
        self.error = "shut down"
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ---- serving ------------------------------------------------------------------------------------------------
    def _require_ready(self, internal: bool = False) -> None:
        self._ensure_started()
        if not (self.state == ReplicaState.ready or (internal and self.state == ReplicaState.canary)):
            raise ReplicaUnavailableError(f"replica {self.name} is {self.state.value}")

    def _admit(self, internal: bool = False) -> int:
        self._require_ready(internal)
        self._admitting += 1
        self._in_flight += 1
        self._admitted.clear()
        return self.version

    def _entered(self) -> None:
        """The request reached the engine (it produced output): a swap's drain now covers it."""
        self._admitting -= 1
        if self._admitting == 0:
            self._admitted.set()

    def _prompt(self, request: GenerateRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        messages = [m.model_dump() for m in request.messages or []]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def _inputs(self, request: GenerateRequest) -> tuple[Any, RetrievedEdit | None]:
        """The engine input: the prompt text, or on a retrieval-tier hit its embeddings behind the edit's prompt."""
        text = self._prompt(request)
        if self.retrieval is None or not request.retrieval or request.internal:
            return text, None
        start = time.perf_counter()
        inputs, hit = await asyncio.to_thread(
            self.retrieval.prepare, query_text(request.prompt, request.messages), text
        )
        self.metrics.observe("editq_retrieval_latency_seconds", time.perf_counter() - start)
        self.metrics.inc("editq_retrieval_lookups", result="hit" if hit else "sentinel")
        self.counts["tier_lookups"] += 1
        self.counts["tier_hits"] += hit is not None
        self.metrics.set("editq_retrieval_stale_seconds", self.retrieval.stale_seconds)
        return inputs, hit

    async def _run(self, prompt: Any, params: Any, request_id: str | None) -> AsyncIterator[Any]:
        """Drive one engine request, keeping the admission and failure counts right."""
        entered = False
        try:
            async for out in self.engine.generate(prompt, params, request_id or uuid.uuid4().hex):
                if not entered:
                    entered = True
                    self._entered()
                if out.outputs and out.outputs[0].finish_reason == "abort":
                    raise RequestAbortedError(f"replica {self.name} aborted the request during a swap")
                yield out
            self.counts["served"] += 1
        except (RequestAbortedError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            self.counts["failed"] += 1
            raise
        finally:
            if not entered:
                self._entered()
            self._in_flight -= 1

    def _check_versions(self, output: Any, version: int) -> list[str]:
        spans = [s.version for s in (output.weight_versions or [])]
        if len(set(spans)) > 1 or (spans and spans[0] != str(version)):
            self.counts["mixed"] += 1
            raise MixedVersionError(f"{self.name}: tokens from versions {spans}, admitted at {version}")
        return spans

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self._require_ready(request.internal)
        params = sampling_params(request, "FINAL_ONLY")  # may raise: before admission
        prompt, retrieved = await self._inputs(request)
        version = self._admit(request.internal)
        final = None
        async for out in self._run(prompt, params, request.request_id):
            final = out
        completion = final.outputs[0]
        spans = self._check_versions(completion, version)
        return GenerateResult(
            text=completion.text, token_ids=list(completion.token_ids), finish_reason=completion.finish_reason,
            prompt_tokens=len(final.prompt_token_ids or []), completion_tokens=len(completion.token_ids),
            version=version, replica=self.name, engine_versions=spans, retrieved=retrieved,
            logprobs=token_logprobs(completion.token_ids, completion.logprobs, self.tokenizer),
        )

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """Streamed completion (a Ray streaming generator); every chunk carries the admission version."""
        self._require_ready(request.internal)
        params = sampling_params(request, "DELTA")
        prompt, retrieved = await self._inputs(request)
        version = self._admit(request.internal)
        produced = 0
        async for out in self._run(prompt, params, request.request_id):
            completion = out.outputs[0]
            produced += len(completion.token_ids)
            if completion.finish_reason is not None:
                self._check_versions(completion, version)
            yield StreamChunk(
                text=completion.text, finish_reason=completion.finish_reason, version=version, replica=self.name,
                prompt_tokens=len(out.prompt_token_ids or []), completion_tokens=produced, retrieved=retrieved,
                logprobs=token_logprobs(completion.token_ids, completion.logprobs, self.tokenizer),
            )

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Mean log-probability of each candidate after the prompt (teacher-forced, via prompt_logprobs)."""
        from workers.editing.tokens import target_token_ids

        self._require_ready(internal=True)
        prompt_ids = list(self.tokenizer(request.prompt)["input_ids"])
        params = scoring_params()
        means: list[float] = []
        version = self.version
        for candidate in request.candidates:
            ids = target_token_ids(self.tokenizer, request.prompt, candidate)
            version = self._admit(internal=True)
            final = None
            async for out in self._run({"prompt_token_ids": prompt_ids + ids}, params, None):
                final = out
            self._check_versions(final.outputs[0], version)
            rows = final.prompt_logprobs[len(prompt_ids):]
            means.append(sum(row[t].logprob for row, t in zip(rows, ids, strict=True)) / len(ids))
        return ScoreResult(mean_logprobs=means, version=version, replica=self.name)

    # ---- hot swap -----------------------------------------------------------------------------------------------
    async def apply_version(
        self, version: int, hold: bool = False, pause_timeout_s: float | None = None
    ) -> SwapReport:
        """Move to committed ``version`` (forward, or back for a rollback) without restarting the engine.

        With ``hold`` the replica stays out of traffic afterwards (state ``canary``: only internal probe requests)
        until ``release``; a later ``apply_version`` without ``hold`` (a rollback) makes it ready again.
        ``pause_timeout_s`` overrides ``serving_pause_timeout_s`` for this swap.
        """
        task = self._ensure_started()
        if self.state == ReplicaState.starting:
            await asyncio.wait_for(asyncio.shield(task), self.settings.serving_startup_timeout_s)
        if self.state == ReplicaState.failed:
            raise ReplicaUnavailableError(f"replica {self.name} failed: {self.error}")
        return await self._swap(version, hold, pause_timeout_s)

    async def release(self) -> ReplicaStatus:
        """End a canary hold: take traffic at the current version."""
        if self.state == ReplicaState.canary:
            self.state = ReplicaState.ready
        return await self.status()

    async def _swap(self, version: int, hold: bool = False, pause_timeout_s: float | None = None) -> SwapReport:
        async with self._lock:
            t0 = time.perf_counter()
            report = SwapReport(replica=self.name, from_version=self.version, to_version=version, ok=False)
            if version == self.version:
                if self.state == ReplicaState.canary and not hold:
                    self.state = ReplicaState.ready
                return report.model_copy(update={"ok": True, "noop": True, "checksums_ok": True})
            target, _ = await asyncio.to_thread(materialise, self.store, self.base, version, self.current)
            previous = self.current.covering(target, self.base)
            files = await asyncio.to_thread(write_swap_files, self.work_dir, target, previous)
            report.materialise_s = time.perf_counter() - t0
            report.matrices, report.bytes_loaded = len(target.matrices), target.dense_bytes
            separation = report.min_probe_separation = min(files.separation.values(), default=None)
            rtol = self.settings.serving_verify_rtol
            if separation is not None and separation < 2 * rtol:
                log.warning("%s: version %d changes some matrix too little for the output check to tell it from "
                            "the old one (separation %.4f); the checksums still apply", self.name, version, separation)
            starting = self.state == ReplicaState.starting
            self.state = ReplicaState.swapping  # the gate: no new request enters the engine from here
            paused_at = time.perf_counter()
            try:
                timeout = pause_timeout_s or self.settings.serving_pause_timeout_s
                report.drain = await drain(self.engine, self._admitted, timeout, self.name)
                t_load = time.perf_counter()
                paused = True
                try:
                    report.checksums_ok, report.max_probe_error = await load_and_verify(
                        self.engine, files.target, files.probe, target, rtol
                    )
                    if not await reset_prefix_cache(self.engine):
                        raise SwapCheckError("the prefix cache could not be reset (blocks still in use)")
                    # The gate stays closed: only the check's own requests run on the new weights.
                    await self.engine.resume_generation()
                    paused = False
                    report.agreement = await self.agreement.check(self.engine, version)
                    if not report.agreement.ok:
                        raise AgreementError(report.agreement.summary())
                except Exception as err:
                    report.error = f"{type(err).__name__}: {err}"[:1000]
                    log.error("%s: swap to %d failed (%s): restoring version %s", self.name, version, report.error,
                              self.version)
                    if not paused:  # nothing runs (gate closed, the check done): restore even if pausing fails
                        with contextlib.suppress(Exception):
                            await self.engine.pause_generation(mode="wait", clear_cache=False)
                    await self._restore(files, previous)
                else:
                    await self.engine.update_weight_version(str(version))
                    self.version, self.current = version, target
                    report.ok = True
                report.reload_s = time.perf_counter() - t_load
            finally:
                if self.state != ReplicaState.failed:
                    await self.engine.resume_generation()
                    held = ReplicaState.canary if hold and report.ok else ReplicaState.ready
                    self.state = ReplicaState.starting if starting else held
                report.pause_s = time.perf_counter() - paused_at
                shutil.rmtree(files.folder, ignore_errors=True)
            report.total_s = time.perf_counter() - t0
            self.counts["swaps"] += 1
            self.last_swap = report
            self.metrics.observe("editq_swap_duration_seconds", report.pause_s, replica=self.name)
            self.metrics.set("editq_replica_version", self.version, replica=self.name)
            log.info("%s: swap %s -> %d %s, paused %.3f s (%s drain)", self.name, report.from_version, version,
                     "ok" if report.ok else "FAILED", report.pause_s, report.drain)
            return report

    async def _restore(self, files: SwapFiles, previous: VersionMatrices) -> None:
        """Put the previous matrices back (they match any stale prefix cache); failing that, stop serving."""
        try:
            await load_and_verify(self.engine, files.previous, files.probe, previous, self.settings.serving_verify_rtol)
            if not await reset_prefix_cache(self.engine):
                raise SwapCheckError("the prefix cache could not be reset after restoring")
        except Exception as err:
            self.state = ReplicaState.failed
            self.error = f"restore of version {self.version} failed: {type(err).__name__}: {err}"[:1000]
            log.exception("%s: %s", self.name, self.error)

