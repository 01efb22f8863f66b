"""``editq audit``, ``editq pause`` and ``editq resume``: read the audit trail and stop/restart the pipeline."""

from __future__ import annotations

from typing import Annotated, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from controller.cli.common import console, err_console, fail, with_streams
from controller.cli.keys import operator
from controller.pipeline import operations, undo
from shared.audit import AuditAction
from shared.settings import Settings
from shared.weight_store import LocalWeightStore, StoreError

T = TypeVar("T")


def audit(
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Newest N entries.")] = 50,
    action: Annotated[AuditAction | None, typer.Option(help="Only this action.")] = None,
    edit_id: Annotated[str | None, typer.Option(help="Only entries about this edit.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line (for archiving).")] = False,
) -> None:
    """The audit trail, oldest of the selection first: who changed what, when, in which version."""
    scan = limit * 10 if (action or edit_id) else limit
    entries = with_streams(lambda s: s.audit.read(count=scan, action=action, newest_first=True))
    if edit_id:
        entries = [e for e in entries if e.edit_id == edit_id]
    entries = entries[:limit][::-1]
    if as_json:
        for e in entries:
            typer.echo(e.model_dump_json())
        return
    table = Table("at", "action", "principal", "edit", "version", "detail")
    for e in entries:
        table.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.action.value, escape(e.principal), escape(e.edit_id or ""),
                      "" if e.version is None else str(e.version), escape(e.detail or ""))
    console.print(table)


def pause(reason: Annotated[str, typer.Option(help="Why (kept in the audit trail).")] = "") -> None:
    """Stop the controller taking new batches; edits keep queueing and nothing is lost (`editq resume`)."""
    with_streams(lambda s: operations.pause(s, operator(), reason))
    console.print("paused: the controller takes no new batch until `editq resume`")


def resume() -> None:
    """Let the controller take batches again."""
    was = with_streams(lambda s: operations.resume(s, operator()))
    console.print("resumed" if was else "was not paused")


def revert(edit_id: Annotated[list[str], typer.Argument(help="One or more edit_ids.")]) -> None:
    """Take edits out of the served model: the controller makes a new version without them (normal gated rollout,
    history kept) and removes them from the retrieval tier; `editq status <id>` shows `reverted_in` when done."""
    failed = 0
    for one in edit_id:
        try:
            with_streams(lambda s, e=one: undo.request_revert(s, e, operator()))
            console.print(f"revert of {escape(one)} queued")
        except undo.UndoRefused as err:
            err_console.print(f"[red]refused[/] {escape(str(err))}")
            failed += 1
    if failed:
        raise typer.Exit(code=1)


def rollback(
    to: Annotated[int, typer.Option("--to", min=0, help="The version to make head and live again.")],
) -> None:
    """Make an earlier version live again on purpose and keep building on it; later versions keep their numbers and
    files (status `reverted`) and their edits are served by the retrieval tier."""
    settings = Settings()
    store = LocalWeightStore(settings.resolved_store_dir())
    try:
        with_streams(lambda s: undo.request_rollback(s, store, to, operator()))
    except undo.UndoRefused as err:
        fail(str(err))
    console.print(f"rollback to version {to} queued: the controller runs it between batches (`editq audit`)")


def recover(
    head: Annotated[int, typer.Option("--head", min=0, help="The committed version to serve (see the store).")],
    force: Annotated[bool, typer.Option(help="Even though Redis has state (bypasses the rollout gates).")] = False,
) -> None:
    """After Redis lost its state (the controller refuses to start and says so): make a version of the weight store
    head and live again. Queued edits and outcomes that lived only in Redis are gone; the store's versions stay."""
    settings = Settings()
    store = LocalWeightStore(settings.resolved_store_dir())
    try:
        with_streams(lambda s: operations.recover_head(s, store, head, operator(), force))
    except (StoreError, operations.RecoveryRefused) as err:
        fail(str(err))
    console.print(f"head and live set to version {head}; `editq up` can start")


def register(app: typer.Typer) -> None:
    from controller.cli.keys import keys_app

    app.add_typer(keys_app, name="keys")
    for command in (audit, pause, resume, revert, rollback, recover):
        app.command(command.__name__)(command)
