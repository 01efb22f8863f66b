"""RECIPE checkpoints side by side, in one run, on the same held-out CounterFact records (issue 15's table).

Each checkpoint serves val records ``--offset`` .. ``--offset + --limit`` (never seen in training: the heads are
trained on the train split), all held only in the tier, with the serving defaults (hybrid injection, subject gate
on) unless told otherwise; the LLM is frozen. Rows are what ``editq retrieval eval`` reports, plus each
checkpoint's training record (steps, injection it was trained for, what it started from).

    .venv/bin/python benchmarks/retrieval_heads.py --data /work/shared/data/counterfact-val.json \\
        --checkpoint old=/tmp/old.safetensors \\
        --checkpoint new=workers/retrieval/checkpoints/smollm2-135m-recipe.safetensors \\
        --out benchmarks/results/retrieval_heads_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.settings import Settings
from workers.datasets import load_edits
from workers.model_io import load_model
from workers.retrieval.evaluation import evaluate_tier
from workers.retrieval.tier import RetrievalTier, checkpoint_id

KEYS = ("reliability", "generality", "locality", "locality_no_collisions", "loc_collisions", "specificity",
        "retrieval_accuracy", "sentinel_rejects", "n")
RECORD_KEYS = ("train_seconds", "init_from", "settings")


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--checkpoint wants NAME=PATH, got {spec!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--checkpoint {name}: no file at {path}")
    return name, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=_named, action="append", required=True, help="NAME=PATH, repeatable")
    parser.add_argument("--offset", type=int, default=100)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--injection", default="hybrid", choices=("prompt", "text", "hybrid"))
    parser.add_argument("--no-subject-gate", dest="subject_gate", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    model, tok = load_model(settings.resolved_model_path(), device="cpu")
    edits = load_edits(args.data, limit=args.offset + args.limit).requests[args.offset:]
    out = {
        "data": str(args.data), "records": [args.offset, args.offset + len(edits)], "injection": args.injection,
        "subject_gate": args.subject_gate, "threads": args.threads,
        "machine": platform.processor() or platform.machine(), "command": [sys.executable, *sys.argv], "table": {},
    }
    for name, path in args.checkpoint:
        tier = RetrievalTier.load(checkpoint=path, settings=settings)
        record_path = path.with_suffix(".json")
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        t0 = time.perf_counter()
        metrics = evaluate_tier(tier.recipe, tier.encoder, model, tok, edits, diagnostics=False,
                                injection=args.injection, subject_gate=args.subject_gate)
        row = {k: v for k, v in metrics.as_dict().items() if k in KEYS and v is not None}
        row |= {"seconds": round(time.perf_counter() - t0, 1), "checkpoint_id": checkpoint_id(path),
                "trained_for": record.get("val", {}).get("injection", "prompt"),
                **{k: record.get(k) for k in RECORD_KEYS}}
        out["table"][name] = row
        print(name, json.dumps({k: row[k] for k in (*KEYS, "seconds")}), file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
