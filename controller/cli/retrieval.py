"""``editq retrieval``: train the RECIPE tier's heads for a model and check them on held-out CounterFact edits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from controller.cli.common import HomeOpt, ModelOpt, console, fail, settings_with
from controller.cli.progress import stage_progress
from shared.settings import INJECTIONS

retrieval_app = typer.Typer(help="RECIPE retrieval tier: train and evaluate its heads.", no_args_is_help=True)

_SHOWN = ("reliability", "generality", "locality", "specificity", "rel_hit", "gen_hit", "loc_reject")






def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _show(val: dict[str, Any]) -> None:
    table = Table(title="held-out val (edits held only in the tier)")
    table.add_column("N edits", justify="right")
    for name in _SHOWN:
        table.add_column(name, justify="right")
    for n, metrics in val.items():
        if isinstance(metrics, dict):
            table.add_row(n, *[f"{metrics[name]:.3f}" for name in _SHOWN])
    console.print(table)


@retrieval_app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option(help="CounterFact train split (EasyEdit layout), e.g. ../shared/data/.")],
    out: Annotated[Path | None, typer.Option(help="Checkpoint to write (default: the shipped SmolLM2 one).")] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Feature cache, resumable state, loss log (default under --home).")
    ] = None,
    home: HomeOpt = None,
    model: ModelOpt = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N training records.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 300,
    edit_batch: Annotated[int, typer.Option(help="Edits per step through the LLM.")] = 8,
    contrastive_batch: Annotated[int, typer.Option(help="Records per step for the contrastive terms.")] = 256,
    lr: Annotated[float, typer.Option(help="Adam lr of MLP_P (warm-up, cosine decay to 10%).")] = 5e-3,
    retriever_lr: Annotated[float, typer.Option(help="Adam lr of MLP_K, MLP_Q and the sentinel.")] = 1e-4,
    rep_dim: Annotated[int, typer.Option(help="Key dimension r.")] = 512,
    prompt_tokens: Annotated[int, typer.Option(help="Continuous prompt tokens per edit.")] = 3,
    pooling: Annotated[str, typer.Option(help="Encoder features: mean_max_min or mean.")] = "mean_max_min",
    llm_dtype: Annotated[str, typer.Option(help="float32 or bfloat16 for the frozen LLM.")] = "float32",
    save_every: Annotated[int, typer.Option(help="Save the resumable state every N steps.")] = 20,
    val_limit: Annotated[list[int] | None, typer.Option(help="Held-out check sizes (repeatable).")] = None,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the state in --work-dir.")] = False,
    injection: Annotated[
        str, typer.Option(help="Train for what a hit serves: prompt (RECIPE) or hybrid (prompt + statement text).")
    ] = "prompt",
    init_from: Annotated[
        Path | None, typer.Option(help="Fine-tune from this checkpoint (e.g. the shipped one) instead of scratch.")
    ] = None,
    log_every: Annotated[int, typer.Option(help="Print the losses every N steps.")] = 10,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads (env EDITQ_TORCH_THREADS); 1 is fastest on a CPU shared with other jobs."),
    ] = None,
) -> None:
    """Train MLP_K, MLP_Q, MLP_P and the sentinel on CounterFact with the frozen LLM; write checkpoint + JSON."""
    from pydantic import ValidationError

    from workers.retrieval.tier import default_checkpoint_path
    from workers.retrieval.training import TrainSettings, train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = settings_with(home, model)
    _set_threads(threads or settings.torch_threads)
    if not data.is_file():
        fail(f"no training data at {data}")
    model_path = settings.resolved_model_path()
    try:
        ts = TrainSettings(
            data=data,
            out=out or default_checkpoint_path(),
            work_dir=work_dir or settings.home / "retrieval" / model_path.name,
            model_path=model_path,
            encoder_path=settings.resolved_encoder_path(),
            limit=limit,
            steps=steps,
            edit_batch=edit_batch,
            contrastive_batch=contrastive_batch,
            lr=lr,
            retriever_lr=retriever_lr,
            rep_dim=rep_dim,
            prompt_tokens=prompt_tokens,
            pooling=pooling,
            llm_dtype=llm_dtype,
            save_every=save_every,
            val_limits=val_limit or [100],
            seed=seed,
            resume=resume,
            injection=injection,
            init_from=init_from,
        )
    except ValidationError as err:
        fail(str(err))
    with stage_progress(console) as report:

        def log(record: dict[str, Any]) -> None:
            if record["step"] % log_every == 0:
                console.log(" ".join(f"{k}={v}" for k, v in record.items()))

        try:
            result = train(ts, progress=report, log=log)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
    console.print(
        f"[green]checkpoint[/]: {ts.out} ({result['bytes'] / 1e6:.1f} MB), record: {ts.out.with_suffix('.json')}"
    )
    console.print(f"trained {result['train_seconds']:.0f} s on {result['data']['records_used']} records")
    _show(result["val"])


@retrieval_app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path | None, typer.Option(help="RECIPE checkpoint (default: the shipped one).")] = None,
    limit: Annotated[int, typer.Option(help="Bundled CounterFact val edits to hold in the tier.")] = 100,
    data: Annotated[Path | None, typer.Option(help="Edit records instead of the bundled val records.")] = None,
    home: HomeOpt = None,
    model: ModelOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (env EDITQ_TORCH_THREADS).")] = None,
    injection: Annotated[
        str | None, typer.Option(help="What a hit puts in front of the query: prompt, text or hybrid "
                                      "(default: EDITQ_RETRIEVAL_INJECTION).")
    ] = None,
) -> None:
    """Held-out check: store N edits only in the tier, report reliability / generality / locality / hit rates."""
    import time

    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.model_io import load_model
    from workers.retrieval.evaluation import evaluate_tier
    from workers.retrieval.tier import RetrievalTier

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = settings_with(home, model)
    injection = injection or settings.retrieval_injection
    if injection not in INJECTIONS:
        fail(f"--injection must be one of {', '.join(INJECTIONS)}, not {injection!r}")
    _set_threads(threads or settings.torch_threads)
    try:
        tier = RetrievalTier.load(checkpoint, settings=settings)
        llm, tokenizer = load_model(settings.resolved_model_path(), device="cpu")
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    try:
        records = load_edits(data or bundled_counterfact_path(), limit=limit).requests
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    tick = time.perf_counter()
    metrics = evaluate_tier(tier.recipe, tier.encoder, llm, tokenizer, records, injection=injection,
                            subject_gate=tier.subject_gate).as_dict()
    metrics["injection"], metrics["subject_gate"] = injection, tier.subject_gate
    metrics["seconds"] = round(time.perf_counter() - tick, 1)
    _show({str(len(records)): metrics})
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")
