"""What should a retrieval hit put in front of the query (issue 15)? RECIPE's continuous prompt, the statement as text
(in-context editing), or both, on CounterFact edits the RECIPE heads never saw in training.

1. Template sweep: text and hybrid injection with each candidate statement template on the first ``--sweep-limit``
   records (the choice is made here, on these records only).
2. The table: prompt / text / hybrid with the shipped template (``workers.retrieval.injection``) on ``--limit``
   records starting at ``--offset`` (beyond the sweep's records, so the choice is judged on unseen edits), all edits
   held only in the tier (``workers.retrieval.evaluation.evaluate_tier``). Exact command (repository root):

    .venv/bin/python benchmarks/retrieval_injection.py --data /work/shared/data/counterfact-val.json \\
        --offset 100 --limit 500 --out benchmarks/results/retrieval_injection_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.settings import Settings
from workers.datasets import load_edits
from workers.model_io import load_model
from workers.retrieval import injection
from workers.retrieval.evaluation import evaluate_tier
from workers.retrieval.tier import RetrievalTier, checkpoint_id, default_checkpoint_path

TEMPLATES = [
    "{statement}.\n", "{statement}. {statement}.\n", "Fact: {statement}.\n", "New fact: {statement}.\n",
    "New fact: {statement}. {statement}.\n", "{statement}. ", "{statement}.\n\n",
]
KEYS = ("reliability", "generality", "locality", "specificity", "retrieval_accuracy", "sentinel_rejects",
        "oracle_reliability", "oracle_generality", "n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, default=100)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--sweep-limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    tier = RetrievalTier.load(settings=settings)
    model, tok = load_model(settings.resolved_model_path(), device="cpu")
    records = load_edits(args.data, limit=args.offset + args.limit).requests
    sweep_records, held_out = records[: args.sweep_limit], records[args.offset :]
    shipped = injection.TEXT_INJECTION_TEMPLATE
    out: dict[str, Any] = {
        "data": str(args.data), "sweep_records": [0, args.sweep_limit], "table_records": [args.offset, len(records)],
        "checkpoint": default_checkpoint_path().name, "checkpoint_id": checkpoint_id(default_checkpoint_path()),
        "shipped_template": shipped, "threads": args.threads, "command": [sys.executable, *sys.argv],
        "sweep": [], "table": {},
    }

    def run(edits, mode: str, diagnostics: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics = evaluate_tier(tier.recipe, tier.encoder, model, tok, edits, diagnostics=diagnostics, injection=mode)
        row = {k: v for k, v in metrics.as_dict().items() if k in KEYS and v is not None}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row

    for template in TEMPLATES:
        injection.TEXT_INJECTION_TEMPLATE = template
        for mode in ("text", "hybrid"):
            row = {"template": template, "injection": mode, **run(sweep_records, mode, False)}
            out["sweep"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    injection.TEXT_INJECTION_TEMPLATE = shipped
    for mode in ("prompt", "text", "hybrid"):
        out["table"][mode] = run(held_out, mode, True)
        print(mode, json.dumps(out["table"][mode]), file=sys.stderr, flush=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
