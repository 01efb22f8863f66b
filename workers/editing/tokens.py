"""Tokenisation helpers: find the subject's last token and the target tokens, for any fast tokenizer.

Positions come from the tokenizer's character offsets on the exact text the model reads, so they stay right for
prefixes, BOS tokens and subjects that end inside a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

SLOT = "{}"


@dataclass(frozen=True)
class SubjectPrompt:
    """A text with the subject's character span; ``template`` holds one ``{}`` for the subject."""

    template: str
    subject: str

    @property
    def text(self) -> str:
        return self.template.replace(SLOT, self.subject, 1)

    @property
    def subject_end(self) -> int:
        return self.template.index(SLOT) + len(self.subject)


def subject_last_index(tokenizer: PreTrainedTokenizerBase, prompt: SubjectPrompt) -> tuple[list[int], int]:
    """Token ids of ``prompt.text`` and the index of the token holding the subject's last character."""
    enc = tokenizer(prompt.text, return_offsets_mapping=True)
    end = prompt.subject_end
    index = None
    for i, (start, stop) in enumerate(enc["offset_mapping"]):
        if stop > start and start < end:
            index = i
    if index is None:
        raise ValueError(f"subject {prompt.subject!r} not found among the tokens of {prompt.text!r}")
    return list(enc["input_ids"]), index


def target_token_ids(tokenizer: PreTrainedTokenizerBase, prompt_text: str, target: str) -> list[int]:
    """Ids of ``" " + target`` as they follow ``prompt_text``, without BOS/special tokens.

    Tokenising the joined text and cutting at the prompt's length keeps the merge the model would see; if the
    tokenizer merges across the boundary we fall back to tokenising the target alone.
    """
    target = target.strip()
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    full_ids = tokenizer(f"{prompt_text} {target}")["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        ids = full_ids[len(prompt_ids) :]
    else:
        ids = tokenizer(f" {target}", add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids)
    ids = [i for i in ids if i not in specials]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


@dataclass
class PaddedBatch:
    """Right-padded ids with the per-row positions that matter."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> PaddedBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return PaddedBatch(ids, mask, [len(r) for r in rows])


def chunks_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group row indices so that rows x padded width stays under ``max_tokens`` (bounds activation memory)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[i]
        if current and (len(current) + 1) * width > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups
