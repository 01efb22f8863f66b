"""Fluency of an edited model: ROME's weighted bi/tri-gram entropy of greedy generations on fixed neutral prompts.

Repetition loops, a classic symptom of collapse, drive it down. Part of the general measures (``general.py``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Neutral prose starts for the fluency probe (no CounterFact subject in them).
FLUENCY_PROMPTS: tuple[str, ...] = (
    "The best way to learn a new language is",
    "Every morning, the old baker",
    "Rivers shape the land around them by",
    "When I first moved to the city,",
    "The main advantage of public transport is",
    "A healthy breakfast usually includes",
    "The story begins on a cold winter night, when",
    "Scientists study the weather because",
    "To plant a tree, you should first",
    "The museum's new exhibition shows",
    "Most children enjoy playing outside because",
    "Writing a good essay requires",
    "The train was late again, so",
    "In the middle of the forest there was",
    "Saving money each month is easier if",
    "The history of the bicycle",
)


# ---- fluency --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def n_gram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n of weight_n x entropy (bits) of the n-gram distribution.

    Words and punctuation are split by a regex (ROME uses nltk.word_tokenize; the same on plain prose)."""
    tokens = _WORD.findall(text)
    values = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


@torch.no_grad()
def greedy_generations(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy continuations (new text only) of ``prompts`` in one left-padded batch."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=pad,
    )
    return tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)


def fluency(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str] = FLUENCY_PROMPTS,
    max_new_tokens: int = 48,
) -> float:
    """Mean ROME n-gram entropy of the greedy continuations of ``prompts`` (higher = more varied text)."""
    texts = greedy_generations(model, tokenizer, prompts, max_new_tokens)
    return sum(n_gram_entropy(t) for t in texts) / len(texts)
