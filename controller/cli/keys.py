"""``editq keys create|list|revoke``: manage API keys (operators with access to Redis; every change audited)."""

from __future__ import annotations

import getpass
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from controller.cli.common import console, fail, with_streams
from controller.security.keys import ApiKey, KeyStore, Scope
from shared.settings import Settings
from shared.streams import EditStreams

keys_app = typer.Typer(help="API keys for the HTTP API (bearer tokens; stored hashed in Redis).", no_args_is_help=True)
T = TypeVar("T")


def operator() -> str:
    return f"cli:{getpass.getuser()}"


def with_keys(action: Callable[[KeyStore], Awaitable[T]]) -> T:
    return with_streams(lambda streams: action(KeyStore(streams.redis, streams.namespace)))


async def create_key(store: KeyStore, name: str, scopes: list[Scope], rate_limit: str | None = None,
                     created_by: str | None = None) -> tuple[str, ApiKey]:
    return await store.create(name, scopes, created_by or operator(), rate_limit)


async def terminal_key(settings: Settings) -> str | None:
    """For `editq up` and the demo: an admin key for the person at the terminal, unless EDITQ_API_KEY already
    holds a working one (or auth is off). The secret is returned to print once."""
    if not settings.auth:
        return None
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    try:
        store = KeyStore(streams.redis, settings.namespace)
        if settings.api_key and await store.verify(settings.api_key.get_secret_value()):
            return None
        name = "local-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in getpass.getuser())[:50]
        secret, _ = await store.create(name, [Scope.admin], operator())
        return secret
    finally:
        await streams.close()


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who uses the key (recorded as the source of its edits).")],
    scope: Annotated[list[Scope] | None, typer.Option("--scope", "-s", help="Repeat for several scopes.")] = None,
    rate_limit: Annotated[str | None, typer.Option(help="e.g. '5/second;100/minute' (default EDITQ_RATE_LIMIT).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the key record and secret as JSON.")] = False,
) -> None:
    """Create a key; the secret is printed once (store it: only its digest is kept)."""
    scopes = scope or [Scope.edits_write, Scope.edits_read, Scope.query]
    try:
        secret, key = with_keys(lambda store: create_key(store, name, scopes, rate_limit))
    except ValueError as err:
        fail(str(err))
    if as_json:
        console.print_json(json.dumps({"secret": secret, **json.loads(key.model_dump_json())}))
        return
    console.print(f"created key [bold]{key.key_id}[/] for '{key.name}' with scopes {', '.join(key.scopes)}")
    console.print(f"secret (shown once): [bold]{secret}[/]")
    console.print(f"use it as: export EDITQ_API_KEY={secret}  # or header 'Authorization: Bearer <secret>'")


@keys_app.command("list")
def list_keys() -> None:
    """Every key ever created (revoked ones marked); never the secrets."""
    keys = with_keys(lambda store: store.list())
    table = Table("key_id", "name", "scopes", "created", "by", "revoked", "rate limit")
    for k in keys:
        table.add_row(k.key_id, k.name, ",".join(k.scopes), f"{k.created_at:%Y-%m-%d %H:%M}", k.created_by,
                      f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "", k.rate_limit or "default")
    console.print(table)


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key_id shown by `editq keys list`.")]) -> None:
    """Revoke a key: it stops working at once, in every API process."""
    key = with_keys(lambda store: store.revoke(key_id, operator()))
    if key is None:
        fail(f"no key with id {key_id!r}", code=1)
    console.print(f"revoked key {key.key_id} ('{key.name}')")
