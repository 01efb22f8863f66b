"""What every ``editq`` sub-command shares: consoles, the error exit, common options, settings with overrides."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from shared.settings import Settings

if TYPE_CHECKING:
    from shared.streams import EditStreams

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

HomeOpt = Annotated[Path | None, typer.Option("--home", help="Cache root (env EDITQ_HOME).")]
ModelOpt = Annotated[
    Path | None, typer.Option("--model", help="Any HF-format causal-LM directory (default: the fetched SmolLM2).")
]


def settings_with(home: Path | None = None, model: Path | None = None) -> Settings:
    """Settings from the environment, with the command line's --home / --model on top."""
    overrides: dict[str, Any] = {}
    if home is not None:
        overrides["home"] = home
    if model is not None:
        overrides["model_path"] = model
    return Settings(**overrides)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error for people and exit (2: bad input, 1: not found / partly rejected)."""
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=code)


def with_streams(action: Callable[[EditStreams], Awaitable[T]]) -> T:
    """Run ``action`` on the configured Redis (one event loop, closed after); an unreachable Redis is a clear error
    that never prints the URL (it may hold a password)."""
    from redis.exceptions import RedisError

    from shared.streams import EditStreams

    settings = Settings()

    async def go() -> T:
        streams = EditStreams.from_url(settings.redis_url, settings.namespace, settings.stream_maxlen)
        try:
            return await action(streams)
        finally:
            await streams.close()

    try:
        return asyncio.run(go())
    except (OSError, RedisError) as err:
        fail(f"cannot reach Redis at the configured EDITQ_REDIS_URL: {type(err).__name__}")
