"""Pydantic models for every boundary (CLI, HTTP, Redis payloads, Ray calls).

Validation errors must name the field and say what is wrong, because they are shown to the people and systems
submitting corrections.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

SUBJECT_SLOT = "{}"
MAX_SUBJECT_CHARS = 200
MAX_PROMPT_CHARS = 500
MAX_TARGET_CHARS = 200
MAX_PROBES = 32
MIN_SUBJECT_CHARS = 2
BIDI_CONTROLS = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have", "he", "her", "his", "i",
    "in", "is", "it", "its", "of", "on", "or", "she", "that", "the", "their", "them", "they", "this", "to", "was",
    "were", "which", "who", "with", "you",
})


def _check_text(value: str) -> str:
    """Reject text that cannot be encoded as UTF-8 (lone surrogates) or carries control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"is not valid UTF-8 text (position {err.start})") from None
    bad = [c for c in value if unicodedata.category(c) == "Cc" and c not in "\t\n"]
    if bad:
        raise ValueError(f"contains control character {bad[0]!r}")
    return value


def _bidi_problem(value: str) -> str | None:
    bidi = [c for c in value if c in BIDI_CONTROLS]  # text that renders differently from what it says
    return f"contains bidirectional control character U+{ord(bidi[0]):04X}" if bidi else None


def _subject_problem(value: str) -> str | None:
    """A subject must name something: not a stopword or a stray letter, which would match inside other text."""
    named = any(c.isalnum() for c in value) and (len(value) >= MIN_SUBJECT_CHARS or value.isupper() or value.isdigit())
    if not named:  # a lone capital or digit can be a name (CounterFact has 'Q'); 'e' or '-' cannot
        return (f"must have at least {MIN_SUBJECT_CHARS} characters with a letter or digit (or be one capital "
                f"letter or digit); got {value!r}")
    if value.lower() in STOPWORDS:
        return f"is a stopword ({value!r}), not a subject"
    return None


def intake_problems(request: EditRequest) -> list[tuple[tuple[str | int, ...], str]]:
    """Rules for *new* edits (the door and ``editq submit``), as (field location, message) pairs. They are not part
    of the model's validation, so edits stored under older rules (queue entries, manifests) stay readable."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if (msg := _subject_problem(request.subject)) is not None:
        problems.append((("subject",), msg))
    texts: list[tuple[tuple[str | int, ...], str | None]] = [
        ((name,), getattr(request, name)) for name in ("subject", "prompt", "target_new", "target_true", "source")
    ]
    texts += [(("paraphrase_prompts", i), p) for i, p in enumerate(request.paraphrase_prompts)]
    for i, probe in enumerate(request.neighborhood_prompts):
        texts += [(("neighborhood_prompts", i, "prompt"), probe.prompt), (("neighborhood_prompts", i, "target"),
                                                                          probe.target)]
    problems += [(loc, msg) for loc, value in texts if value and (msg := _bidi_problem(value)) is not None]
    return problems


def subject_pattern(subject: str) -> re.Pattern[str]:
    """The subject as whole words (so 'ran' is not found inside 'Iran')."""
    return re.compile(rf"(?<!\w){re.escape(subject)}(?!\w)")


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
EditId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/-]+$")]


class Probe(BaseModel):
    """A prompt (subject already written out) and the answer expected after the edit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: Annotated[Text, StringConstraints(max_length=MAX_PROMPT_CHARS)]
    target: Annotated[Text, StringConstraints(max_length=MAX_TARGET_CHARS)]

    _text = field_validator("prompt", "target")(_check_text)


class EditRequest(BaseModel):
    """One fact correction: make ``prompt`` (with the subject in ``{}``) continue with ``target_new``.

    ``edit_id`` is the client's idempotency key: re-submitting the same id never applies the edit twice. When a
    client sends none, it is derived from the content, so an identical correction also deduplicates.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    edit_id: EditId | None = None
    subject: Annotated[Text, StringConstraints(max_length=MAX_SUBJECT_CHARS)]
    prompt: Annotated[Text, StringConstraints(max_length=MAX_PROMPT_CHARS)] = Field(
        description="Prompt with '{}' where the subject goes, e.g. 'The capital of {} is'. A prompt that "
        "contains the subject literally is accepted and rewritten to use '{}'."
    )
    target_new: Annotated[Text, StringConstraints(max_length=MAX_TARGET_CHARS)]
    target_true: Annotated[Text, StringConstraints(max_length=MAX_TARGET_CHARS)] | None = None
    paraphrase_prompts: list[Annotated[Text, StringConstraints(max_length=MAX_PROMPT_CHARS)]] = Field(
        default_factory=list, max_length=MAX_PROBES, description="Other phrasings, subject written out."
    )
    neighborhood_prompts: list[Probe] = Field(
        default_factory=list,
        max_length=MAX_PROBES,
        description="Prompts about other subjects whose answers must not change.",
    )
    source: Annotated[str, StringConstraints(max_length=100)] = "api"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    _text = field_validator("subject", "prompt", "target_new", "target_true", "source")(
        lambda v: v if v is None else _check_text(v)
    )

    @field_validator("paraphrase_prompts")
    @classmethod
    def _paraphrases_text(cls, prompts: list[str]) -> list[str]:
        return [_check_text(p) for p in prompts]

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> EditRequest:
        slots = self.prompt.count(SUBJECT_SLOT)
        if slots == 0:
            found = subject_pattern(self.subject).search(self.prompt)
            if found is None:
                raise ValueError(
                    f"prompt must contain '{{}}' for the subject or the subject {self.subject!r} itself as whole "
                    f"words; got {self.prompt!r}"
                )
            self.prompt = self.prompt[: found.start()] + SUBJECT_SLOT + self.prompt[found.end():]
        elif slots > 1:
            raise ValueError(f"prompt must contain '{{}}' exactly once; got {slots} in {self.prompt!r}")
        if self.prompt.strip() == SUBJECT_SLOT:
            raise ValueError("prompt must contain text besides the subject")
        if self.target_true is not None and self.target_true == self.target_new:
            raise ValueError("target_new must differ from target_true")
        if self.edit_id is None:
            self.edit_id = self.content_key()
        return self

    @property
    def text(self) -> str:
        """The edit prompt with the subject written out."""
        return self.prompt.replace(SUBJECT_SLOT, self.subject)

    def content_key(self) -> str:
        """Stable id derived from what the edit says (used when the client gives no ``edit_id``)."""
        digest = hashlib.sha256(
            "\x1f".join([self.subject, self.prompt, self.target_new]).encode("utf-8")
        ).hexdigest()
        return f"sha256:{digest[:32]}"
