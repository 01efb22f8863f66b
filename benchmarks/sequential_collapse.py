"""Long-horizon sequential editing: does the model collapse, and do the guards (REVIVE, PRUNE) prevent it?

Each configuration ("memit", "alphaedit+revive", "memit+prune", ...) edits the same CounterFact records in order,
in batches, never restoring the model. Every ``--eval-every`` edits it records: efficacy / generalization /
specificity of the first ``--probe`` edits ("early": do old edits survive?) and of the last ``--probe`` edits
("recent": do new edits still take?), canary perplexity, control-fact accuracy and the per-matrix collapse signals
(condition number, drift, top-k subspace overlap with W0). After each batch it records the batch's own efficacy
(what the guard policy measures) and, for REVIVE, the filtered energy share. The guard's reject policy is off here
(``guard_min_efficacy=0``) so the curves show the filter itself; the batch efficacies show what the policy would do.

    python benchmarks/sequential_collapse.py many --data train.json --n-edits 2000 \\
        --configs memit,memit+revive,alphaedit --out benchmarks/results/sequential_collapse.json
    python benchmarks/sequential_collapse.py run --config memit --data train.json --n-edits 200 --out part.json
    python benchmarks/sequential_collapse.py plot --json benchmarks/results/sequential_collapse.json

``+cap@drift`` turns on the norm cap (``||W - W0||_F / ||W0||_F <= drift`` per edited matrix); ``alphaedit_hybrid`` is
AlphaEdit's projector with MEMIT's C-weighted penalty inside the null space (docs/editing.md).

``+revive_random[@energy]`` is REVIVE's control at equal rank: the filter removes the same number of directions as
``+revive@energy`` (the rank the energy share gives on W0's spectrum), but random orthonormal ones instead of W0's
dominant singular vectors. If it protects as well, the dominant subspace is not what matters, only how much of the
update is thrown away. The health columns still use W0's true spectrum.

``many`` prepares the statistics once, then runs the configurations as parallel processes on one device (a small
model leaves a GPU mostly idle) and merges their results; ``--deadline`` stops editing in time for the final
evaluation, and the JSON records how many edits each configuration reached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shared.settings import Settings
from workers.datasets import load_edits
from workers.editing.editor import Editor
from workers.editing.hparams import default_hparams
from workers.editing.layout import ModelLayout
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.evaluation.collapse import canary_perplexity, control_fact_accuracy, load_control_facts
from workers.evaluation.metrics import counterfact_metrics
from workers.guards.collapse import matrix_health
from workers.guards.policy import edit_success
from workers.guards.revive import spectrum_cached
from workers.model_io import load_model, model_fingerprint

ALGOS = ("memit", "alphaedit", "alphaedit_plus", "alphaedit_hybrid")


def split_config(name: str) -> tuple[str, dict[str, str | None]]:
    """``algo+flag[@value]+...`` -> (algo, {flag: value or None}); the grammar every benchmark's config names share."""
    algo, *parts = name.split("+")
    flags: dict[str, str | None] = {}
    for part in parts:
        flag, sep, value = part.partition("@")
        if flag in flags:
            raise ValueError(f"{name!r}: {flag} given twice")
        flags[flag] = value if sep else None
    return algo, flags


VALUE_FLAGS = {"cap": "norm_cap", "l2": "l2", "energy": "nullspace_energy"}  # +flag@value -> editor hparam


def value_overrides_of(name: str, flags: dict[str, str | None]) -> dict[str, float]:
    """``+cap@drift`` / ``+l2@weight`` / ``+energy@share`` -> the editor's ``norm_cap`` / ``l2`` /
    ``nullspace_energy`` overrides (only the flags given)."""
    overrides = {}
    for flag, hparam in VALUE_FLAGS.items():
        if flag not in flags:
            continue
        value = flags[flag]
        if not value:
            raise ValueError(f"{name!r}: +{flag} needs its value, e.g. +{flag}@0.3")
        try:
            overrides[hparam] = float(value)
        except ValueError:
            raise ValueError(f"{name!r}: +{flag}@{value} is not a number") from None
    return overrides


def config_overrides(name: str) -> tuple[str, dict[str, Any]]:
    """``algo[+revive[@energy]|+revive_random[@energy]][+cap@drift][+l2@w][+energy@e][+prune]`` -> (algo, hparam
    overrides)."""
    algo, flags = split_config(name)
    if algo not in ALGOS or any(f not in ("revive", "revive_random", "prune", *VALUE_FLAGS) for f in flags):
        raise ValueError(f"unknown configuration {name!r}")
    filtered = "revive" in flags or "revive_random" in flags
    overrides: dict[str, Any] = {"guard_min_efficacy": 0.0, "guard": "revive" if filtered else "none",
                                 "prune": "prune" in flags, **value_overrides_of(name, flags)}
    energy = flags.get("revive") or flags.get("revive_random")
    if energy:
        overrides["revive_energy"] = float(energy)
    return algo, overrides


def random_subspace_spectra(seed: int = 0) -> None:
    """Make the editor's REVIVE filter use random orthonormal directions: same singular values (so the energy share
    picks the same rank), random U and V (QR of a seeded Gaussian). Benchmark-only control; patches this process."""
    import workers.editing.editor as editor_module
    from workers.guards.revive import Spectrum

    true_spectrum = editor_module.spectrum_cached
    generator = torch.Generator().manual_seed(seed)

    def random_spectrum(weight: torch.Tensor, *args: Any, **kwargs: Any) -> Spectrum:
        spectrum = true_spectrum(weight, *args, **kwargs)
        u = torch.linalg.qr(torch.randn(spectrum.u.shape, generator=generator, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(spectrum.v.shape, generator=generator, dtype=torch.float64))[0]
        return Spectrum(u.contiguous(), spectrum.s, v.contiguous())

    editor_module.spectrum_cached = random_spectrum


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _setup(args: argparse.Namespace) -> tuple[Any, Any, str, Settings]:
    torch.set_num_threads(args.threads)
    if args.tf32:  # v* and forward passes in TF32 on GPUs; every solve stays float64
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = Settings()
    path = args.model or settings.resolved_model_path()
    model, tok = load_model(path, device=settings.device)
    return model, tok, model_fingerprint(Path(path)), settings


def _stats(settings: Settings, fingerprint: str, hp: Any) -> SecondMomentCache:
    corpus = StatsCorpus(n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed)
    return SecondMomentCache(settings.stats_dir, fingerprint, corpus)


def _checkpoint(model: Any, tok: Any, editor: Editor, spectra: dict, early: list, recent: list, facts: list,
                n_done: int, started: float) -> dict[str, Any]:
    point: dict[str, Any] = {"edits": n_done, "seconds": time.perf_counter() - started}
    if early:
        point["early"] = counterfact_metrics(model, tok, early).as_dict()
    if recent:
        point["recent"] = counterfact_metrics(model, tok, recent).as_dict()
    point["perplexity"] = canary_perplexity(model, tok)
    point["control_accuracy"] = control_fact_accuracy(model, tok, facts)
    health = {layer: matrix_health(editor.state.weights[layer], spectra[layer]).as_dict() for layer in spectra}
    point["layers"] = {str(k): v for k, v in health.items()}
    for key in ("condition_number", "relative_drift", "subspace_overlap", "sigma_max"):
        point[key] = sum(h[key] for h in health.values()) / len(health)
    return point


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    model, tok, fingerprint, settings = _setup(args)
    algo, overrides = config_overrides(args.config)
    if "+revive_random" in args.config:
        random_subspace_spectra()
    hp = default_hparams(model.config, algo).with_overrides(**{**overrides, **_parse_sets(args.set)})
    requests = load_edits(args.data, limit=args.offset + args.n_edits).requests[args.offset :]
    facts = load_control_facts()  # checked on SmolLM2, the benchmark's model
    editor = Editor(model, tok, hp, _stats(settings, fingerprint, hp), fingerprint)
    editor.prepare()
    spectra = {layer: spectrum_cached(w, None) for layer, w in editor.state.weights.items()}
    early = requests[: args.probe]
    result: dict[str, Any] = {
        "config": args.config, "algo": algo, "hparams": hp.to_dict(), "batch_size": args.batch_size,
        "n_planned": len(requests), "device": str(editor.device), "tf32": args.tf32,
        "pre_early": counterfact_metrics(model, tok, early).as_dict(), "points": [], "batches": [],
    }
    started = time.perf_counter()
    result["points"].append(_checkpoint(model, tok, editor, spectra, [], [], facts, 0, started))
    applied: list = []
    next_eval = args.eval_every
    for begin in range(0, len(requests), args.batch_size):
        elapsed = time.perf_counter() - started
        per_batch = elapsed / max(1, len(result["batches"]))
        if args.deadline and time.time() + 1.5 * per_batch + args.final_reserve > args.deadline:
            result["stopped_early"] = f"deadline after {len(applied)} edits"
            break
        batch = requests[begin : begin + args.batch_size]
        t0 = time.perf_counter()
        out = editor.apply(batch)
        applied.extend(batch)
        record = {"edits": len(applied), "seconds": time.perf_counter() - t0,
                  "efficacy": float(edit_success(model, tok, batch).mean()),
                  "filtered_energy": out.filtered_energy, **out.diagnostics}
        result["batches"].append(record)
        if len(applied) >= next_eval or begin + args.batch_size >= len(requests):
            recent = applied[-args.probe :]
            result["points"].append(_checkpoint(model, tok, editor, spectra, early, recent, facts, len(applied),
                                                started))
            next_eval += args.eval_every
            _write(args.out, result)
        print(f"[{args.config}] {len(applied)} edits, {time.perf_counter() - started:.0f} s", flush=True)
    result["n_edits"] = len(applied)
    result["final_all"] = counterfact_metrics(model, tok, applied).as_dict() if applied else {}
    result["seconds_total"] = time.perf_counter() - started
    _write(args.out, result)
    return result


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_many(args: argparse.Namespace) -> None:
    """Statistics once (so the processes do not race to compute them), then one process per configuration."""
    model, tok, fingerprint, settings = _setup(args)
    for algo in sorted({config_overrides(c)[0] for c in args.configs.split(",")}):
        hp = default_hparams(model.config, algo)
        _stats(settings, fingerprint, hp).get(model, tok, ModelLayout.from_model(model), hp.layers)
    del model
    parts_dir = args.parts_dir or args.out.parent / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in args.configs.split(","):
        part = parts_dir / f"{name}.json"
        cmd = [sys.executable, __file__, "run", "--config", name, "--data", str(args.data), "--n-edits",
               str(args.n_edits), "--offset", str(args.offset), "--batch-size", str(args.batch_size),
               "--eval-every", str(args.eval_every), "--probe", str(args.probe), "--out", str(part),
               "--threads", str(args.threads), "--deadline", str(args.deadline or 0),
               "--final-reserve", str(args.final_reserve)]
        cmd += ["--tf32"] if args.tf32 else []
        cmd += [x for s in args.set for x in ("--set", s)]
        cmd += ["--model", str(args.model)] if args.model else []
        log = open(parts_dir / f"{name}.log", "w")  # noqa: SIM115 - closed after the process ends
        procs.append((name, part, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ), log))
    merged: dict[str, Any] = {"n_edits_planned": args.n_edits, "batch_size": args.batch_size, "runs": {}}
    for name, part, proc, log in procs:
        proc.wait()
        log.close()
        if part.exists():
            merged["runs"][name] = json.loads(part.read_text())
            merged["runs"][name]["returncode"] = proc.returncode
        else:
            merged["runs"][name] = {"config": name, "returncode": proc.returncode, "error": "no output"}
    _write(args.out, merged)
    plot(args.out, args.out.with_suffix(".png"))


def plot(json_path: Path, png_path: Path, only: list[str] | None = None, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    panels = [
        ("early efficacy (first edits)", lambda p: p.get("early", {}).get("efficacy")),
        ("recent efficacy (last edits)", lambda p: p.get("recent", {}).get("efficacy")),
        ("recent generalization", lambda p: p.get("recent", {}).get("generalization")),
        ("recent specificity", lambda p: p.get("recent", {}).get("specificity")),
        ("canary perplexity", lambda p: p.get("perplexity")),
        ("control-fact accuracy", lambda p: p.get("control_accuracy")),
        ("condition number (mean over layers)", lambda p: p.get("condition_number")),
        ("||W - W0|| / ||W0|| (mean)", lambda p: p.get("relative_drift")),
        ("top-32 subspace overlap with W0 (mean)", lambda p: p.get("subspace_overlap")),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    for ax, (panel, get) in zip(axes.flat, panels, strict=True):
        for name, run in data["runs"].items():
            if only and name not in only:
                continue
            pts = [(p["edits"], get(p)) for p in run.get("points", []) if get(p) is not None]
            if pts:
                style = "--" if "revive" in name else (":" if "prune" in name else "-")
                ax.plot(*zip(*pts, strict=True), style, marker=".", label=name)
        ax.set_title(panel)
        ax.set_xlabel("sequential edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or f"Sequential CounterFact edits on SmolLM2-135M, batches of {data.get('batch_size')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["run", "many", "plot"])
    parser.add_argument("--config", default="memit")
    parser.add_argument("--configs", default="memit,memit+revive,memit+prune,alphaedit,alphaedit+revive,"
                                             "alphaedit_plus,alphaedit_plus+revive")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--n-edits", type=int, default=2000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--probe", type=int, default=100, help="size of the early and recent evaluation sets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--deadline", type=float, default=0.0, help="unix time by which every run must be done")
    parser.add_argument("--final-reserve", type=float, default=20.0, help="seconds kept for the final evaluation")
    parser.add_argument("--set", action="append", default=[], help="hparam override key=value (all configs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sequential_collapse.json"))
    parser.add_argument("--json", type=Path, default=None, help="plot: merged JSON to plot")
    parser.add_argument("--runs", default=None, help="plot: comma-separated run names to draw (default all)")
    parser.add_argument("--png", type=Path, default=None, help="plot: output image")
    parser.add_argument("--title", default=None)
    parser.add_argument("--parts-dir", type=Path, default=None, help="many: per-configuration JSON and logs")
    args = parser.parse_args()
    if args.mode == "run":
        run_one(args)
    elif args.mode == "many":
        run_many(args)
    else:
        src = args.json or args.out
        only = args.runs.split(",") if args.runs else None
        plot(src, args.png or src.with_suffix(".png"), only, args.title)


if __name__ == "__main__":
    main()
