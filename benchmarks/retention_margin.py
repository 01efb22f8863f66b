"""How fragile are the retention facts? Which ones does a small edit flip, and does a random weight change of the
same size flip them too?

Retention counts facts the base model completes greedily, so it is selected on the base model's own argmax: a fact
known by a hair flips under any perturbation. This benchmark measures every shipped fact's base margin (least, over
its answer tokens, of the answer token's log-prob minus the best other token's), applies the first ``--n-edits``
bundled CounterFact edits (the demo's) in one AlphaEdit batch, and compares which facts flip with what a random
change of the same Frobenius norm per edited matrix flips. Facts about the edited subjects are left out.

    python benchmarks/retention_margin.py --n-edits 4 --n-edits 25 --out benchmarks/results/retention_margin_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, it still finds benchmarks.*

from benchmarks.sequential_collapse import _stats
from shared.settings import Settings
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.editor import Editor
from workers.editing.hparams import default_hparams
from workers.evaluation.general import load_retention_facts, without_subjects
from workers.evaluation.scoring import answer_margins
from workers.model_io import load_model, model_fingerprint

BINS = [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, float("inf"))]


def by_bin(base: torch.Tensor, after: torch.Tensor) -> list[dict[str, Any]]:
    rows = []
    for lo, hi in BINS:
        inside = (base >= lo) & (base < hi)
        flipped = inside & (after <= 0)
        rows.append({"margin": f"[{lo}, {hi})", "facts": int(inside.sum()), "flipped": int(flipped.sum()),
                     "share": round(float(flipped.sum()) / max(int(inside.sum()), 1), 4)})
    return rows


def above(base: torch.Tensor, after: torch.Tensor, threshold: float) -> dict[str, Any]:
    firm = base >= threshold
    lost = int((firm & (after <= 0)).sum())
    return {"facts": int(firm.sum()), "flipped": lost, "retention": round(1 - lost / max(int(firm.sum()), 1), 4)}


def one(n_edits: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    settings = Settings()
    path = settings.resolved_model_path()
    model, tok = load_model(path, device="cpu")
    fingerprint = model_fingerprint(path)
    facts = load_retention_facts(path.name)
    pairs = [(f.prompt, f.answer) for f in facts]
    start = time.perf_counter()
    base = answer_margins(model, tok, pairs)
    margin_seconds = time.perf_counter() - start
    requests = load_edits(bundled_counterfact_path(), limit=n_edits).requests
    hp = default_hparams(model.config, "alphaedit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = Editor(model, tok, hp, _stats(settings, fingerprint, hp), fingerprint)
    editor.prepare()
    editor.apply(requests)
    edited = answer_margins(model, tok, pairs)
    deltas = {n: p.detach() - before[n] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in deltas:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(before[name] + noise * (deltas[name].norm() / noise.norm()))
    randomised = answer_margins(model, tok, pairs)
    keep = torch.tensor([f in without_subjects([f], {r.subject for r in requests}) for f in facts])
    base, edited, randomised = base[keep], edited[keep], randomised[keep]
    return {
        "n_edits": n_edits, "facts": int(keep.sum()), "margin_seconds": round(margin_seconds, 2),
        "base_margin_quantiles": {q: round(float(base.quantile(q)), 3) for q in (0.05, 0.1, 0.25, 0.5, 0.75)},
        "delta_norms": {name: round(float(d.norm()), 3) for name, d in deltas.items()},
        "edit": {"flipped": int((edited <= 0).sum()), "by_margin": by_bin(base, edited),
                 **{f"margin>={t}": above(base, edited, t) for t in (0.25, 0.5, 1.0)}},
        "random_same_norm": {"flipped": int((randomised <= 0).sum()), "by_margin": by_bin(base, randomised),
                             **{f"margin>={t}": above(base, randomised, t) for t in (0.25, 0.5, 1.0)}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-edits", type=int, action="append", help="edits in the batch (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/retention_margin_cpu.json"))
    args = parser.parse_args()
    runs = [one(n, args.threads) for n in (args.n_edits or [4])]
    for run in runs:
        edit, rand = run["edit"], run["random_same_norm"]
        print(json.dumps({"n_edits": run["n_edits"], "facts": run["facts"], "edit": edit["flipped"],
                          "random": rand["flipped"], "edit, margin >= 0.5": edit["margin>=0.5"],
                          "random, margin >= 0.5": rand["margin>=0.5"]}))
    model = Settings().resolved_model_path().name
    args.out.write_text(json.dumps({"command": [sys.executable, *sys.argv], "model": model, "runs": runs},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
