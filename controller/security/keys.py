"""API keys: random bearer secrets, stored only as SHA-256 digests in Redis, each with a name and scopes.

A key is ``eq_<key_id>_<secret>``; Redis holds ``{ns}:apikey:<sha256(key)>`` (the record) and ``{ns}:apikeys``
(key_id -> digest, for listing and revoking). The secret has 256 bits of entropy, so a plain digest is enough (no
password hashing needed) and a stolen Redis dump reveals no usable key. Every check reads Redis, so a revoked key
stops working at once, in every API process. Creating and revoking are audited.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, TypeAdapter
from redis.asyncio import Redis

from shared.audit import AuditAction, AuditEntry, AuditTrail


class Scope(StrEnum):
    edits_write = "edits:write"  # submit edits
    edits_read = "edits:read"  # edit status, outcomes, queue, versions
    query = "query"  # ask the served model (OpenAI-compatible routes)
    metrics = "metrics"  # /metrics (for Prometheus)
    admin = "admin"  # everything, including the audit trail, pause/resume, rollbacks and keys


# No ':' -- names cannot pose as 'oidc:<sub>' or 'cli:<user>' principals; 'controller' and 'api' are reserved.
KeyName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")]
RESERVED_NAMES = frozenset({"controller", "api", "anonymous"})


class ApiKey(BaseModel):
    """A key's record (never the secret)."""

    key_id: str
    name: KeyName = Field(description="The principal: recorded as the source of every edit this key submits.")
    scopes: list[Scope]
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None
    rate_limit: str | None = Field(default=None, description="Overrides EDITQ_RATE_LIMIT for this key.")

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, scope: Scope) -> bool:
        return Scope.admin in self.scopes or scope in self.scopes


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        tag = "{" + namespace + "}"
        self._record = f"{tag}:apikey:"
        self.index_key = f"{tag}:apikeys"
        self.audit = AuditTrail(redis, namespace)

    async def create(
        self, name: str, scopes: list[Scope], created_by: str, rate_limit: str | None = None
    ) -> tuple[str, ApiKey]:
        """A new key; the secret is returned once and never stored."""
        if rate_limit is not None:
            from limits import parse_many

            parse_many(rate_limit)  # ValueError names a malformed limit before anything is stored
        TypeAdapter(KeyName).validate_python(name)  # a bad name fails before anything is stored
        if name.lower() in RESERVED_NAMES:
            raise ValueError(f"key name {name!r} is reserved")
        while True:
            key_id = secrets.token_hex(8)
            secret = f"eq_{key_id}_{secrets.token_urlsafe(32)}"
            hashed = digest(secret)
            if await self.redis.hsetnx(self.index_key, key_id, hashed):  # never overwrite another key's id
                break
        record = ApiKey(key_id=key_id, name=name, scopes=sorted(set(scopes)), created_at=datetime.now(UTC),
                        created_by=created_by, rate_limit=rate_limit)
        await self.redis.set(self._record + hashed, record.model_dump_json())
        await self.audit.append(AuditEntry(action=AuditAction.key_created, principal=created_by,
                                           detail=f"key {key_id} '{name}' scopes {','.join(record.scopes)}"))
        return secret, record

    async def verify(self, secret: str) -> ApiKey | None:
        """The active key for a presented secret, or None (unknown, malformed or revoked)."""
        if not secret.startswith("eq_") or len(secret) > 200:
            return None
        raw = await self.redis.get(self._record + digest(secret))
        if raw is None:
            return None
        key = ApiKey.model_validate_json(raw)
        return key if key.active else None

    async def list(self) -> list[ApiKey]:
        index = await self.redis.hgetall(self.index_key)
        out = []
        for hashed in index.values():
            raw = await self.redis.get(self._record + _text(hashed))
            if raw is not None:
                out.append(ApiKey.model_validate_json(raw))
        return sorted(out, key=lambda k: k.created_at)

    async def revoke(self, key_id: str, revoked_by: str) -> ApiKey | None:
        """Revoke at once (the record stays, marked, for the audit trail); None when no such key."""
        hashed = await self.redis.hget(self.index_key, key_id)
        if hashed is None:
            return None
        key_name = self._record + _text(hashed)
        raw = await self.redis.get(key_name)
        if raw is None:
            return None
        key = ApiKey.model_validate_json(raw)
        if key.active:
            key = key.model_copy(update={"revoked_at": datetime.now(UTC)})
            await self.redis.set(key_name, key.model_dump_json())
            await self.audit.append(AuditEntry(action=AuditAction.key_revoked, principal=revoked_by,
                                               detail=f"key {key_id} '{key.name}'"))
        return key


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
