"""What every ``editq`` sub-command shares: consoles, the error exit, common options, settings with overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from shared.settings import Settings

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
