"""Statistics corpora shipped with editq, so a fresh machine need not sample them (about 10 minutes on a CPU core).

A shipped corpus is exactly the text ``workers.editing.stats.sample_texts`` gave for one model (named by its
fingerprint) and one self-sampled ``StatsCorpus`` (size and seed). Statistics computed from it therefore equal those
computed after sampling, so it lives under the same cache key (``self-<n>x<tokens>-seed<s>``), and it is used only
for that model fingerprint and corpus id: any other model, size or seed still samples, and a ``--stats-corpus`` file
keys its own cache. ``build.py`` made each file and records how in ``index.json``; the loader checks the sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
INDEX = HERE / "index.json"


class ShippedCorpusError(RuntimeError):
    """A shipped corpus file does not match its recorded checksum (a damaged install)."""


def encode_texts(texts: list[str]) -> bytes:
    """The canonical form the checksum is taken over: one ``{"text": ...}`` JSON object per line."""
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode("utf-8")


@dataclass(frozen=True)
class ShippedCorpus:
    file: str
    model_fingerprint: str
    corpus_id: str
    n_texts: int
    sha256: str
    made_with: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return HERE / self.file

    def texts(self) -> list[str]:
        raw = gzip.decompress(self.path.read_bytes())
        digest = hashlib.sha256(raw).hexdigest()
        if digest != self.sha256:
            raise ShippedCorpusError(f"{self.path} has sha256 {digest}, index.json records {self.sha256}")
        texts = [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines() if line]
        if len(texts) != self.n_texts:
            raise ShippedCorpusError(f"{self.path} holds {len(texts)} texts, index.json records {self.n_texts}")
        return texts


def shipped() -> list[ShippedCorpus]:
    if not INDEX.exists():
        return []
    return [ShippedCorpus(**entry) for entry in json.loads(INDEX.read_text())["corpora"]]


def find(model_fingerprint: str, corpus_id: str) -> ShippedCorpus | None:
    """The shipped corpus for exactly this model and corpus id, or None (then the caller samples)."""
    for entry in shipped():
        if entry.model_fingerprint == model_fingerprint and entry.corpus_id == corpus_id:
            return entry
    return None
