"""Small hyperparameter sweep for a model without published editing settings (here SmolLM2-135M).

Runs sequential batched editing over a slice of the CounterFact *val* split for each configuration in a grid and
records efficacy / generalization / specificity / perplexity. The slice defaults to records 1000-1199, disjoint
from the first 200 records that ``editq eval`` reports on, so the reported numbers are not tuned on themselves.

    python benchmarks/sweep.py --data ../shared/data/counterfact-val.json --out benchmarks/results/sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from shared.settings import Settings
from workers.datasets import load_edits
from workers.editing.editor import Editor
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.evaluation.metrics import edit_metrics
from workers.evaluation.runner import heldout_texts, resolve_hparams
from workers.evaluation.scoring import perplexity
from workers.model_io import load_model, model_fingerprint

GRID = {
    "alphaedit": {
        "layers": [[2, 3, 4, 5, 6], [4, 5, 6, 7, 8], [6, 7, 8, 9, 10], [9, 10, 11, 12, 13]],
        "nullspace_energy": [0.7, 0.8, 0.9],
    },
    "memit": {
        "layers": [[2, 3, 4, 5, 6], [4, 5, 6, 7, 8], [6, 7, 8, 9, 10]],
        "mom2_update_weight": [2000.0, 15000.0],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--algos", default="alphaedit,memit")
    parser.add_argument("--grid", type=json.loads, default=None, help="JSON {algo: {param: [values]}}")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    grids = args.grid or GRID

    settings = Settings()
    model_path = args.model or settings.resolved_model_path()
    model, tok = load_model(model_path, device=settings.device)
    fingerprint = model_fingerprint(Path(model_path))
    requests = load_edits(args.data, limit=args.offset + args.limit).requests[args.offset :]
    texts = heldout_texts()
    pre = edit_metrics(model, tok, requests, zsre=False).as_dict()
    ppl_pre = perplexity(model, tok, texts)
    original = {name: p.detach().clone() for name, p in model.named_parameters() if "mlp" in name}
    runs = []
    for algo in args.algos.split(","):
        grid = grids[algo]
        for values in itertools.product(*grid.values()):
            overrides = dict(zip(grid.keys(), values, strict=True))
            hp = resolve_hparams(model.config, algo, overrides, settings)
            stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
                n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
            editor = Editor(model, tok, hp, stats, fingerprint)
            editor.prepare()
            start = time.perf_counter()
            for begin in range(0, len(requests), args.batch_size):
                editor.apply(requests[begin : begin + args.batch_size])
            seconds = time.perf_counter() - start
            post = edit_metrics(model, tok, requests, zsre=False).as_dict()
            run = {"algo": algo, **overrides, **post, "perplexity": perplexity(model, tok, texts),
                   "seconds_per_edit": seconds / len(requests)}
            runs.append(run)
            print(json.dumps(run), flush=True)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in original:
                        p.copy_(original[name])
    result = {
        "model": str(model_path), "device": str(next(model.parameters()).device),
        "data": str(args.data), "offset": args.offset, "n_edits": len(requests), "batch_size": args.batch_size,
        "pre": pre, "perplexity_pre": ppl_pre, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
