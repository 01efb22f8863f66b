"""Authentication and authorisation for the HTTP API, as FastAPI dependencies.

A request carries ``Authorization: Bearer <secret>`` (how OpenAI clients send keys): an editq API key or, when
``EDITQ_OIDC_JWKS_URL`` is set, an OIDC access token. Missing or unknown credentials answer 401, a credential
without the route's scope 403, a key over its rate limit or edit quota 429 with ``Retry-After``. Limits are
moving windows kept in Redis by the ``limits`` library, so every API process enforces the same budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import HTTPException, Request
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from pydantic import BaseModel
from redis.asyncio import Redis

from controller.security.keys import KeyStore, Scope
from controller.security.oidc import OidcVerifier, TokenError
from shared.settings import Settings

ALL_SCOPES = frozenset(Scope)


class Principal(BaseModel):
    """Who is calling: the name recorded as an edit's ``source`` and in the audit trail."""

    name: str
    scopes: frozenset[Scope]
    via: Literal["key", "oidc", "open"]
    key_id: str | None = None
    rate_limit: str | None = None

    def allows(self, scope: Scope) -> bool:
        return Scope.admin in self.scopes or scope in self.scopes

    @property
    def limit_id(self) -> str:
        return self.key_id or self.name

    @property
    def audit_name(self) -> str:
        """For the audit trail: the name and which key it was (several keys may share a name)."""
        return f"{self.name}#{self.key_id}" if self.key_id else self.name


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


class AccessControl:
    """One per API process: verifies credentials, checks scopes, charges rate limits and quotas."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.enabled = settings.auth
        self.keys = KeyStore(redis, settings.namespace)
        storage = RedisStorage("async+" + settings.redis_url, implementation="redispy",
                               key_prefix="{" + settings.namespace + "}:ratelimit")
        self.limiter = MovingWindowRateLimiter(storage)
        self.default_limits = parse_many(settings.rate_limit)
        self.edit_quota = parse_many(settings.edit_quota)
        self.oidc = OidcVerifier(settings) if settings.oidc_jwks_url else None

    async def authenticate(self, request: Request) -> Principal:
        if not self.enabled:
            return Principal(name="api", scopes=ALL_SCOPES, via="open")
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise _unauthorized("missing credentials: send 'Authorization: Bearer <API key>' (editq keys create)")
        if credential.startswith("eq_"):
            key = await self.keys.verify(credential)
            if key is None:
                raise _unauthorized("unknown or revoked API key")
            return Principal(name=key.name, scopes=frozenset(key.scopes), via="key", key_id=key.key_id,
                             rate_limit=key.rate_limit)
        if self.oidc is None:
            raise _unauthorized("unknown or revoked API key")
        try:
            subject, scopes = await asyncio.to_thread(self.oidc.verify, credential)
        except TokenError as err:
            raise _unauthorized(f"invalid token: {err}") from None
        if len(subject) > 80 or not subject.isprintable():  # `source` holds at most 100 characters
            subject = "sha256-" + hashlib.sha256(subject.encode()).hexdigest()[:32]
        return Principal(name=f"oidc:{subject}", scopes=frozenset(scopes), via="oidc")

    async def _charge(self, items: list[RateLimitItem], identity: str, cost: int, what: str) -> None:
        for item in items:  # test every window first, so a refusal does not use up the others
            if not await self.limiter.test(item, identity, cost=cost):
                await self._refuse(item, identity, what)
        for item in items:
            if not await self.limiter.hit(item, identity, cost=cost):
                await self._refuse(item, identity, what)

    async def _refuse(self, item: RateLimitItem, identity: str, what: str) -> None:
        stats = await self.limiter.get_window_stats(item, identity)
        retry = max(1, int(stats.reset_time - time.time()) + 1)
        raise HTTPException(429, f"{what} exceeded: {item} per key", headers={"Retry-After": str(retry)})

    async def charge_request(self, principal: Principal) -> None:
        if principal.via == "open":
            return
        items = parse_many(principal.rate_limit) if principal.rate_limit else self.default_limits
        await self._charge(items, f"req:{principal.limit_id}", 1, "rate limit")

    async def charge_edits(self, principal: Principal, n: int) -> None:
        """The edit quota: each submitted edit counts, so one large list cannot bypass it."""
        if principal.via != "open":
            await self._charge(self.edit_quota, f"edits:{principal.limit_id}", n, "edit quota")

    def require(self, scope: Scope) -> Callable[[Request], Awaitable[Principal]]:
        """A dependency: the authenticated principal, if it holds ``scope`` and is within its rate limit."""

        async def dependency(request: Request) -> Principal:
            principal = await self.authenticate(request)
            if not principal.allows(scope):
                raise HTTPException(403, f"'{principal.name}' lacks the '{scope.value}' scope for this route")
            await self.charge_request(principal)
            request.state.principal = principal
            return principal

        return dependency
