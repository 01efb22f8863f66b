"""Make (or check) a shipped statistics corpus: ``python -m workers.editing.corpora.build --model DIR``.

Runs the pipeline's own sampler (``stats.sample_texts``) with the sizes and seed the edit worker would use for this
model (``default_hparams``), writes ``<fingerprint>.<corpus_id>.jsonl.gz`` next to this file (gzip without a
timestamp, so the bytes are reproducible) and records in ``index.json`` how it was made. ``--check`` samples again
and compares with the shipped file instead of writing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

from workers.editing.corpora import HERE, INDEX, encode_texts, find
from workers.editing.hparams import default_hparams
from workers.editing.stats import StatsCorpus, sample_texts
from workers.model_io import load_model, model_fingerprint

BATCH_SIZE = 64  # sample_texts' default; the draws depend on it, so it is recorded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="HF model directory (e.g. the fetched SmolLM2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the edit worker runs with 1)")
    parser.add_argument("--check", action="store_true", help="sample again and compare with the shipped file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu")
    hp = default_hparams(model.config)
    corpus = StatsCorpus(n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed)
    fingerprint = model_fingerprint(args.model)
    started = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        print(f"{stage}: {done}/{total} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    texts = sample_texts(model, tokenizer, corpus.n_texts, corpus.text_tokens, corpus.seed, BATCH_SIZE, progress)
    seconds = time.perf_counter() - started
    raw = encode_texts(texts)
    digest = hashlib.sha256(raw).hexdigest()
    if args.check:
        entry = find(fingerprint, corpus.corpus_id)
        if entry is None:
            print(f"no shipped corpus for {fingerprint} / {corpus.corpus_id}", file=sys.stderr)
            return 1
        same = entry.sha256 == digest
        print(f"{entry.file}: {'identical' if same else 'DIFFERENT'} ({seconds:.0f} s to sample)")
        return 0 if same else 1

    name = f"{fingerprint}.{corpus.corpus_id}.jsonl.gz"
    (HERE / name).write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    entry = {
        "file": name, "model_fingerprint": fingerprint, "corpus_id": corpus.corpus_id, "n_texts": len(texts),
        "sha256": digest,
        "made_with": {
            "command": f"python -m workers.editing.corpora.build --model <{args.model.name}> --threads {args.threads}",
            "sampler": "workers.editing.stats.sample_texts", "n_tokens": corpus.text_tokens, "seed": corpus.seed,
            "batch_size": BATCH_SIZE, "device": "cpu", "torch_threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "sample_seconds": round(seconds, 1), "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    index = json.loads(INDEX.read_text()) if INDEX.exists() else {"corpora": []}
    index["corpora"] = [e for e in index["corpora"]
                        if (e["model_fingerprint"], e["corpus_id"]) != (fingerprint, corpus.corpus_id)] + [entry]
    INDEX.write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {name} ({len(texts)} texts, {(HERE / name).stat().st_size / 1e3:.0f} kB, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
