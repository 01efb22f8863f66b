"""HTTP API (FastAPI): the door for edits, their status, versions, and Prometheus metrics.

``POST /v1/edits`` validates and queues; an invalid edit is answered 422 with the field and reason and never
enters the stream. ``/metrics`` serves this process's counters plus gauges read at scrape time from Redis and the
weight store (queue lag, dead letters, versions, the collapse metrics of the newest version), so one scrape shows
the pipeline's state whichever process produced it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as FastPath
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from controller.api.openai_api import install_openai_errors
from controller.pipeline import operations, undo
from controller.security.access import AccessControl, Principal
from controller.security.body_limit import BodySizeLimit
from controller.security.keys import Scope
from shared.audit import AuditAction, AuditEntry
from shared.metrics import SPECS, Kind, PrometheusMetrics, parse_metric_key
from shared.outcomes import EditOutcome, EditStatus, SubmitResult
from shared.schemas import EditRequest, intake_problems
from shared.settings import Settings
from shared.streams import EditStreams
from shared.weight_store import LocalWeightStore, StoreError, VersionManifest


class VersionsView(BaseModel):
    head: int
    live: int
    versions: list[dict]


class QueueView(BaseModel):
    lag: int
    pending: int
    length: int
    dead_letters: int
    paused: bool = False


class StateCollector:
    """Gauges computed at scrape time from Redis and the store (a custom prometheus-client collector)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=2)
        self.store = LocalWeightStore(settings.resolved_store_dir())
        tag = "{" + settings.namespace + "}"
        self.keys = {k: f"{tag}:{k}" for k in ("edits", "dlq", "head", "live")}

    def _gauge(self, name: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
        spec = SPECS[name]
        family = GaugeMetricFamily(name, spec.doc, labels=list(spec.labels))
        family.add_metric([labels[k] for k in spec.labels] if labels else [], value)
        return family

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            head = int(self.redis.get(self.keys["head"]) or 0)
            live = int(self.redis.get(self.keys["live"]) or 0)
            dlq = self.redis.xlen(self.keys["dlq"])
            groups = self.redis.xinfo_groups(self.keys["edits"]) if self.redis.exists(self.keys["edits"]) else []
        except Exception:
            return
        group = next((g for g in groups if g["name"] == "controller"), None)
        yield self._gauge("editq_weight_version", head)
        yield self._gauge("editq_live_version", live)
        pending, version = 0, head
        try:
            while version > live:  # parent links: version numbers are not contiguous
                version, pending = self.store.manifest(version).parent, pending + 1
        except StoreError:
            pass
        yield self._gauge("editq_versions_pending_rollout", pending)
        yield self._gauge("editq_dead_letter_entries", dlq)
        if group is not None:
            yield self._gauge("editq_queue_lag_entries", int(group.get("lag") or 0))
            yield self._gauge("editq_queue_pending_entries", int(group["pending"]))
        if head:
            try:
                manifest = self.store.manifest(head)
            except StoreError:
                return
            families: dict[str, GaugeMetricFamily] = {}
            for key, value in manifest.metrics.items():
                parsed = parse_metric_key(key)
                if parsed is None or SPECS[parsed[0]].kind != "gauge":
                    continue
                name, labels = parsed
                spec = SPECS[name]
                family = families.setdefault(name, GaugeMetricFamily(name, spec.doc, labels=list(spec.labels)))
                family.add_metric([labels.get(k, "") for k in spec.labels], value)
            yield from families.values()


def _mount_serving(app: FastAPI, settings: Settings, access: AccessControl) -> None:
    """OpenAI-compatible queries over the serving replicas (found by name on the Ray cluster, so the API may start
    before them and survives their restarts); the same keys, sent the way OpenAI clients send them."""
    import ray

    from controller.api.openai_api import build_openai_router
    from controller.rollout.router import Router, replica_clients

    if not ray.is_initialized():
        ray.init(address="auto", namespace="editq", log_to_driver=False)
    router = Router(replica_clients(settings), settings)
    app.include_router(build_openai_router(lambda: router, settings.served_model_name(), lambda: app.state.streams),
                       dependencies=[Depends(access.require(Scope.query))])


OUTCOMES_AFTER = r"^(0|\d{1,20}(-\d{1,20})?)$"
AUDIT_AFTER = r"^(-|\d{1,20}(-\d{1,20})?)$"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = PrometheusMetrics(kinds=frozenset({Kind.counter, Kind.histogram}))  # gauges: StateCollector
    metrics.registry.register(StateCollector(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.streams = EditStreams.from_url(settings.redis_url, settings.namespace, settings.stream_maxlen)
        await app.state.streams.ensure_group()
        yield
        await app.state.streams.close()
        await access_redis.aclose()

    docs = {} if settings.api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="editq", version="0.1.0", lifespan=lifespan, **docs,
        description="Queue fact corrections for a served LLM; follow them to the weight version that holds them. "
        "Every route but /healthz (and these docs, unless EDITQ_API_DOCS=false) takes 'Authorization: Bearer <API "
        "key>' (editq keys create).",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.store = LocalWeightStore(settings.resolved_store_dir())
    access_redis = AsyncRedis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
    access = AccessControl(settings, access_redis)
    app.state.access = access
    writer, reader, admin = (Depends(access.require(s)) for s in (Scope.edits_write, Scope.edits_read, Scope.admin))

    def _count_invalid(request: Request) -> None:
        if request.url.path.startswith("/v1/edits"):
            metrics.inc("editq_edits_invalid")

    install_openai_errors(app, _count_invalid)  # OpenAI's error schema on its routes, FastAPI's elsewhere

    @app.post("/v1/edits", status_code=202, response_model=SubmitResult | list[SubmitResult],
              responses={409: {"description": "an edit_id already used for other content"},
                         413: {"description": "body or list too large"}, 429: {"description": "rate limit"}})
    async def submit_edits(
        body: EditRequest | list[EditRequest], principal: Principal = writer
    ) -> SubmitResult | list[SubmitResult]:
        """Queue one edit or a list; each answer holds the ``edit_id`` to follow (``duplicate`` if known). The
        edit's ``source`` is the caller's identity (whatever the body says)."""
        streams: EditStreams = app.state.streams
        many = isinstance(body, list)
        items = body if many else [body]
        problems = [{"loc": ["body", *([i] if many else []), *loc], "msg": msg, "type": "value_error"}
                    for i, r in enumerate(items) for loc, msg in intake_problems(r)]
        if problems:
            metrics.inc("editq_edits_invalid")
            raise HTTPException(422, problems)
        # Re-validated, not copied: the identity must satisfy the same rules as any field.
        requests = [EditRequest.model_validate({**r.model_dump(), "source": principal.name}) for r in items]
        if len(requests) > settings.max_edits_per_request:
            raise HTTPException(413, [{"loc": ["body"], "type": "too_long",
                                       "msg": f"at most {settings.max_edits_per_request} edits per request"}])
        if not requests:
            raise HTTPException(422, [{"loc": ["body"], "type": "too_short", "msg": "the list of edits is empty"}])
        ids = [r.edit_id for r in requests]
        if len(set(ids)) < len(ids):
            raise HTTPException(422, [{"loc": ["body", "edit_id"], "type": "duplicate",
                                       "msg": "the same edit_id twice in one request"}])
        await _refuse_conflicts(streams, requests)  # before anything is stored
        if settings.retrieval_enabled:
            held = await streams.redis.hlen(f"{settings.retrieval_prefix()}:entries")
            if held + len(requests) > settings.retrieval_max_entries:
                raise HTTPException(503, f"retrieval tier at capacity ({held} of {settings.retrieval_max_entries} "
                                    "entries): an accepted edit must have somewhere to go; retry later",
                                    headers={"Retry-After": "60"})
        await access.charge_edits(principal, len(requests))
        results = [await streams.submit(r, principal.audit_name) for r in requests]
        conflicts = [r.edit_id for r in results if r.conflict]  # raced with another writer after the check
        if conflicts:
            raise HTTPException(409, f"edit_id already used for other content: {', '.join(conflicts)}")
        for result in results:
            if not result.duplicate:
                metrics.inc("editq_edits_submitted", source=principal.name[:32])
        return results if many else results[0]

    @app.post("/v1/edits/{edit_id:path}:revert", status_code=202, dependencies=[admin],
              responses={404: {"description": "no such edit"}, 409: {"description": "not decided yet, or reverted"}})
    async def revert_edit(edit_id: Annotated[str, FastPath(max_length=128)], request: Request) -> dict[str, str]:
        """Take an edit out of the served model: a new version without it (normal gated rollout, history kept),
        and out of the retrieval tier. Follow it with ``GET /v1/edits/{id}`` (``reverted_in``) or the audit."""
        try:
            await undo.request_revert(app.state.streams, edit_id, request.state.principal.audit_name)
        except undo.UndoRefused as err:
            raise HTTPException(err.status, str(err)) from None
        return {"edit_id": edit_id, "status": "revert queued"}

    @app.post("/v1/admin/rollback", status_code=202, dependencies=[admin])
    async def rollback(to: Annotated[int, Query(ge=0, description="Version to make head and live again.")],
                       request: Request) -> dict[str, int | str]:
        """Make an earlier version (on the head's lineage) live again on purpose; later versions are kept, marked
        ``reverted``, and their edits go to the retrieval tier."""
        try:
            await undo.request_rollback(app.state.streams, app.state.store, to, request.state.principal.audit_name)
        except undo.UndoRefused as err:
            raise HTTPException(err.status, [{"loc": ["query", "to"], "msg": str(err), "type": "value_error"}]) \
                from None
        return {"to": to, "status": "rollback queued"}

    @app.get("/v1/edits/{edit_id:path}", response_model=EditStatus, dependencies=[reader])
    async def edit_status(edit_id: Annotated[str, FastPath(max_length=128)]) -> EditStatus:
        status = await app.state.streams.status(edit_id)
        if status is None:
            raise HTTPException(404, f"no edit with id {edit_id!r}")
        return status

    @app.get("/v1/outcomes", response_model=list[EditOutcome], dependencies=[reader])
    async def outcomes(
        after: Annotated[str, Query(pattern=OUTCOMES_AFTER, description="Stream id to read after ('0': all).")]
        = "0",
        count: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[EditOutcome]:
        return [o for _, o in await app.state.streams.outcomes(after=after, count=count)]

    @app.get("/v1/queue", response_model=QueueView, dependencies=[reader])
    async def queue() -> QueueView:
        streams: EditStreams = app.state.streams
        depth = await streams.queue_depth()
        return QueueView(**depth, dead_letters=await streams.redis.xlen(streams.dlq_key),
                         paused=await operations.paused(streams) is not None)

    @app.get("/v1/weights", response_model=VersionsView, dependencies=[reader])
    async def weights(limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> VersionsView:
        """Weight versions, newest first, with the manifest summary and status (rolled-back ones included)."""
        streams: EditStreams = app.state.streams
        store: LocalWeightStore = app.state.store
        rows = []
        for version in sorted(store.versions(), reverse=True)[:limit]:
            info = await streams.version_info(version)
            if not info:
                continue  # written to the store but never committed (a crash before its commit)
            manifest: VersionManifest = store.manifest(version)
            rows.append({
                "version": version, "parent": manifest.parent, "status": info.get("status"), "kind": manifest.kind,
                "edits": len(manifest.edit_ids), "algo": manifest.algo, "created_at": manifest.created_at,
                "delta_bytes": sum(m.delta_bytes for m in manifest.matrices),
            })
        return VersionsView(head=await streams.head(), live=await streams.live(), versions=rows)

    @app.get("/v1/audit", response_model=list[AuditEntry], dependencies=[admin])
    async def audit(
        after: Annotated[str, Query(pattern=AUDIT_AFTER, description="Stream id to read after ('-': from the start).")]
        = "-",
        count: Annotated[int, Query(ge=1, le=1000)] = 100,
        action: AuditAction | None = None,
        newest_first: bool = False,
    ) -> list[AuditEntry]:
        """The append-only audit trail: who changed what, when, in which version."""
        return await app.state.streams.audit.read(after=after, count=count, action=action, newest_first=newest_first)

    @app.post("/v1/admin/pause", dependencies=[admin])
    async def pause(request: Request, reason: Annotated[str, Query(max_length=200)] = "") -> dict[str, bool]:
        """Stop the controller taking new batches (edits still queue; nothing is lost)."""
        await operations.pause(app.state.streams, request.state.principal.audit_name, reason)
        return {"paused": True}

    @app.post("/v1/admin/resume", dependencies=[admin])
    async def resume(request: Request) -> dict[str, bool]:
        await operations.resume(app.state.streams, request.state.principal.audit_name)
        return {"paused": False}

    if settings.serving_replicas > 0:
        _mount_serving(app, settings, access)

    @app.get("/healthz", responses={503: {"description": "Redis unreachable, or the controller is not healthy"}})
    async def healthz() -> dict[str, str]:
        """Ready when Redis answers and the controller's heartbeat says it runs (state, no secrets)."""
        try:
            healthy, controller = await operations.controller_health(app.state.streams)
        except Exception as err:
            raise HTTPException(503, f"redis unavailable: {type(err).__name__}") from None
        if not healthy:
            raise HTTPException(503, f"controller {controller.get('state')}: {controller.get('error') or ''}".strip())
        state = str(controller.get("state"))
        return {"status": "degraded" if state == "retrying" else "ok", "controller": state}

    metrics_guard = [] if settings.metrics_public else [Depends(access.require(Scope.metrics))]

    @app.get("/metrics", dependencies=metrics_guard)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _refuse_conflicts(streams: EditStreams, requests: list[EditRequest]) -> None:
    """409 when an edit_id is already known with other content (a reused id must not read as 'duplicate')."""
    known = await streams.requests([r.edit_id for r in requests])
    clashes = [r.edit_id for r in requests if r.edit_id in known and known[r.edit_id].content_key() != r.content_key()]
    if clashes:
        raise HTTPException(409, f"edit_id already used for other content: {', '.join(clashes)}")
