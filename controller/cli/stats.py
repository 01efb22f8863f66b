"""``editq stats``: compute the key statistics the first edit needs, once, in the foreground (run by make setup)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.common import HomeOpt, ModelOpt, console, fail, settings_with
from controller.cli.progress import stage_progress


def stats(
    stats_corpus: Annotated[
        Path | None, typer.Option(help="Text for the statistics (.txt or .jsonl), as for `editq eval`; default: "
                                       "the model's self-sampled corpus (shipped with editq for SmolLM2).")
    ] = None,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """Second moments of the edited layers' keys, cached under the home's stats dir, and the base model's reference
    for the health budget; instant when done."""
    from workers.stats_prep import ensure_statistics, plan_statistics

    if stats_corpus is not None and not stats_corpus.is_file():
        fail(f"--stats-corpus {stats_corpus} does not exist")
    settings = settings_with(home, model)
    try:
        plans = plan_statistics(settings, stats_corpus)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    started = time.perf_counter()
    todo = [plan for plan in plans if plan.missing]
    for plan in plans:
        layers = ", ".join(map(str, plan.layers))
        if plan in todo:
            console.print(f"[bold]key statistics[/] of {plan.fingerprint}, layers {layers} "
                          f"(corpus {plan.corpus.corpus_id}) from {plan.cache.text_source()}")
        else:
            console.print(f"[green]✓[/] key statistics of {plan.fingerprint}, layers {layers}: cached in "
                          f"{plan.directory}")
    if todo:
        try:
            with stage_progress(console) as progress:
                ensure_statistics(todo, settings.device, progress)
        except ValueError as err:  # an unreadable corpus file, an unsupported model
            fail(str(err))
        for plan in todo:
            console.print(f"[green]✓[/] key statistics ready in {plan.directory} "
                          f"({time.perf_counter() - started:.1f} s)")
    _health_reference(settings)


def _health_reference(settings) -> None:
    from workers.stats_prep import ensure_health_reference

    if not settings.health_budget:
        return
    started = time.perf_counter()
    with console.status("health budget: the base model's answers on the mixed text and known facts ..."):
        computed = ensure_health_reference(settings, settings.device)
    state = f"computed ({time.perf_counter() - started:.1f} s)" if computed else "cached"
    console.print(f"[green]✓[/] health-budget reference {state} in {settings.general_dir}")
