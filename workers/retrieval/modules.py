"""RECIPE's trainable parts (Chen et al., EMNLP 2024), as plain torch modules over frozen-encoder features.

* MLP_K / MLP_Q (``KeyHead``): ``Linear(F -> r)`` then ``+ ReLU(Linear(r -> r))`` as a residual, as in the paper's
  ``KnowledgeRepModel``; separate weights for knowledge statements and queries.
* MLP_P (``PromptHead``): ``x = ReLU(Linear(r, r))(k) + k``, ``Linear(r -> p * hidden)``, reshaped to p continuous
  prompt tokens in the LLM's input-embedding space. The output is multiplied by the RMS of the LLM's input
  embeddings (a buffer), so a fresh head already emits vectors of a token embedding's scale for any model.
* Knowledge Sentinel: trainable pseudo-token embeddings run through the frozen encoder and MLP_K; its key is the
  query-dependent threshold: a stored item is used only if ``s(q, k) > s(q, k_sentinel)``.

Deviation from the paper: similarity is cosine times a learned scale (CLIP-style), not ``q . k / sqrt(r)``, and
the sentinel's score has a learned offset, initialised from data (``calibrate_sentinel``). With the dot product
and heads trained from scratch in a few hundred steps, key norms grew until scores overflowed (NaN at step ~100)
and retrieval collapsed; the heads also start as a length-preserving projection (MLP_Q = MLP_K) so the encoder's
own similarity, which already ranks statements well, is the starting point.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workers.retrieval.encoder import SentenceEncoder

CHECKPOINT_FORMAT = "editq-recipe/1"


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes of the heads; ``llm_hidden`` comes from the LLM's input embeddings, never from a model table."""

    llm_hidden: int
    feature_dim: int = 1152
    encoder_hidden: int = 384
    pooling: str = "mean_max_min"
    rep_dim: int = 512
    prompt_tokens: int = 3
    sentinel_tokens: int = 10

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class KeyHead(nn.Module):
    """MLP_K or MLP_Q: standardised encoder features -> key space."""

    def __init__(self, feature_dim: int, rep_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(feature_dim, rep_dim)
        self.res = nn.Linear(rep_dim, rep_dim)
        # A length-preserving projection and a residual branch that starts at zero: a fresh head scores
        # query/knowledge pairs by the encoder's own similarity, which already ranks them well.
        nn.init.orthogonal_(self.inp.weight)
        nn.init.zeros_(self.inp.bias)
        nn.init.zeros_(self.res.weight)
        nn.init.zeros_(self.res.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.inp(features)
        return x + torch.relu(self.res(x))


class PromptHead(nn.Module):
    """MLP_P: a knowledge key -> ``prompt_tokens`` vectors of the LLM's hidden size."""

    def __init__(self, rep_dim: int, llm_hidden: int, prompt_tokens: int) -> None:
        super().__init__()
        self.res = nn.Linear(rep_dim, rep_dim)
        self.out = nn.Linear(rep_dim, llm_hidden * prompt_tokens)
        self.prompt_tokens = prompt_tokens
        self.llm_hidden = llm_hidden
        self.register_buffer("embed_rms", torch.ones(()))

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.res(keys)) + keys
        return (self.out(x) * self.embed_rms).reshape(keys.shape[0], self.prompt_tokens, self.llm_hidden)


class RecipeModel(nn.Module):
    """MLP_K, MLP_Q, MLP_P and the sentinel, plus the feature standardisation fitted on the training features."""

    def __init__(self, config: RecipeConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))
        self.key_head = KeyHead(config.feature_dim, config.rep_dim)
        self.query_head = KeyHead(config.feature_dim, config.rep_dim)
        self.prompt_head = PromptHead(config.rep_dim, config.llm_hidden, config.prompt_tokens)
        self.query_head.load_state_dict(self.key_head.state_dict())
        self.sentinel_tokens = nn.Parameter((torch.rand(1, config.sentinel_tokens, config.encoder_hidden) - 0.5) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.sentinel_bias = nn.Parameter(torch.zeros(()))

    def _scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    @property
    def scale(self) -> float:
        """Multiplier of q . k (unit keys) in a score."""
        return float(self._scale().detach())

    @property
    def sentinel_offset(self) -> float:
        """Constant added to the sentinel's score: ``s(q, KS) = scale * (q . k_KS + bias)``."""
        return float((self.sentinel_bias * self._scale()).detach())

    @staticmethod
    def search_keys(keys: torch.Tensor) -> torch.Tensor:
        """Keys as stored and searched: unit length (prompts still come from the raw keys)."""
        return nn.functional.normalize(keys, dim=-1)

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features[..., : self.config.feature_dim] - self.feature_mean) / self.feature_std

    def knowledge_keys(self, features: torch.Tensor) -> torch.Tensor:
        return self.key_head(self._standardise(features))

    def query_keys(self, features: torch.Tensor) -> torch.Tensor:
        return self.query_head(self._standardise(features))

    def prompts(self, keys: torch.Tensor) -> torch.Tensor:
        return self.prompt_head(keys)

    def sentinel_key(self, encoder: SentenceEncoder) -> torch.Tensor:
        """[rep_dim]; differentiable w.r.t. the pseudo-tokens and MLP_K (the encoder itself stays frozen)."""
        return self.knowledge_keys(encoder.features_from_embeds(self.sentinel_tokens))[0]

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Differentiable scores [nq, nk] of raw query and knowledge keys."""
        return self.search_keys(queries) @ self.search_keys(keys).T * self._scale()

    def sentinel_similarity(self, queries: torch.Tensor, sentinel: torch.Tensor) -> torch.Tensor:
        """Differentiable sentinel scores [nq]: the dynamic threshold each stored item must beat."""
        cos = self.search_keys(queries) @ self.search_keys(sentinel)
        return (cos + self.sentinel_bias) * self._scale()

    @torch.no_grad()
    def calibrate_sentinel(self, encoder: SentenceEncoder, feats: dict[str, torch.Tensor]) -> None:
        """Start the threshold between paraphrase->own-knowledge and neighbour->closest-knowledge cosines.

        Centred features give every query a near-zero cosine to any fixed key, so an uncalibrated sentinel would
        accept everything and its terms would dominate the first few hundred steps (measured: retrieval collapsed).
        """
        keys = self.search_keys(self.knowledge_keys(feats["stmt"]))
        own = (self.search_keys(self.query_keys(feats["gen"])) * keys).sum(-1)
        loc = (self.search_keys(self.query_keys(feats["loc"])) @ keys.T).amax(1)
        sentinel = self.search_keys(self.query_keys(feats["gen"])) @ self.search_keys(self.sentinel_key(encoder))
        target = 0.5 * (own.median() + loc.median())
        self.sentinel_bias.fill_(float(target - sentinel.mean()))

    def fit_standardisation(self, features: torch.Tensor) -> None:
        with torch.no_grad():
            f = features[:, : self.config.feature_dim].float()
            self.feature_mean.copy_(f.mean(0))
            self.feature_std.copy_(f.std(0).clamp_min(1e-4))

    def set_embed_rms(self, embedding_weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.prompt_head.embed_rms.fill_(float(embedding_weight.float().pow(2).mean().sqrt()))

    def save(self, path: Path | str, metadata: dict[str, str] | None = None) -> None:
        """One safetensors file: tensors plus the config (and anything in ``metadata``) as JSON strings."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(self.config)), **(metadata or {})}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.chmod(0o644)  # safetensors writes 0600; the checkpoint is a shipped, readable asset
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> tuple[RecipeModel, dict[str, str]]:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no RECIPE checkpoint at {path}")
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an editq RECIPE checkpoint (format {meta.get('format')!r})")
        model = cls(RecipeConfig.from_dict(json.loads(meta["config"])))
        model.load_state_dict(load_file(str(path)))
        model.eval()
        return model, meta
