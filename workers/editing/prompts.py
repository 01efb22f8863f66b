"""Turn a batch of edit requests into token rows: every (edit, context template) pair is one row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from shared.schemas import EditRequest
from workers.editing.tokens import SLOT, SubjectPrompt, subject_last_index, target_token_ids

KL_TEMPLATE = "{} is a"


@dataclass
class Row:
    """One tokenised sequence with where to read/patch it."""

    ids: list[int]
    edit: int
    template: int
    subject_pos: int
    target_pos: list[int]  # positions whose logits predict the target tokens (empty for key/KL rows)
    target_ids: list[int]


def _subject_prompt(template: str, request: EditRequest) -> SubjectPrompt:
    return SubjectPrompt(template=template.replace(SLOT, request.prompt, 1), subject=request.subject)


def key_rows(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str]
) -> list[Row]:
    """Rows for reading keys: each template applied to each edit's prompt (no target)."""
    rows = []
    for e, request in enumerate(requests):
        for t, template in enumerate(templates):
            ids, pos = subject_last_index(tokenizer, _subject_prompt(template, request))
            rows.append(Row(ids, e, t, pos, [], []))
    return rows


def rewrite_rows(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str]
) -> list[Row]:
    """Rows for the v* loss: prompt + target (teacher-forced), one per template, per edit."""
    rows = []
    for e, request in enumerate(requests):
        target = target_token_ids(tokenizer, request.text, request.target_new)
        for t, template in enumerate(templates):
            ids, pos = subject_last_index(tokenizer, _subject_prompt(template, request))
            start = len(ids) - 1
            rows.append(
                Row(ids + target[:-1], e, t, pos, list(range(start, start + len(target))), target)
            )
    return rows


def kl_rows(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]) -> list[Row]:
    """Rows for the KL "essence" term: '<subject> is a', read at the subject's last token."""
    rows = []
    for e, request in enumerate(requests):
        ids, pos = subject_last_index(tokenizer, SubjectPrompt(KL_TEMPLATE, request.subject))
        rows.append(Row(ids, e, -1, pos, [], []))
    return rows
