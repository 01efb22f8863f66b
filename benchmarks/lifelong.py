"""Lifelong health (issue 13): a long sequential CounterFact stream, today's default vs the health budget.

Every configuration edits the same CounterFact records in order, in batches, never restoring the model:

* ``today``: AlphaEdit with today's defaults, no health budget (every batch goes into the weights);
* ``budget``: the same, but every batch goes through ``Editor.apply(..., accept=gate.check)`` with the gate of the
  default ``Settings()`` health limits (the cheap per-version slice); a refused batch leaves the model unchanged and
  its edits are served by the RECIPE retrieval tier;
* ``hybrid_budget``: the budget with AlphaEdit-hybrid; in general ``algo[+budget]`` (``memit+budget``, ...).

Every ``--eval-every`` edits and at the end it records, per configuration: the FULL general health
(``workers.evaluation.general``: KL to the base model, top-1 agreement, fact retention, canary perplexity, fluency;
``--general-tokens`` caps the KL positions), the served edit metrics of a fixed-seed uniform sample of at most
``--probe`` served edits (weights edits on the model, tier edits with retrieval over all tier-held edits on the
current model; combined and split), the weights / tier shares, the same edits' pre-edit metrics and the seconds per
edit. Exact commands (repository root):

    .venv/bin/python benchmarks/lifelong.py many --data /work/shared/data/counterfact-train.json --n-edits 2000 \\
        --configs today,budget --probe 200 --out benchmarks/results/lifelong_cpu.json --deadline 120
    .venv/bin/python benchmarks/lifelong.py run --config budget --data train.json --n-edits 20 --batch-size 10 \\
        --eval-every 10 --probe 10 --general-tokens 512 --out /tmp/lifelong_part.json
    .venv/bin/python benchmarks/lifelong.py plot --json benchmarks/results/lifelong_cpu.json

``many`` prepares the key statistics, the KL references and the gate's base reading once, then runs one process
per configuration (``--threads`` torch threads each, default 1) and merges their JSON; progress lines go to stderr.
``--parallel`` caps how many run at once (the rest wait their turn). ``--deadline`` (minutes from the start) stops
editing in time for the final checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/lifelong.py` finds benchmarks.*

from benchmarks.lifelong_loop import (
    General,
    LoopOptions,
    config_hparams,
    general_evaluator,
    parse_config,
    run_loop,
)
from benchmarks.sequential_collapse import _parse_sets, _setup, _stats, _write
from shared.settings import Settings
from workers.datasets import load_edits
from workers.editing.editor import Editor
from workers.editing.hparams import default_hparams
from workers.editing.layout import ModelLayout
from workers.evaluation.general import (
    RETENTION_FACTS,
    GeneralProbe,
    load_or_compute_reference,
    load_retention_facts,
)
from workers.evaluation.health_gate import HealthGate, gate_from_settings
from workers.retrieval.served_scoring import TierScorer, load_tier_scorer


def load_tier(settings: Settings, fingerprint: str) -> TierScorer | None:
    """The tier as the deployment serves it (``EDITQ_RETRIEVAL_INJECTION``), scored over the current model."""
    return load_tier_scorer(settings, fingerprint)


def load_general(model: PreTrainedModel, tok: PreTrainedTokenizerBase, settings: Settings, fingerprint: str,
                 model_name: str, max_tokens: int | None, gate: HealthGate | None = None) -> General:
    """Full general health on the shipped mixed text (first ``max_tokens`` positions) and retention facts; the KL
    reference is cached under ``home/general`` (computed now when missing: ``model`` must be unedited). With the
    deployment's ``gate`` it also scores the facts the gate draws from (and, for a fixed sample, those it never
    scores)."""
    probe = GeneralProbe.from_asset(tok, max_tokens)
    reference = load_or_compute_reference(model, tok, probe, settings.home / "general", fingerprint)
    if not RETENTION_FACTS.is_file():
        print(f"{RETENTION_FACTS} is missing: retention will be nan", file=sys.stderr)
    facts = load_retention_facts(model_name) if RETENTION_FACTS.is_file() else []
    if gate is None:
        return general_evaluator(tok, probe, reference, facts)
    # a fixed gate sample leaves the other firm facts unseen; a rotating one sees them all in turn
    unseen = None if gate.rotate else [f for f in gate.pool if f not in gate.facts]
    return general_evaluator(tok, probe, reference, facts, firm=gate.pool, unseen=unseen)


def _gate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, settings: Settings, fingerprint: str,
          model_name: str) -> HealthGate:
    gate = gate_from_settings(model, tok, settings.model_copy(update={"health_budget": True}), fingerprint,
                              model_name)
    assert gate is not None
    return gate


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    model, tok, fingerprint, settings = _setup(args)
    model_name = Path(args.model or settings.resolved_model_path()).name
    algo, budget = parse_config(args.config)
    overrides = config_hparams(args.config)
    hp = default_hparams(model.config, algo).with_overrides(**settings.guard_overrides(), **overrides,
                                                           **_parse_sets(args.set))
    requests = load_edits(args.data, limit=args.offset + args.n_edits).requests[args.offset :]
    deployed = _gate(model, tok, settings, fingerprint, model_name)  # its facts are measured in every configuration
    general = load_general(model, tok, settings, fingerprint, model_name, args.general_tokens, deployed)
    gate = deployed if budget else None
    # Every batch the weights refuse (budget, or a guard such as the norm cap) is served by the tier, as in the product.
    tier = load_tier(settings, fingerprint) if budget or "norm_cap" in overrides else None
    editor = Editor(model, tok, hp, _stats(settings, fingerprint, hp), fingerprint)
    editor.prepare()
    extra = {
        "algo": algo, "health_budget": budget, "hparams": hp.to_dict(), "model_fingerprint": fingerprint,
        "model": model_name, "data": str(args.data), "offset": args.offset, "device": str(editor.device),
        "threads": args.threads, "general_tokens": args.general_tokens, "command": [sys.executable, *sys.argv],
        "health_limits": asdict(gate.limits) if gate else None, "gate_budget": asdict(gate.budget) if gate else None,
        "gate_base": asdict(gate.base) if gate else None, "tier_scored": tier is not None,
        "health_patience": settings.health_patience if budget else None,
    }
    opts = LoopOptions(args.config, args.batch_size, args.eval_every, args.probe, args.seed, args.deadline_at,
                       args.final_reserve, settings.health_patience, args.out, extra)
    return run_loop(editor, requests, general, gate.check if gate else None, tier, opts)


FORWARD = ("data", "model", "n_edits", "offset", "batch_size", "eval_every", "probe", "seed", "threads",
           "general_tokens", "final_reserve", "deadline_at")


def run_many(args: argparse.Namespace) -> None:
    """Statistics, KL references and the gate's base reading once (no races), then one process per config."""
    started = time.time()
    args.deadline_at = started + 60 * args.deadline if args.deadline else 0.0
    configs = args.configs.split(",")
    model, tok, fingerprint, settings = _setup(args)
    model_name = Path(args.model or settings.resolved_model_path()).name
    for algo in sorted({parse_config(c)[0] for c in configs}):
        hp = default_hparams(model.config, algo)
        _stats(settings, fingerprint, hp).get(model, tok, ModelLayout.from_model(model), hp.layers)
    load_general(model, tok, settings, fingerprint, model_name, args.general_tokens)
    _gate(model, tok, settings, fingerprint, model_name)  # every configuration reports the gate's firm facts
    del model
    parts = args.out.parent / f"{args.out.stem}_parts"
    parts.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen]] = []
    for name in configs:
        cmd = [sys.executable, __file__, "run", "--config", name, "--out", str(parts / f"{name}.json")]
        for key in FORWARD:
            value = getattr(args, key)
            cmd += [] if value is None else [f"--{key.replace('_', '-')}", str(value)]
        cmd += [x for s in args.set for x in ("--set", s)]
        cmd += ["--tf32"] if args.tf32 else []
        while args.parallel and sum(p.poll() is None for _, p in procs) >= args.parallel:
            time.sleep(5)  # each process holds its own model and KL logits: a few GB
        procs.append((name, subprocess.Popen(cmd)))  # progress lines go straight to this stderr
    merged: dict[str, Any] = {
        "command": [sys.executable, *sys.argv], "args": {k: str(v) for k, v in vars(args).items()},
        "model_fingerprint": fingerprint, "model": model_name,
        "health_settings": {k: v for k, v in settings.model_dump().items() if k.startswith("health_")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "runs": {},
    }
    for name, proc in procs:
        proc.wait()
        part = parts / f"{name}.json"
        run = json.loads(part.read_text()) if part.exists() else {"config": name, "error": "no output"}
        merged["runs"][name] = {**run, "returncode": proc.returncode}
    merged["seconds_total"] = time.time() - started
    _write(args.out, merged)
    print(f"wrote {args.out}", file=sys.stderr)
    plot(args.out, args.out.with_suffix(".png"))


PANELS = (  # title, value per point, and the key of its pre-edit value (drawn dotted: what a target is relative to)
    ("KL(base || edited), nats/token", lambda p: p["general"]["kl"], None),
    ("canary perplexity / base", lambda p: p["ppl_ratio"], None),
    ("fact retention", lambda p: p["general"]["retention"], None),
    ("served efficacy (dotted: pre-edit)", lambda p: p["served_efficacy"], "pre_efficacy"),
    ("served specificity (dotted: pre-edit)", lambda p: p["served_specificity"], "pre_specificity"),
    ("tier share of served edits", lambda p: p["tier_share"], None),
)


def plot(json_path: Path, png_path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (title, get, pre_key) in zip(axes.flat, PANELS, strict=True):
        for name, run in data["runs"].items():
            pts = [(p["edits"], get(p)) for p in run.get("points", []) if get(p) is not None]
            if pts:
                line = ax.plot(*zip(*pts, strict=True), marker=".", label=name)[0]
                if pre_key:
                    pre = [(p["edits"], p[pre_key]) for p in run["points"] if p["edits"] and p.get(pre_key) is not None]
                    if pre:
                        ax.plot(*zip(*pre, strict=True), ":", color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("sequential edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Lifelong CounterFact editing, {data.get('model', '')}, batches of {data['args'].get('batch_size')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    print(f"wrote {png_path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["run", "many", "plot"])
    parser.add_argument("--config", default="budget")
    parser.add_argument("--configs", default="today,budget")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/counterfact-train.json"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--n-edits", type=int, default=2000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--probe", type=int, default=500, help="most served edits scored per checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe sample")
    parser.add_argument("--general-tokens", type=int, default=None, help="cap on the KL positions (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration process")
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--parallel", type=int, default=0, help="many: most configurations at once (0: all)")
    parser.add_argument("--deadline", type=float, default=0.0, help="many: minutes from now by which all is done")
    parser.add_argument("--deadline-at", type=float, default=0.0, help="run: unix time by which all is done")
    parser.add_argument("--final-reserve", type=float, default=60.0, help="least seconds kept for the last check")
    parser.add_argument("--set", action="append", default=[], help="hparam override key=value (all configs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lifelong.json"))
    parser.add_argument("--json", type=Path, default=None, help="plot: merged JSON to plot")
    args = parser.parse_args()
    if args.mode == "run":
        run_one(args)
    elif args.mode == "many":
        run_many(args)
    else:
        src = args.json or args.out
        plot(src, src.with_suffix(".png"))


if __name__ == "__main__":
    main()
