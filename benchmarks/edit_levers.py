"""Cost levers of an edit, each on and off, on the same sequential CounterFact run (quality and seconds per edit).

    python benchmarks/edit_levers.py --out benchmarks/results/edit_levers_cpu.json            # 200 edits, batches 50
    python benchmarks/edit_levers.py --configs old,new --limit 50 --out /tmp/levers.json        # a quick look

Every configuration edits the same first ``--limit`` bundled CounterFact val records in batches, sequentially on
one model (restored to its base weights between configurations), then scores efficacy / generalization /
specificity on all of them (``editq eval``'s protocol; the pre-edit scores are computed once). ``old`` is the
editor as it was before the levers (full-forward v*, float32, MEMIT's NLL stop, key reads from scratch, five
context templates, Adam lr 0.5); ``new`` is today's default; each ``-lever`` is ``new`` with that one lever switched
off (its share of the gain), each ``+lever`` is ``old`` with that one lever switched on (``--configs`` picks; the
default runs old, new, every ``-lever``, ``new+mpes`` and ``+prefix_cache``). Ratios are computed within one run
(same machine, same load).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from shared.settings import Settings
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.editor import Editor
from workers.editing.layout import ModelLayout
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.evaluation.metrics import edit_metrics
from workers.evaluation.runner import heldout_texts, resolve_hparams
from workers.evaluation.scoring import perplexity
from workers.model_io import load_model, model_fingerprint

OLD = {"v_prefix_cache": False, "v_dtype": "float32", "v_early_stop": "nll", "keys_resume": False,
       "n_context_templates": 5, "v_lr": 0.5}
# Each lever of today's default, switched off on its own (its share of the gain)...
WITHOUT = {
    "-prefix_cache": {"v_prefix_cache": False},
    "-bf16": {"v_dtype": "float32"},
    "-templates2": {"n_context_templates": 5},
    "-lr1": {"v_lr": 0.5},
    "-keys_resume": {"keys_resume": False},
}
# ... and switched on alone on the old editor.
ALONE = {
    "+prefix_cache": {"v_prefix_cache": True},
    "+bf16": {"v_dtype": "auto"},
    "+templates2": {"n_context_templates": 2},
    "+lr1": {"v_lr": 1.0},
    "+keys_resume": {"keys_resume": True},
    "+mpes": {"v_early_stop": "mpes", "v_early_stop_margin": 2.0},
}
CONFIGS = {"old": OLD, "new": {}, **WITHOUT, "new+mpes": {"v_early_stop": "mpes", "v_early_stop_margin": 2.0},
           **{name: {**OLD, **lever} for name, lever in ALONE.items()}}
DEFAULT_CONFIGS = ["old", "new", *WITHOUT, "new+mpes", "+prefix_cache"]


def run_config(model, tokenizer, requests, hp, stats, fingerprint, batch_size: int) -> dict:
    """Edit ``requests`` sequentially in batches on ``model`` (left edited: the caller restores it)."""
    editor = Editor(model, tokenizer, hp, stats, fingerprint)
    editor.prepare()
    split: dict[str, float] = {}
    seconds = 0.0
    for begin in range(0, len(requests), batch_size):
        t0 = time.perf_counter()
        result = editor.apply(requests[begin : begin + batch_size])
        seconds += time.perf_counter() - t0
        for key, value in result.seconds.items():
            split[key] = split.get(key, 0.0) + value
    n = len(requests)
    return {"seconds_per_edit": seconds / n, "seconds_split_per_edit": {k: v / n for k, v in split.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="CounterFact file (default: bundled val)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--algo", default="alphaedit")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--set", action="append", default=[], help="extra NAME=JSON configuration, e.g. "
                        "'fast={\"v_early_stop\": \"mpes\", \"v_dtype\": \"bfloat16\"}'")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs.split(",") if name}
    for item in args.set:
        name, _, raw = item.partition("=")
        configs[name] = json.loads(raw)
    settings = Settings()
    data = args.data or bundled_counterfact_path()
    requests = load_edits(data, limit=args.limit).requests
    path = settings.resolved_model_path()
    model, tokenizer = load_model(path, device=settings.device)
    fingerprint = model_fingerprint(path)
    layout = ModelLayout.from_model(model)
    pre = edit_metrics(model, tokenizer, requests, zsre=False).as_dict()
    ppl_pre = perplexity(model, tokenizer, heldout_texts())
    print(json.dumps({"pre": pre, "perplexity_pre": ppl_pre}), flush=True)
    rows = {}
    for name, overrides in configs.items():
        hp = resolve_hparams(model.config, args.algo, overrides, settings)
        stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
            n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
        base = {layer: layout.get_weight(model, layer) for layer in hp.layers}
        try:
            row = {"overrides": overrides} | run_config(
                model, tokenizer, requests, hp, stats, fingerprint, args.batch_size
            )
            row |= edit_metrics(model, tokenizer, requests, zsre=False).as_dict()
            row["perplexity_post"] = perplexity(model, tokenizer, heldout_texts())
        finally:
            for layer, weight in base.items():
                layout.set_weight(model, layer, weight)
        row["hparams"] = hp.to_dict()
        rows[name] = row
        print(json.dumps({"config": name, **{k: v for k, v in row.items() if k != "hparams"}}), flush=True)
    if "old" in rows:
        for row in rows.values():
            row["speedup_vs_old"] = rows["old"]["seconds_per_edit"] / row["seconds_per_edit"]
    out = {
        "benchmark": "edit_levers", "algo": args.algo, "n_edits": args.limit, "batch_size": args.batch_size,
        "data": str(data), "pre": pre, "perplexity_pre": ppl_pre,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
