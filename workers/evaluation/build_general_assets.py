"""Build the shipped assets of ``workers.evaluation.general`` once, offline (run after `editq models fetch`).

    python -m workers.evaluation.build_general_assets text    # general_text.jsonl.gz: mixed text for KL/agreement
    python -m workers.evaluation.build_general_assets facts --counterfact-dir /work/shared/data  # retention_facts

* ``text``: the held-out prose plus prose, chat and list text sampled from SmolLM2 itself (temperature 0.8,
  top-p 0.95, fixed seed, batched with a KV cache). Self-generated text is in-distribution for the base model, so
  KL/agreement on it measure how much editing moved the model on the kind of text it actually produces, and it
  carries no licence or benchmark-contamination question. Records are interleaved by kind, so any prefix is mixed.
* ``facts``: CounterFact val facts (prompt / rephrase / neighbourhood prompt with their true answers) that the
  base model completes greedily, excluding every prompt that names (whole word, case-sensitive) a subject of the
  train split, which the lifelong benchmark edits; topped up with train neighbourhood prompts (same exclusion)
  when val gives fewer than ``--min-facts``. Shuffled with the seed, so a prefix is a uniform subset.
  SmolLM2-135M completes only ~3% of CounterFact prompts at once (it often starts with "the", "of", a year), so a
  fact it states a few words later is kept *bridged*: the prompt is extended by the model's own greedy words before
  the true answer ("Titlis is located in the continent" + " of" -> "Europe"), then checked with the same strict
  rule (every answer token the argmax). Bridged facts carry ``"bridged": true``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.settings import Settings
from workers.evaluation.general import GENERAL_TEXT, RETENTION_FACTS, greedy_generations, subject_pattern
from workers.evaluation.runner import heldout_texts
from workers.evaluation.scoring import token_accuracy
from workers.model_io import load_model

TOPICS = (
    "baking bread", "the water cycle", "learning to play the guitar", "keeping a vegetable garden", "saving money",
    "training for a marathon", "how volcanoes form", "the life of honey bees", "writing a good resume",
    "taking care of a puppy", "the history of printing", "how airplanes fly", "recycling at home",
    "planning a birthday party", "the solar system", "learning a second language", "staying focused while studying",
    "making friends in a new city", "how rainbows form", "cooking a simple pasta dinner", "the invention of the wheel",
    "camping in the mountains", "how the heart works", "starting a small business", "choosing a good book",
    "the migration of birds", "painting with watercolours", "how computers store data", "getting a good night's sleep",
    "the rules of chess", "fixing a flat bicycle tyre", "the tides of the ocean", "teaching children to read",
    "building a birdhouse", "how coffee is grown", "the importance of exercise", "visiting a museum",
    "cleaning a kitchen quickly", "the phases of the moon", "how bridges are built", "preparing for a job interview",
    "the life cycle of a butterfly", "reducing stress at work", "how glass is made", "organising a small library",
    "the causes of earthquakes", "brewing tea properly", "how wind turbines work",
)
PROSE_STARTS = (
    "{T} is a subject that", "Many people are curious about {t}.", "A short introduction to {t}.\n\n",
    "When it comes to {t},", "Here is what I learned about {t}:", "The first thing to know about {t} is that",
)
CHAT_ASKS = (
    "Can you explain {t} to a beginner?", "Tell me something interesting about {t}.",
    "Write a short paragraph about {t}.", "What are the most common mistakes people make with {t}?",
    "I'm curious about {t}. Where should I start?", "Write a short story that involves {t}.",
)
LIST_ASKS = (
    "Give me a numbered list of tips for {t}.", "List the main steps of {t}.",
    "What are five facts about {t}? Answer as a list.",
)
LIST_STARTS = ("Ten things to know about {t}:\n1.", "A checklist for {t}:\n-", "Steps for {t}:\n\nStep 1:")


def _fill(template: str, topic: str) -> str:
    return template.replace("{t}", topic).replace("{T}", topic[:1].upper() + topic[1:])


def _prompts(tokenizer: PreTrainedTokenizerBase, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, prompt text) for every topic: one prose start, one chat request, one list (chat or plain)."""
    out = []
    for topic in TOPICS:
        out.append(("prose", _fill(rng.choice(PROSE_STARTS), topic)))
        chat = [{"role": "user", "content": _fill(rng.choice(CHAT_ASKS), topic)}]
        out.append(("chat", tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)))
        if rng.random() < 0.5:
            ask = [{"role": "user", "content": _fill(rng.choice(LIST_ASKS), topic)}]
            out.append(("list", tokenizer.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)))
        else:
            out.append(("list", _fill(rng.choice(LIST_STARTS), topic)))
    return out


@torch.no_grad()
def sample_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[tuple[str, str]],
    max_new_tokens: int, batch_size: int, seed: int,
) -> list[dict[str, str]]:
    """Prompt + sampled continuation per prompt (left-padded batches, KV cache); a chat answer keeps its end
    token, plain text is cut at the first end token."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    torch.manual_seed(seed)
    records = []
    for begin in range(0, len(prompts), batch_size):
        group = prompts[begin : begin + batch_size]
        rows = [tokenizer(text)["input_ids"] for _, text in group]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
            max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
        )
        print(f"batch {begin // batch_size}: {len(group)} x {out.shape[1] - width} tokens in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for (kind, text), new in zip(group, out[:, width:].tolist(), strict=True):
            if eos in new:
                end = new.index(eos)
                new = new[: end + 1] if text.startswith("<|im_start|>") else new[:end]
            records.append({"kind": kind, "text": text + tokenizer.decode(new, skip_special_tokens=False)})
    return records


def _interleave(groups: Sequence[Sequence[dict[str, str]]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def build_text(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model, device="cpu")
    rng = random.Random(args.seed)
    prompts = _prompts(tokenizer, rng)
    sampled = sample_texts(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, args.seed)
    by_kind = {k: [r for r in sampled if r["kind"] == k] for k in ("prose", "chat", "list")}
    heldout = [{"kind": "heldout", "text": t} for t in heldout_texts()]
    records = _interleave([heldout, by_kind["prose"], by_kind["chat"], by_kind["list"]])
    with gzip.GzipFile(args.out, "wb", mtime=0) as handle:  # mtime 0: the same text gives the same bytes
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    n_tokens = sum(len(tokenizer(r["text"])["input_ids"]) for r in records)
    print(f"{len(records)} texts, {n_tokens} tokens -> {args.out} ({args.out.stat().st_size} bytes)")


def _candidates(records: Sequence[dict], fields: Sequence[tuple[str, str, bool]], split: str) -> list[dict]:
    out = []
    for r in records:
        for prompt_key, answer_key, has_subject in fields:
            prompt, answer = r.get(prompt_key), r.get(answer_key)
            if prompt and answer:
                out.append({"prompt": prompt.strip(), "answer": answer.strip(),
                            "subject": r["subject"] if has_subject else None,
                            "source": f"{split}:{prompt_key}", "case_id": r.get("case_id")})
    return out


def _usable(candidates: Sequence[dict], pattern, seen: set[str]) -> list[dict]:
    """Drop prompts naming an edited (train) subject, prompts already taken, and ambiguous prompts (one prompt
    with several answers)."""
    answers: dict[str, set[str]] = {}
    for c in candidates:
        answers.setdefault(c["prompt"], set()).add(c["answer"])
    out = []
    for c in candidates:
        p = c["prompt"]
        if p in seen or len(answers[p]) > 1 or (pattern is not None and pattern.search(p)):
            continue
        seen.add(p)
        out.append(c)
    return out


def _strict(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[dict]) -> list[bool]:
    acc = token_accuracy(model, tokenizer, [(f["prompt"], f["answer"]) for f in facts], max_batch_tokens=4096)
    return [a >= 1.0 for a in acc.tolist()]


def _greedy_found(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[dict], pattern, seen: set[str],
    args: argparse.Namespace, batch_size: int = 128,
) -> list[dict]:
    """Candidates whose true answer the greedy continuation states at once, or bridged: when it appears (whole
    word, after a space, no newline before it) within its first ``--bridge-chars``, the prompt is extended by the
    model's own words before it ("X is located in the continent" + " of" -> "Antarctica"). Prompts are batched
    by token length (little left padding). The caller re-checks every one with the strict teacher-forced rule."""
    order = sorted(range(len(facts)), key=lambda i: len(tokenizer(facts[i]["prompt"])["input_ids"]))
    out = []
    t0 = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        group = [facts[i] for i in order[begin : begin + batch_size]]
        texts = greedy_generations(model, tokenizer, [f["prompt"] for f in group], args.bridge_tokens)
        for fact, text in zip(group, texts, strict=True):
            match = re.search(r"(?<!\w)" + re.escape(fact["answer"]) + r"(?!\w)", text)
            if match is None or match.start() > args.bridge_chars:
                continue
            bridge = text[: match.start()]
            if not bridge.endswith(" ") or "\n" in bridge:
                continue
            if bridge.strip() == "":
                out.append(fact)
                continue
            prompt = fact["prompt"] + bridge.rstrip()
            if prompt in seen or (pattern is not None and pattern.search(prompt)):
                continue
            seen.add(prompt)
            out.append(fact | {"prompt": prompt, "bridged": True})
        print(f"  {begin + len(group)}/{len(facts)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def _known(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[dict], pattern, seen: set[str],
    args: argparse.Namespace,
) -> tuple[list[dict], int, int]:
    """Facts the model completes greedily, as asked or bridged (``--bridge-tokens`` 0: as asked only, checked
    teacher-forced directly); counts of each."""
    t0 = time.perf_counter()
    found = _greedy_found(model, tokenizer, facts, pattern, seen, args) if args.bridge_tokens > 0 else list(facts)
    kept = [f for f, k in zip(found, _strict(model, tokenizer, found), strict=True) if k]
    bridged = sum(1 for f in kept if f.get("bridged"))
    print(f"{len(facts)} candidates: {len(kept) - bridged} direct, {bridged} bridged "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return kept, len(kept) - bridged, bridged


def build_facts(args: argparse.Namespace) -> None:
    data = Path(args.counterfact_dir)
    val = json.loads((data / "counterfact-val.json").read_text(encoding="utf-8"))
    train = json.loads((data / "counterfact-train.json").read_text(encoding="utf-8"))
    pattern = subject_pattern(r["subject"] for r in train)
    model, tokenizer = load_model(args.model, device="cpu")
    fields = [("prompt", "ground_truth", True), ("rephrase_prompt", "ground_truth", True),
              ("locality_prompt", "locality_ground_truth", False)]
    seen: set[str] = set()
    val_c = _candidates(val, fields, "val")
    val_ok = _usable(val_c, pattern, seen)
    kept, direct, bridged = _known(model, tokenizer, val_ok, pattern, seen, args)
    counts = {"val_candidates": len(val_c), "val_after_exclusion": len(val_ok), "val_direct": direct,
              "val_bridged": bridged}
    if len(kept) < args.min_facts:
        train_c = _candidates(train, [("locality_prompt", "locality_ground_truth", False)], "train")
        train_ok = _usable(train_c, pattern, seen)
        extra, direct, bridged = _known(model, tokenizer, train_ok, pattern, seen, args)
        counts |= {"train_locality_candidates": len(train_c), "train_locality_after_exclusion": len(train_ok),
                   "train_locality_direct": direct, "train_locality_bridged": bridged}
        kept += extra
    random.Random(args.seed).shuffle(kept)
    out = {
        "_comment": "CounterFact facts SmolLM2-135M-Instruct completes greedily (teacher-forced: every answer token "
        "is the argmax after the prompt), none naming a subject of counterfact-train (whole word, case-sensitive), "
        "which the lifelong benchmark edits. Facts marked bridged have the prompt extended by the model's own greedy "
        "words before the true answer. Order is a seeded shuffle: a prefix is a uniform subset. Built by "
        "`python -m workers.evaluation.build_general_assets facts` (workers/evaluation/build_general_assets.py).",
        "model": Path(args.model).name,
        "built": {"seed": args.seed, "min_facts": args.min_facts, "bridge_tokens": args.bridge_tokens,
                  "bridge_chars": args.bridge_chars, **counts, "facts": len(kept)},
        "facts": kept,
    }
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(out["built"]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    text = sub.add_parser("text", help="sample the mixed text (general_text.jsonl.gz)")
    text.add_argument("--out", type=Path, default=GENERAL_TEXT)
    text.add_argument("--max-new-tokens", type=int, default=224)
    text.add_argument("--batch-size", type=int, default=48)
    facts = sub.add_parser("facts", help="select the retention facts (retention_facts.json)")
    facts.add_argument("--out", type=Path, default=RETENTION_FACTS)
    facts.add_argument("--counterfact-dir", type=Path, required=True,
                       help="folder with counterfact-val.json and counterfact-train.json")
    facts.add_argument("--min-facts", type=int, default=1000)
    facts.add_argument("--bridge-tokens", type=int, default=6,
                       help="greedy tokens searched for the answer when it does not come at once (0: direct only)")
    facts.add_argument("--bridge-chars", type=int, default=24, help="most characters of model text before it")
    for p in (text, facts):
        p.add_argument("--model", type=Path, default=None, help="model directory (default: the fetched SmolLM2)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    args.model = args.model or Settings().resolved_model_path()
    if args.threads:
        torch.set_num_threads(args.threads)
    (build_text if args.what == "text" else build_facts)(args)


if __name__ == "__main__":
    main()
