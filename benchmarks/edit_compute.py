"""Edit compute cost: seconds per edit at batch 1, 10, 100, split into keys / v* / solve, and peak memory.

    python benchmarks/edit_compute.py --out benchmarks/results/edit_compute_cpu.json
    python benchmarks/edit_compute.py --random-shape llama-1b --out ...   # timing on a larger random-weight Llama

Each batch size starts from the unedited model. Peak memory is the CUDA allocator peak on GPU, and the process's
maximum resident set size on CPU (monotone over the run, so it bounds the larger batches from above).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shared.settings import Settings
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.editor import Editor
from workers.editing.hparams import default_hparams
from workers.editing.layout import ModelLayout
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.model_io import load_model, model_fingerprint

RANDOM_SHAPES = {
    # Llama-3.2-1B-like MLP/attention shape with SmolLM2's vocabulary (so its tokenizer works).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128),
}


def _random_model(base: Path, shape: str, device: str) -> tuple[torch.nn.Module, object, str]:
    _, tok = load_model(base, device="cpu")
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    for key, value in RANDOM_SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, f"random-{shape}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,10,100")
    parser.add_argument("--algo", default="alphaedit")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    settings = Settings()
    base = args.model or settings.resolved_model_path()
    device = str(torch.device("cuda" if torch.cuda.is_available() and settings.device != "cpu" else "cpu"))
    if args.random_shape:
        model, tok, fingerprint = _random_model(base, args.random_shape, device)
        stats_root = Path(tempfile.mkdtemp())
    else:
        model, tok = load_model(base, device=device)
        fingerprint = model_fingerprint(base)
        stats_root = settings.stats_dir
    hp = default_hparams(model.config, args.algo)  # type: ignore[arg-type]
    stats = SecondMomentCache(stats_root, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    requests = load_edits(bundled_counterfact_path(), limit=max(sizes)).requests
    layout = ModelLayout.from_model(model)
    original = {layer: layout.get_weight(model, layer) for layer in hp.layers}
    start = time.perf_counter()
    editor = Editor(model, tok, hp, stats, fingerprint)
    editor.prepare()
    stats_seconds = time.perf_counter() - start
    rows = []
    for size in sizes:
        editor = Editor(model, tok, hp, stats, fingerprint)
        editor.prepare()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = editor.apply(requests[:size])
        total = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        row = {"batch_size": size, "seconds_per_edit": total / size, "seconds_total": total,
               "split_seconds": result.seconds, "v_steps": result.v_steps, "peak_memory_bytes": int(peak),
               "peak_memory_kind": "cuda_max_allocated" if device.startswith("cuda") else "process_max_rss"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for layer, weight in original.items():
            layout.set_weight(model, layer, weight)
    out = {
        "model": fingerprint if args.random_shape else str(base), "algo": args.algo, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "stats_seconds": stats_seconds,
        "layers": list(hp.layers), "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
