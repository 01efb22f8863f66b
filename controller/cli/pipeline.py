"""``editq submit / status / watch / up / api``: feed the queue, follow edits, run the pipeline in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from redis.exceptions import RedisError
from rich.live import Live
from rich.table import Table

from controller.cli.common import console, err_console, fail
from shared.schemas import EditRequest
from shared.settings import Settings, redacted_url
from shared.streams import EditStreams


def read_requests(source: str) -> tuple[list[EditRequest], list[str]]:
    """Edit requests from a file (any format the loaders read) or ``-`` (JSON/JSONL on stdin); bad records are
    returned as error lines naming the record and field, never queued."""
    from workers.datasets import DataFormatError, parse_each, read_records_text

    if source == "-":
        text, name, jsonl = sys.stdin.read(), "stdin", None
    else:
        path = Path(source)
        if not path.is_file():
            fail(f"{source}: no such file")
        text, name, jsonl = path.read_text(encoding="utf-8"), path.name, path.suffix == ".jsonl"
    try:
        records = read_records_text(text, name, jsonl=jsonl)
    except DataFormatError as err:
        fail(str(err))
    good, errors = [], []
    for item in parse_each(records, name):
        (errors.append(str(item)) if isinstance(item, DataFormatError) else good.append(item))
    return good, errors


def submit(
    source: Annotated[str, typer.Argument(help="JSONL of EditRequest, any data file the loaders read, or - (stdin).")],
    limit: Annotated[int | None, typer.Option(min=1, help="Submit only the first N valid records.")] = None,
) -> None:
    """Validate edits and queue them; prints each accepted edit_id (duplicates are reported, not re-queued)."""
    settings = Settings()
    requests, errors = read_requests(source)
    for line in errors:
        err_console.print(f"[red]rejected[/] {line}")
    requests = requests[:limit] if limit else requests

    async def go() -> list:
        streams = EditStreams.from_url(settings.redis_url, settings.namespace, settings.stream_maxlen)
        try:
            await streams.ensure_group()
            return [await streams.submit(r) for r in requests]
        finally:
            await streams.close()

    try:
        results = asyncio.run(go())
    except (OSError, RedisError) as err:
        fail(f"cannot reach Redis at {redacted_url(settings.redis_url)}: {err}")
    for r in results:
        tag = "[yellow]duplicate[/]" if r.duplicate else "[green]queued[/]"
        console.print(f"{tag} {r.edit_id} ({r.state.value})")
    console.print(f"{sum(not r.duplicate for r in results)} queued, {sum(r.duplicate for r in results)} duplicate, "
                  f"{len(errors)} rejected")
    if errors:
        raise typer.Exit(code=1)


def status(edit_id: Annotated[str, typer.Argument(help="The edit_id returned at submission.")]) -> None:
    """Where one edit is: queued, in flight, or its terminal outcome with version or reason."""
    settings = Settings()

    async def go():
        streams = EditStreams.from_url(settings.redis_url, settings.namespace)
        try:
            return await streams.status(edit_id)
        finally:
            await streams.close()

    st = asyncio.run(go())
    if st is None:
        fail(f"no edit with id {edit_id!r} in namespace {settings.namespace!r}", code=1)
    table = Table(show_header=False)
    for key, value in st.model_dump(exclude_none=True).items():
        table.add_row(key, str(value.value if hasattr(value, "value") else value))
    console.print(table)


async def _snapshot(streams: EditStreams, after: str, recent: list) -> tuple[Table, str, dict[str, int]]:
    depth = await streams.queue_depth()
    new = await streams.outcomes(after=after, count=1000)
    if new:
        after = new[-1][0]
        recent.extend(o for _, o in new)
        del recent[:-8]
    table = Table(title=f"editq [{streams.namespace}]  head v{await streams.head()}  live v{await streams.live()}")
    table.add_column("edit")
    table.add_column("outcome")
    table.add_column("version / reason", overflow="fold")
    for o in recent:
        color = {"applied": "green", "rejected": "yellow"}.get(o.state.value, "red")
        table.add_row(o.edit_id, f"[{color}]{o.state.value}[/]", str(o.version) if o.version else (o.reason or ""))
    table.caption = (f"queue: {depth['lag']} waiting, {depth['pending']} in progress, "
                     f"dead letters {await streams.redis.xlen(streams.dlq_key)}")
    return table, after, depth


def watch(
    until_idle: Annotated[bool, typer.Option(help="Exit when nothing is waiting or in progress.")] = False,
    interval: Annotated[float, typer.Option(min=0.1)] = 0.5,
) -> None:
    """Live view of the queue and the newest outcomes (Ctrl-C to leave)."""
    settings = Settings()

    async def go() -> None:
        streams = EditStreams.from_url(settings.redis_url, settings.namespace)
        after, recent = "0", []
        try:
            with Live(console=console, refresh_per_second=4) as live:
                while True:
                    table, after, depth = await _snapshot(streams, after, recent)
                    live.update(table)
                    if until_idle and depth["lag"] == 0 and depth["pending"] == 0:
                        return
                    await asyncio.sleep(interval)
        finally:
            await streams.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())


def up(
    api: Annotated[bool, typer.Option(help="Also serve the HTTP API.")] = True,
    workers: Annotated[int | None, typer.Option(min=1, help="Edit workers (default EDITQ_N_EDIT_WORKERS).")] = None,
    create_key: Annotated[bool | None, typer.Option(
        "--create-key/--no-create-key",
        help="Create an admin API key for you and print it once (default: only in an interactive terminal, so a "
        "server's logs never hold one).",
    )] = None,
) -> None:
    """Run the pipeline in the foreground: Redis (started if none answers), Ray, controller, workers, HTTP API."""
    import ray

    from controller.cli.keys import terminal_key
    from controller.pipeline.runtime import (
        RedisUnavailableError,
        ensure_redis,
        init_ray,
        start_controller,
        stop_controller,
    )

    settings = Settings()
    try:
        redis = ensure_redis(settings)
    except RedisUnavailableError as err:
        fail(str(err))
    overrides = {"redis_url": redis.url}
    if workers:
        overrides["n_edit_workers"] = workers
    settings = settings.model_copy(update=overrides)
    init_ray()
    actor, run_ref = start_controller(settings)
    console.print(f"controller running (redis {redacted_url(redis.url)}, namespace {settings.namespace}, "
                  f"{settings.n_edit_workers} edit worker(s), store {settings.resolved_store_dir()})")
    if api:
        from controller.cli.prometheus_setup import prepare_local

        try:  # a convenience: never a reason not to start
            config = asyncio.run(prepare_local(settings))
            console.print(f"Prometheus (API /metrics + Ray's ray_editq_* series + alert rules): prometheus "
                          f"--config.file {config}")
        except Exception as err:
            err_console.print(f"[yellow]warning:[/] no local Prometheus config written: {type(err).__name__}: {err}")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if api and (create_key if create_key is not None else interactive) and (
        secret := asyncio.run(terminal_key(settings))
    ):
        console.print(f"API key for you (admin, shown once): [bold]{secret}[/]\n"
                      f"  export EDITQ_API_KEY={secret}   # editq query uses it; HTTP clients send "
                      "'Authorization: Bearer <key>'")
    try:
        if api:
            import uvicorn

            from controller.api.app import create_app

            console.print(f"HTTP API on http://{settings.api_host}:{settings.api_port} (docs at /docs)")
            uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning")
        else:
            while True:
                done, _ = ray.wait([run_ref], timeout=1.0)
                if done:
                    console.print(ray.get(run_ref))
                    return
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping controller...")
        stop_controller(actor, run_ref, settings=settings)
        redis.stop()


def api() -> None:
    """Serve only the HTTP API (edits in, status and metrics out) against EDITQ_REDIS_URL."""
    import uvicorn

    from controller.api.app import create_app

    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="info")


def compact() -> None:
    """Ask the running controller to compact: re-solve all live edits jointly on the base weights as one new
    version (health-budgeted and rolled out like any other; `editq watch` and the version's manifest show it)."""
    import getpass

    from controller.pipeline.compaction import request_compaction

    settings = Settings()

    async def go() -> None:
        streams = EditStreams.from_url(settings.redis_url, settings.namespace, settings.stream_maxlen)
        try:
            await request_compaction(streams, f"cli:{getpass.getuser()}")
        finally:
            await streams.close()

    try:
        asyncio.run(go())
    except (OSError, RedisError) as err:
        fail(f"cannot reach Redis at {redacted_url(settings.redis_url)}: {err}")
    console.print("compaction requested: the controller runs it between batches")


def register(app: typer.Typer) -> None:
    for command in (submit, status, watch, up, api, compact):
        app.command(command.__name__)(command)

