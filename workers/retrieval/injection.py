"""Prepending continuous prompts to a frozen causal LM's input embeddings: ``[prompt; query]``.

RECIPE's reference code inserts the prompt with a pre-hook on decoder layer 0 and strips it from the logits again.
Passing ``inputs_embeds`` does the same without hooks and without knowing any module path, so it works for every
HF causal LM (and for vLLM's prompt-embeds input). Sizes come from the embedding layer itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

TEXT_INJECTION_TEMPLATE = "{statement}. {statement}.\n"  # chosen by benchmarks/retrieval_injection.py


def text_prefix_ids(tokenizer, statement: str) -> list[int]:
    """Token ids of a retrieved statement as plain text in front of the query (in-context editing).

    Tokenised on its own, without special tokens, so ``prefix + query ids`` is exactly what the query alone would
    be with the statement line in front; the line break keeps the statement a separate sentence. The statement
    twice measured +0.05 reliability over once, and a label ("New fact:") added nothing
    (``benchmarks/results/retrieval_injection_cpu.json``).
    """
    return list(tokenizer(TEXT_INJECTION_TEMPLATE.format(statement=statement), add_special_tokens=False)["input_ids"])


@dataclass
class PromptedBatch:
    """Right-padded ``inputs_embeds`` [n, width, hidden] and mask; row i's token j sits at ``offsets[i] + j``."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    offsets: list[int]
    lengths: list[int]


def _embedding_weight(embedding: nn.Module) -> torch.Tensor:
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected an embedding layer with a .weight, got {type(embedding).__name__}")
    return weight


def embed_prompted(
    embedding: nn.Module,
    rows: Sequence[Sequence[int]],
    prompts: Sequence[torch.Tensor | None],
) -> PromptedBatch:
    """Embed token rows and prepend each row's prompt ([p_i, hidden], or None for no prompt); right padding.

    Gradients flow into the prompts (training); the embedding layer is the model's own
    (``model.get_input_embeddings()``), so scaled-embedding models (e.g. Gemma) get their scaling applied.
    """
    if len(rows) != len(prompts):
        raise ValueError(f"{len(rows)} rows but {len(prompts)} prompts")
    weight = _embedding_weight(embedding)
    device, dtype = weight.device, weight.dtype
    hidden = weight.shape[1]
    offsets = [0 if p is None else int(p.shape[0]) for p in prompts]
    lengths = [o + len(r) for o, r in zip(offsets, rows, strict=True)]
    width = max(lengths)
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)
    token_embeds = embedding(flat)
    pieces: list[torch.Tensor] = []
    start = 0
    for row, prompt, length in zip(rows, prompts, lengths, strict=True):
        parts = []
        if prompt is not None:
            if prompt.dim() != 2 or prompt.shape[1] != hidden:
                raise ValueError(f"prompt must be [p, {hidden}], got {tuple(prompt.shape)}")
            parts.append(prompt.to(device=device, dtype=dtype))
        parts.append(token_embeds[start : start + len(row)])
        start += len(row)
        if length < width:
            parts.append(torch.zeros(width - length, hidden, device=device, dtype=dtype))
        pieces.append(torch.cat(parts, 0))
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return PromptedBatch(torch.stack(pieces, 0), mask, offsets, lengths)


def prompt_embeds(
    embedding: nn.Module, query_ids: torch.Tensor | Sequence[int], prompt: torch.Tensor | None
) -> torch.Tensor:
    """[p + L, hidden] input embeddings for one query: the prompt (if any) then the query's token embeddings.

    This is what vLLM takes as ``{"prompt_embeds": ...}`` and what an HF model takes as ``inputs_embeds[None]``.
    """
    ids = query_ids.flatten().tolist() if isinstance(query_ids, torch.Tensor) else list(query_ids)
    return embed_prompted(embedding, [ids], [prompt]).inputs_embeds[0]
