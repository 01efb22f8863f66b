"""OpenAI-compatible query endpoints over the serving replicas (the subset of vLLM's server that clients use).

``POST /v1/completions``, ``POST /v1/chat/completions`` (model, prompt/messages, max_tokens, temperature, top_p,
stop, seed, stream as server-sent events), ``GET /v1/models``, and ``GET /v1/versions`` (each replica's state and
weight version, and the live version). Read-your-writes: ``min_version`` in the body or the
``X-Editq-Min-Version`` header routes only to replicas at that version or newer (waiting briefly for a rollout),
else answers 503. Every response names the weight version that produced it: header ``X-Editq-Version`` and an
``editq`` object in the body (in every chunk when streaming).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Header, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from controller.api.openai_logprobs import chat_logprobs, completion_logprobs
from controller.rollout.router import NoReplicaError, Router
from shared.streams import EditStreams
from workers.serving.schemas import (
    MAX_LOGPROBS,
    ChatMessage,
    GenerateRequest,
    GenerateResult,
    ReplicaUnavailableError,
    RequestAbortedError,
    StreamChunk,
)

# Answered 503: no replica (at min_version) came up, or every retry found replicas swapping / aborting.
UNAVAILABLE = (NoReplicaError, ReplicaUnavailableError, RequestAbortedError)
# Bounds on the work one request may ask for (the body itself is capped by EDITQ_MAX_BODY_BYTES).
MAX_PROMPTS, MAX_NEW_TOKENS, MAX_STOPS, MAX_MESSAGES, MAX_N = 64, 4096, 4, 256, 8
Prompt = Annotated[str, StringConstraints(max_length=32_000)]
StreamOption = Literal["include_usage", "continuous_usage_stats"]
MIN_VERSION_HEADER = "X-Editq-Min-Version"
VERSION_HEADER = "X-Editq-Version"


UNSUPPORTED_DEFAULTS: dict[str, Any] = {  # OpenAI parameters accepted only at their no-op value (else 400)
    "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None,),
    "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,), "functions": (None, []), "function_call": (None,),
}


def _is_no_op(value: Any, allowed: tuple) -> bool:
    """Equal in value *and* type (``logprobs: 0`` is a request for logprobs, not ``False``)."""
    return any(value == a and type(value) is type(a) for a in allowed) or (
        isinstance(value, int | float) and not isinstance(value, bool)
        and any(type(a) in (int, float) and value == a for a in allowed))


class _Sampling(BaseModel):
    """OpenAI's request fields this server implements; any other field answers 400 naming it (never ignored), and
    the parameters in ``UNSUPPORTED_DEFAULTS`` are accepted only at their no-op value."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2, description="vLLM's extension.")
    top_k: int | None = Field(default=None, ge=-1, description="vLLM's extension; 0 or -1: no cut.")
    min_p: float | None = Field(default=None, ge=0, le=1, description="vLLM's extension.")
    n: int = Field(default=1, ge=1, le=MAX_N, description="Choices per prompt (n > 1 with stream is refused).")
    stream: bool = False
    user: str | None = Field(default=None, max_length=256, description="OpenAI's end-user id; recorded nowhere.")
    stream_options: dict[StreamOption, bool] | None = None
    min_version: int | None = Field(default=None, ge=0, description="Read-your-writes: only replicas at >= this.")
    retrieval: bool = Field(default=True, description="Let the retrieval tier answer with edits it holds.")

    @model_validator(mode="before")
    @classmethod
    def _only_no_ops(cls, data: Any) -> Any:
        """Unsupported OpenAI parameters at their no-op value are dropped here; any other value is a 400."""
        if not isinstance(data, dict):
            return data
        for name in data.keys() & UNSUPPORTED_DEFAULTS.keys():
            if not _is_no_op(data[name], UNSUPPORTED_DEFAULTS[name]):
                raise UnsupportedParameter(name)
        return {k: v for k, v in data.items() if k not in UNSUPPORTED_DEFAULTS}

    @model_validator(mode="after")
    def _stream_options(self) -> _Sampling:
        if (self.stream_options or {}).get("continuous_usage_stats"):
            raise UnsupportedParameter("stream_options")
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter("stream_options", "stream_options is only allowed with stream=true")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprobs_asked(self) -> int | None:
        """How many top tokens each generated token reports (None: no log-probabilities asked); each route's
        request model says how it asks."""
        return None

    def generation(self, j: int, min_version: int | None) -> dict[str, Any]:
        """The ``GenerateRequest`` fields for sample ``j`` of ``n``, shared by both routes."""
        sampling = {name: value for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k",
                                             "min_p") if (value := getattr(self, name)) is not None}
        return {"temperature": self.temperature, "top_p": self.top_p, "stop": self.stops(),
                "seed": _sample_seed(self.seed, j), "ignore_eos": self.ignore_eos, "min_version": min_version,
                "retrieval": self.retrieval, "logprobs": self.top_logprobs_asked(), **sampling}


class CompletionRequest(_Sampling):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True,
                                 description="Log-probability of each token and of this many top candidates.")
    echo: bool = Field(default=False, description="Put the prompt in front of each choice's text.")

    @model_validator(mode="after")
    def _echo(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:  # would need the prompt's own log-probabilities
            raise UnsupportedParameter("echo", "`echo` together with `logprobs` is not supported by this server")
        return self

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = Field(default=False, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidParameter("top_logprobs", "top_logprobs needs logprobs=true")
        return self

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class InvalidParameter(ValueError):
    """A request-level check that names its parameter (answered 400 with ``param`` set)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.param = name


class UnsupportedParameter(InvalidParameter):
    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(name, message or f"`{name}` is not supported by this server (only its default is accepted)")


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def install_openai_errors(app: FastAPI, on_other_invalid: Callable[[Request], None] | None = None) -> None:
    """Errors on the OpenAI routes in OpenAI's schema (``{"error": {message, type, param, code}}``): invalid or
    unsupported parameters 400 naming the parameter, other HTTP errors with their status. Other routes keep
    FastAPI's errors (``on_other_invalid`` sees their validation failures, e.g. to count them)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if not request.url.path.startswith(OPENAI_PATHS):
            if on_other_invalid is not None:
                on_other_invalid(request)
            return await request_validation_exception_handler(request, exc)
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, InvalidParameter):
            return _error(400, str(cause), "invalid_request_error", cause.param)
        param = loc[0] if loc else None
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if not request.url.path.startswith(OPENAI_PATHS):
            return await http_exception_handler(request, exc)
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(exc.status_code, "invalid_request_error")
        response = _error(exc.status_code, str(exc.detail), kind)
        response.headers.update(exc.headers or {})
        return response


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def build_openai_router(get_router: Callable[[], Router], model_name: str,
                        streams: Callable[[], EditStreams | None] | None = None) -> APIRouter:
    """The endpoints as an ``APIRouter``; ``get_router`` returns the live ``Router`` (built after Ray is up),
    ``streams`` optionally the ``EditStreams`` whose live pointer ``/v1/versions`` reports."""
    api = APIRouter(tags=["openai"])

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise HTTPException(404, f"The model `{model}` does not exist (this server serves `{model_name}`).")

    def min_version(body: _Sampling, header: str | None) -> int | None:
        try:
            from_header = int(header) if header else None
        except ValueError:
            raise HTTPException(400, f"{MIN_VERSION_HEADER} must be an integer, got {header!r}") from None
        versions = [v for v in (body.min_version, from_header) if v is not None]
        return max(versions) if versions else None

    def editq(results: list[GenerateResult] | list[StreamChunk]) -> dict[str, Any]:
        return {"version": min(r.version for r in results), "versions": [r.version for r in results],
                "replicas": [r.replica for r in results],
                "retrieved": [r.retrieved.model_dump() if r.retrieved else None for r in results]}

    async def run(requests: list[GenerateRequest]) -> list[GenerateResult] | JSONResponse:
        try:
            return list(await asyncio.gather(*(get_router().generate(r) for r in requests)))
        except UNAVAILABLE as err:
            return _error(503, str(err), "ServiceUnavailable")

    async def open_stream(request: GenerateRequest) -> tuple[StreamChunk, AsyncIterator[StreamChunk]] | JSONResponse:
        chunks = get_router().stream(request)
        try:
            return await chunks.__anext__(), chunks
        except UNAVAILABLE as err:
            return _error(503, str(err), "ServiceUnavailable")

    def sse(first: StreamChunk, rest: AsyncIterator[StreamChunk], shape: Callable[[StreamChunk], dict],
            usage: dict | None = None) -> Any:
        """``usage``: the envelope of the final usage chunk (``stream_options.include_usage``), else None."""

        async def body() -> AsyncIterator[bytes]:
            last = first
            try:
                yield _sse(shape(first))
                async for chunk in rest:
                    last = chunk
                    yield _sse(shape(chunk))
                if usage is not None:  # OpenAI's last chunk: no choices, the request's token counts
                    counts = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                              "total_tokens": last.prompt_tokens + last.completion_tokens}
                    yield _sse({**usage, "choices": [], "usage": counts})
            except Exception as err:  # the status line is sent: report in-band, as vLLM's server does
                yield _sse({"error": {"message": f"{type(err).__name__}: {err}", "type": "InternalServerError"}})
            finally:  # also when the client disconnects: stop generating for nobody
                await rest.aclose()
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={VERSION_HEADER: str(first.version)})

    @api.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest,
                          x_editq_min_version: str | None = Header(default=None, alias=MIN_VERSION_HEADER)) -> Any:
        """Text completion (OpenAI ``/v1/completions``); the version is in ``editq`` and ``X-Editq-Version``."""
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise HTTPException(400, "prompt must not be empty")
        floor = min_version(body, x_editq_min_version)
        requests = [GenerateRequest(prompt=p, max_tokens=body.max_tokens, **body.generation(j, floor))
                    for p in prompts for j in range(body.n)]  # choice i*n + j: prompt i, sample j (OpenAI's order)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(requests) != 1:
                raise HTTPException(400, "streaming supports one prompt and n=1 per request")
            opened = await open_stream(requests[0])
            if isinstance(opened, JSONResponse):
                return opened
            first, written = opened[0], [0]

            def shape(c: StreamChunk) -> dict:
                text = (prompts[0] + c.text) if body.echo and c is first else c.text
                logprobs = completion_logprobs(c.logprobs, body.logprobs, written[0])
                written[0] += len(text)
                return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}],
                        "editq": {"version": c.version, "replica": c.replica,
                                  "retrieved": c.retrieved.model_dump() if c.retrieved else None}}

            return sse(*opened, shape, _usage_envelope(body, rid, "text_completion", created, model_name))
        results = await run(requests)
        if isinstance(results, JSONResponse):
            return results
        usage = _usage(results, body.n)
        choices = [{"index": i, "text": (requests[i].prompt if body.echo else "") + r.text,
                    "logprobs": completion_logprobs(r.logprobs, body.logprobs), "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        payload = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": choices, "usage": usage, "editq": editq(results)}
        return JSONResponse(payload, headers={VERSION_HEADER: str(payload["editq"]["version"])})

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               x_editq_min_version: str | None = Header(default=None, alias=MIN_VERSION_HEADER)) -> Any:
        """Chat completion (OpenAI ``/v1/chat/completions``), rendered with the model's chat template."""
        check_model(body.model)
        floor = min_version(body, x_editq_min_version)
        requests = [GenerateRequest(messages=body.messages, max_tokens=body.max_completion_tokens or body.max_tokens
                                    or 256, **body.generation(j, floor)) for j in range(body.n)]
        top_n = body.top_logprobs_asked()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if body.n != 1:
                raise HTTPException(400, "streaming supports n=1 per request")
            opened = await open_stream(requests[0])
            if isinstance(opened, JSONResponse):
                return opened
            first = opened[0]

            def shape(c: StreamChunk) -> dict:
                delta = {"role": "assistant", "content": c.text} if c is first else {"content": c.text}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": chat_logprobs(c.logprobs, top_n),
                                     "finish_reason": c.finish_reason}],
                        "editq": {"version": c.version, "replica": c.replica}}

            return sse(*opened, shape, _usage_envelope(body, rid, "chat.completion.chunk", created, model_name))
        results = await run(requests)
        if isinstance(results, JSONResponse):
            return results
        payload = {
            "id": rid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                         "logprobs": chat_logprobs(r.logprobs, top_n), "finish_reason": r.finish_reason}
                        for i, r in enumerate(results)],
            "usage": _usage(results, body.n), "editq": editq(results),
        }
        return JSONResponse(payload, headers={VERSION_HEADER: str(payload["editq"]["version"])})

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "editq"}]}

    @api.get("/v1/versions")
    async def versions() -> dict:
        """Each replica's state and weight version (and the live version when Redis is wired)."""
        views = await get_router().refresh(force=True)
        live = None
        if streams is not None and (s := streams()) is not None:
            live = await s.live()
        return {"live": live, "replicas": [
            {"name": v.name, "state": v.state, "version": v.version, "healthy": v.healthy, "error": v.error}
            for v in views
        ]}

    return api


def _sample_seed(seed: int | None, j: int) -> int | None:
    """Sample j of n: its own seed (so n > 1 samples differ, and each is reproducible)."""
    return None if seed is None else seed + j


def _usage_envelope(body: _Sampling, rid: str, kind: str, created: int, model: str) -> dict | None:
    options = body.stream_options or {}
    return {"id": rid, "object": kind, "created": created, "model": model} if options.get("include_usage") else None


def _usage(results: list[GenerateResult], n: int = 1) -> dict[str, int]:
    """Each prompt's tokens once (``n`` samples of a prompt share it), every sample's completion tokens."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
