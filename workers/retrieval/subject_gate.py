"""A cheap filter in front of the retrieval tier's encoder: an edit can concern a query only if the query names its
subject (every word of the subject as a word of the query, case-insensitive, in any order; stopwords aside).

Why: the sentence encoder is the tier's cost on every query (~15-40 ms of CPU), yet most traffic is about none of
the stored edits; and RECIPE's learned sentinel sometimes lets a query about another subject through (locality).
CounterFact's paraphrases and user questions about an edited fact name its subject, so the gate keeps those, skips
the encoder for the rest, and restricts the search to the edits the query names. What it cannot serve: a query that
refers to the subject only by another name ("the Big Apple" for New York City); ``EDITQ_RETRIEVAL_SUBJECT_GATE=false``
restores the pure RECIPE behaviour. Words of scripts written without spaces (e.g. Chinese) are matched as substrings.

A subject named only as the start of a longer name is not named: "Nintendo DS Lite" does not name "Nintendo DS"
when every place the subject's words stand together is followed (after one space) by a capitalised word that is
not a stopword. On 1,319 CounterFact val records this kept every edit prompt and paraphrase and cut the
neighbourhood prompts that reach another edit from 3.3% to 2.8% (docs/retrieval.md).
"""

from __future__ import annotations

import re
from collections import defaultdict

from shared.schemas import STOPWORDS

WORD = re.compile(r"\w+")


def extends_every_mention(query: str, phrase: tuple[str, ...]) -> bool:
    """True when the subject's words stand together in ``query`` and every such place continues with a capitalised
    non-stopword after one space ("Nintendo DS Lite" for "Nintendo DS"): the query names a longer entity."""
    tokens = list(WORD.finditer(query))
    folded = [t.group(0).casefold() for t in tokens]
    n = len(phrase)
    starts = [i for i in range(len(folded) - n + 1) if tuple(folded[i : i + n]) == phrase] if n else []
    if not starts:
        return False
    for i in starts:
        after = i + n
        if after >= len(tokens):
            return False
        word = tokens[after].group(0)
        gap = query[tokens[after - 1].end() : tokens[after].start()]
        if gap != " " or not word[:1].isupper() or word.casefold() in STOPWORDS:
            return False
    return True


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
        self._phrase: dict[str, tuple[str, ...]] = {}  # every word of the subject, in order (longer-name rule)
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
        self._phrase[edit_id] = tuple(words(subject or ""))
        for word in required:
            self._by_word[word].add(edit_id)

    def remove(self, edit_id: str) -> None:
        self._open.discard(edit_id)
        self._phrase.pop(edit_id, None)
        for word in self._words.pop(edit_id, ()):
            ids = self._by_word[word]
            ids.discard(edit_id)
            if not ids:
                del self._by_word[word]

    def clear(self) -> None:
        self._words.clear()
        self._phrase.clear()
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
        named = {e for e in seen if all(has(w) for w in self._words[e])}
        return {e for e in named if not extends_every_mention(query, self._phrase[e])} | self._open
