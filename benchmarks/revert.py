"""Undo on demand (issue 14): do reverted edits return to their pre-edit answer, and do the other edits of their
batch keep their efficacy?

CounterFact train edits applied sequentially in batches with the default editor; then ``--revert-per-batch`` edits of
every batch are reverted the way the pipeline does it (``workers.editing.compaction``: every live edit but the
reverted ones re-solved jointly on the base weights, ``max_lost=None`` so nothing is refused here). Measured on each
edit's own prompt: before any edit, after the edits, after the revert. "Returns to its pre-edit answer" is
P(target_true) > P(target_new) (CounterFact's efficacy, inverted). Exact command (repository root):

    .venv/bin/python benchmarks/revert.py --data /work/shared/data/counterfact-train.json --n-edits 200 \\
        --batch-size 50 --revert-per-batch 10 --out benchmarks/results/revert_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/revert.py` finds benchmarks.*

from benchmarks.sequential_collapse import _parse_sets, _setup, _stats, _write
from workers.datasets import load_edits
from workers.editing.compaction import LiveEdits, compact
from workers.editing.editor import Editor
from workers.editing.hparams import default_hparams
from workers.guards.policy import edit_success


def _share(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--algo", default="alphaedit")
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--revert-per-batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="Editor override key=value.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, tok, fingerprint, settings = _setup(args)
    hp = default_hparams(model.config, args.algo).with_overrides(**_parse_sets(args.set))
    requests = [r for r in load_edits(args.data, limit=args.n_edits).requests if r.target_true]
    editor = Editor(model, tok, hp, _stats(settings, fingerprint, hp), fingerprint)
    editor.prepare()
    started = time.perf_counter()
    pre = edit_success(model, tok, requests).tolist()  # 1.0 where target_new already wins (rare)
    pairs, batches = [], []
    for begin in range(0, len(requests), args.batch_size):
        batch = requests[begin : begin + args.batch_size]
        out = editor.apply(batch)
        pairs += list(zip(batch, out.targets, strict=True))
        batches.append(batch)
    edit_seconds = time.perf_counter() - started
    after_edits = edit_success(model, tok, requests).tolist()
    reverted = {r.edit_id for batch in batches for r in batch[: args.revert_per_batch]}
    t0 = time.perf_counter()
    done = compact(editor, LiveEdits.latest([(r, t) for r, t in pairs if r.edit_id not in reverted]), max_lost=None)
    revert_seconds = time.perf_counter() - t0
    after_revert = edit_success(model, tok, requests).tolist()

    index = {r.edit_id: i for i, r in enumerate(requests)}
    per_batch = []
    for n, batch in enumerate(batches):
        gone = [index[r.edit_id] for r in batch if r.edit_id in reverted]
        kept = [index[r.edit_id] for r in batch if r.edit_id not in reverted]
        per_batch.append({
            "batch": n, "reverted": len(gone), "kept": len(kept),
            "reverted_true_wins_pre_edit": _share([1 - pre[i] for i in gone]),
            "reverted_new_wins_after_edit": _share([after_edits[i] for i in gone]),
            "reverted_true_wins_after_revert": _share([1 - after_revert[i] for i in gone]),
            "reverted_same_answer_as_pre_edit": _share([float(after_revert[i] == pre[i]) for i in gone]),
            "kept_efficacy_after_edit": _share([after_edits[i] for i in kept]),
            "kept_efficacy_after_revert": _share([after_revert[i] for i in kept]),
        })
    gone_all = [index[e] for e in reverted]
    kept_all = [i for e, i in index.items() if e not in reverted]
    result: dict[str, Any] = {
        "algo": args.algo, "hparams": hp.to_dict(), "model_fingerprint": fingerprint, "data": str(args.data),
        "n_edits": len(requests), "batch_size": args.batch_size, "revert_per_batch": args.revert_per_batch,
        "device": str(editor.device), "threads": args.threads, "command": [sys.executable, *sys.argv],
        "edit_seconds": edit_seconds, "revert_seconds": revert_seconds,
        "revert_split_seconds": {k: round(v, 2) for k, v in done.result.seconds.items()},
        "reverted": {
            "n": len(gone_all),
            "true_wins_pre_edit": _share([1 - pre[i] for i in gone_all]),
            "new_wins_after_edit": _share([after_edits[i] for i in gone_all]),
            "true_wins_after_revert": _share([1 - after_revert[i] for i in gone_all]),
            "same_answer_as_pre_edit": _share([float(after_revert[i] == pre[i]) for i in gone_all]),
        },
        "kept": {
            "n": len(kept_all),
            "efficacy_after_edit": _share([after_edits[i] for i in kept_all]),
            "efficacy_after_revert": _share([after_revert[i] for i in kept_all]),
        },
        "per_batch": per_batch,
        "targets": {"reverted_true_wins_after_revert": ">= 0.90 (bounded by true_wins_pre_edit: the base model "
                                                       "itself prefers some new targets)",
                    "reverted_same_answer_as_pre_edit": ">= 0.90", "kept_efficacy_after_revert": ">= 0.90"},
        "notes": ["efficacy / 'new wins' = P(target_new) > P(target_true) on the edit's own prompt; 'true wins' is "
                  "the reverse", "the revert is the pipeline's: all live edits but the reverted ones re-solved "
                  "jointly on the base weights (workers/editing/compaction.py), as one version"],
    }
    _write(args.out, result)
    print(f"reverted {len(gone_all)}: true wins pre-edit {result['reverted']['true_wins_pre_edit']:.3f}, after edit "
          f"{1 - result['reverted']['new_wins_after_edit']:.3f}, after revert "
          f"{result['reverted']['true_wins_after_revert']:.3f} (same as pre-edit "
          f"{result['reverted']['same_answer_as_pre_edit']:.3f}); kept {len(kept_all)}: efficacy "
          f"{result['kept']['efficacy_after_edit']:.3f} -> {result['kept']['efficacy_after_revert']:.3f} "
          f"(edit {edit_seconds:.0f} s, revert {revert_seconds:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
