"""The retrieval tier's subject gate (workers/retrieval/subject_gate.py), side by side with the plain RECIPE tier in
one run: the same held-out CounterFact records as benchmarks/retrieval_injection.py's table (val records
``--offset`` .. ``--offset + --limit``, all held only in the tier, the shipped checkpoint, hybrid injection), and
the share of queries that reach the encoder at all (the rest cost no encoding: the serving overhead).

    .venv/bin/python benchmarks/retrieval_gate.py --data /work/shared/data/counterfact-val.json \\
        --out benchmarks/results/retrieval_gate_cpu.json
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
from workers.retrieval.subject_gate import SubjectGate
from workers.retrieval.tier import RetrievalTier, checkpoint_id, default_checkpoint_path

KEYS = ("reliability", "generality", "locality", "specificity", "retrieval_accuracy", "sentinel_rejects", "n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, default=100)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--injection", default="hybrid")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    tier = RetrievalTier.load(settings=settings)
    model, tok = load_model(settings.resolved_model_path(), device="cpu")
    edits = load_edits(args.data, limit=args.offset + args.limit).requests[args.offset:]
    gate = SubjectGate()
    for edit in edits:
        gate.add(str(edit.edit_id), edit.subject)
    kinds = {"reliability": [e.text for e in edits], "generality": [p for e in edits for p in e.paraphrase_prompts],
             "locality": [n.prompt for e in edits for n in e.neighborhood_prompts]}
    out = {
        "data": str(args.data), "records": [args.offset, args.offset + len(edits)], "injection": args.injection,
        "checkpoint": default_checkpoint_path().name, "checkpoint_id": checkpoint_id(default_checkpoint_path()),
        "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "command": [sys.executable, *sys.argv],
        "queries_reaching_the_encoder": {k: sum(bool(gate.candidates(q)) for q in qs) / len(qs)
                                         for k, qs in kinds.items()},
        "table": {},
    }
    for name, gated in (("recipe", False), ("subject_gate", True)):
        t0 = time.perf_counter()
        metrics = evaluate_tier(tier.recipe, tier.encoder, model, tok, edits, diagnostics=False,
                                injection=args.injection, subject_gate=gated)
        row = {k: v for k, v in metrics.as_dict().items() if k in KEYS and v is not None}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out["table"][name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
