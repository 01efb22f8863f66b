"""The frozen sentence encoder (all-MiniLM-L6-v2) that turns statements and queries into features.

Features are ``[mean; max; min]`` of the last hidden states over the real tokens (3 x 384 = 1152-d). The paper
concatenates ``[pooler; mean; max; min]`` of RoBERTa; we drop the pooler because sentence-transformers never trains
BERT's pooler for MiniLM (its sentence embedding is the mean), while max/min keep token-level evidence (a subject's
rare word pieces) that a mean over a long CounterFact paraphrase prefix dilutes. ``pooling="mean"`` is kept as an
option; the mean is always the first 384 dims, so one cached feature file serves both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModel, AutoTokenizer

Pooling = Literal["mean", "mean_max_min"]
POOL_FACTORS: dict[str, int] = {"mean": 1, "mean_max_min": 3}
_BIG = 1e4


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool ``hidden`` [n, l, d] over positions where ``mask`` [n, l] is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if pooling == "mean":
        return mean
    high = (hidden - (1 - m) * _BIG).amax(1)
    low = (hidden + (1 - m) * _BIG).amin(1)
    return torch.cat([mean, high, low], dim=-1)


def encoder_fingerprint(path: Path | str) -> str:
    """Short id of an encoder directory (config + weight header), stored in checkpoints to catch mismatches."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        with weights.open("rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:12]


class SentenceEncoder:
    """Frozen BERT-style encoder; ``features`` for text, ``features_from_embeds`` (differentiable) for the
    Knowledge Sentinel's pseudo-tokens."""

    def __init__(
        self,
        path: Path | str,
        pooling: Pooling = "mean_max_min",
        device: str | torch.device = "cpu",
        max_length: int = 128,
    ) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"no sentence encoder at {self.path}: run `editq models fetch` first")
        self.device = torch.device(device)
        self.pooling: Pooling = pooling
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32)
        self.model.to(self.device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.hidden_size: int = self.model.config.hidden_size
        self.feature_dim = self.hidden_size * POOL_FACTORS[pooling]
        self.fingerprint = encoder_fingerprint(self.path)

    @torch.no_grad()
    def features(
        self,
        texts: Sequence[str],
        batch_size: int = 128,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """[len(texts), feature_dim] float32 on CPU; batches sorted by length so little compute goes to padding."""
        out = torch.zeros(len(texts), self.feature_dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            out[idx] = pool(hidden, enc["attention_mask"], self.pooling).float().cpu()
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
        return out

    def features_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Features of pseudo-token embeddings [n, l, hidden] (gradients flow to ``embeds``, not the encoder)."""
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return pool(hidden, mask, self.pooling)
