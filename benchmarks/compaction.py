"""Compaction (issue 13): does one joint re-solve of all live edits restore health at equal efficacy, and what does it
cost as the edits grow?

One sequential stream of CounterFact train edits in batches (the default editor, no budget). Every ``--eval-every``
edits the sequential model is measured (general health on the first ``--general-tokens`` positions of the shipped
mixed text, all retention facts; efficacy of every edit so far on its own prompt), then compacted on the spot
(``workers.editing.compaction.compact``, nothing refused), measured again, and put back exactly, so the stream goes
on sequentially and every checkpoint compares the two at the same edits. Exact command (repository root):

    .venv/bin/python benchmarks/compaction.py --data /work/shared/data/counterfact-train.json --n-edits 1000 \\
        --batch-size 100 --eval-every 250 --out benchmarks/results/compaction_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/compaction.py` finds benchmarks.*

from benchmarks.lifelong import load_general
from benchmarks.sequential_collapse import _parse_sets, _setup, _stats, _write
from workers.datasets import load_edits
from workers.editing.compaction import LiveEdits, compact
from workers.editing.editor import Editor
from workers.editing.hparams import default_hparams


def _norms(editor: Editor) -> dict[int, float]:
    base = editor.base_weights()
    return {layer: float((w - base[layer]).norm() / base[layer].norm()) for layer, w in editor.state.weights.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--algo", default="alphaedit")
    parser.add_argument("--n-edits", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--general-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="Editor override key=value.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, tok, fingerprint, settings = _setup(args)
    model_name = Path(args.model or settings.resolved_model_path()).name
    hp = default_hparams(model.config, args.algo).with_overrides(**_parse_sets(args.set))
    requests = load_edits(args.data, limit=args.n_edits).requests
    general = load_general(model, tok, settings, fingerprint, model_name, args.general_tokens)
    editor = Editor(model, tok, hp, _stats(settings, fingerprint, hp), fingerprint)
    editor.prepare()
    result: dict[str, Any] = {
        "algo": args.algo, "hparams": hp.to_dict(), "model_fingerprint": fingerprint, "data": str(args.data),
        "batch_size": args.batch_size, "general_tokens": args.general_tokens, "device": str(editor.device),
        "threads": args.threads, "command": [sys.executable, *sys.argv], "points": [],
        "notes": ["at each point the sequential model is measured, compacted (max_lost=None), measured again and "
                  "restored exactly; efficacy = share of all edits so far whose new target wins on its own prompt",
                  "relative_drift = ||W - W0|| / ||W0|| per edited layer"],
    }
    pairs = []
    edit_seconds = 0.0
    started = time.perf_counter()
    next_eval = args.eval_every
    for begin in range(0, len(requests), args.batch_size):
        batch = requests[begin : begin + args.batch_size]
        t0 = time.perf_counter()
        out = editor.apply(batch)
        edit_seconds += time.perf_counter() - t0
        pairs += list(zip(batch, out.targets, strict=True))
        done = begin + len(batch)
        if done < next_eval and done < len(requests):
            continue
        next_eval += args.eval_every
        subjects = [r.subject for r, _ in pairs]
        point: dict[str, Any] = {"edits": done, "edit_seconds": edit_seconds}
        point["sequential"] = {"general": general(model, subjects),
                               "relative_drift": _norms(editor)}
        saved_weights = {layer: w.clone() for layer, w in editor.state.weights.items()}
        saved_cov = {layer: c.clone() for layer, c in editor.state.prev_keys_cov.items()}
        t0 = time.perf_counter()
        compacted = compact(editor, LiveEdits.latest(pairs), max_lost=None)
        point["compaction_seconds"] = time.perf_counter() - t0
        point["compaction_split"] = {k: round(v, 2) for k, v in compacted.result.seconds.items()}
        point["sequential"]["efficacy"] = compacted.efficacy(after=False)
        point["compacted"] = {"general": general(model, subjects), "relative_drift": _norms(editor),
                              "efficacy": compacted.efficacy(), "lost": len(compacted.lost),
                              "gained": sum(a and not b for a, b in zip(compacted.takes_after, compacted.took_before,
                                                                        strict=True))}
        editor.state.weights.update(saved_weights)  # back to the sequential trajectory, exactly
        editor.state.prev_keys_cov.clear()
        editor.state.prev_keys_cov.update(saved_cov)
        editor.reset_weights()
        result["points"].append(point)
        _write(args.out, result)
        s, c = point["sequential"], point["compacted"]
        print(f"[{done} edits] sequential KL {s['general']['kl']:.4f} retention {s['general']['retention']:.3f} "
              f"eff {s['efficacy']:.3f} | compacted KL {c['general']['kl']:.4f} retention "
              f"{c['general']['retention']:.3f} eff {c['efficacy']:.3f} ({point['compaction_seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    result["seconds_total"] = time.perf_counter() - started
    _write(args.out, result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
