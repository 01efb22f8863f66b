"""A cheap filter in front of the retrieval tier's encoder: an edit can concern a query only if the query names its
subject (every word of the subject as a word of the query, case-insensitive, in any order; stopwords aside).

Why: the sentence encoder is the tier's cost on every query (~15-40 ms of CPU), yet most traffic is about none of
the stored edits; and RECIPE's learned sentinel sometimes lets a query about another subject through (locality).
CounterFact's paraphrases and user questions about an edited fact name its subject, so the gate keeps those, skips
the encoder for the rest, and restricts the search to the edits the query names. What it cannot serve: a query that
refers to the subject only by another name ("the Big Apple" for New York City); ``EDITQ_RETRIEVAL_SUBJECT_GATE=false``
restores the pure RECIPE behaviour. Words of scripts written without spaces (e.g. Chinese) are matched as substrings.
"""

from __future__ import annotations

import re
from collections import defaultdict

from shared.schemas import STOPWORDS

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return [w.casefold() for w in WORD.findall(text)]


def subject_words(subject: str) -> frozenset[str]:
    """The words a query must contain; a subject made only of stopwords ("The Who") keeps them all."""
    every = words(subject)
    return frozenset([w for w in every if w not in STOPWORDS] or every)


class SubjectGate:
    """Stored edits' subject words, indexed by word; not thread-safe (the tier's lock covers it)."""

    def __init__(self) -> None:
        self._words: dict[str, frozenset[str]] = {}
        self._by_word: dict[str, set[str]] = defaultdict(set)
        self._open: set[str] = set()  # no subject known (entries stored before subjects were): always candidates

    def __len__(self) -> int:
        return len(self._words) + len(self._open)

    def add(self, edit_id: str, subject: str | None) -> None:
        self.remove(edit_id)
        required = subject_words(subject or "")
        if not required:
            self._open.add(edit_id)
            return
        self._words[edit_id] = required
        for word in required:
            self._by_word[word].add(edit_id)

    def remove(self, edit_id: str) -> None:
        self._open.discard(edit_id)
        for word in self._words.pop(edit_id, ()):
            ids = self._by_word[word]
            ids.discard(edit_id)
            if not ids:
                del self._by_word[word]

    def clear(self) -> None:
        self._words.clear()
        self._by_word.clear()
        self._open.clear()

    def candidates(self, query: str) -> set[str]:
        """Edits the query names (plus those without a known subject)."""
        present = set(words(query))
        folded = query.casefold()

        def has(word: str) -> bool:
            return word in present or (not word.isascii() and word in folded)

        seen: set[str] = set()
        for word in present:
            seen |= self._by_word.get(word, set())
        if any(not w.isascii() for w in self._by_word):  # unspaced scripts: a subject word may sit inside a run
            seen |= {e for w, ids in self._by_word.items() if not w.isascii() and w in folded for e in ids}
        return {e for e in seen if all(has(w) for w in self._words[e])} | self._open
