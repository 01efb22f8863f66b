"""The query side of the retrieval tier inside a serving replica: look the query up, and on a hit put the edit in
front of the prompt (``EDITQ_RETRIEVAL_INJECTION``): RECIPE's continuous prompt as embeddings
(``{"prompt_embeds": ...}``), the edit's statement as text (``{"prompt_token_ids": ...}``), or both (the default).

The replica needs only the LLM's input-embedding table for this (read from the checkpoint files by name, found
through the model class on the meta device, so no model-specific path is hard-coded), the sentence encoder and the
RECIPE heads. Rollout probes (``internal``) never use the tier: they must test the weights alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from shared.settings import Settings
from workers.retrieval.injection import text_prefix_ids
from workers.retrieval.tier import RetrievalTier
from workers.serving.schemas import ChatMessage, RetrievedEdit

log = logging.getLogger("editq.serving.retrieval")


def load_input_embeddings(model_dir: Path) -> nn.Module:
    """The model's input-embedding module with its trained weights, without loading the rest of the model."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    embedding = skeleton.get_input_embeddings()
    if list(embedding.buffers()):  # e.g. scaled embeddings keep their scale in a buffer: load the real module
        full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        return full.get_input_embeddings().eval()
    name = next(n for n, p in skeleton.named_parameters() if p is embedding.weight)
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                weight = handle.get_tensor(name).float()
                break
    else:
        raise FileNotFoundError(f"{name} not found in the safetensors files of {model_dir}")
    module = embedding.to_empty(device="cpu")
    with torch.no_grad():
        module.weight.copy_(weight)
    return module.eval()


def query_text(prompt: str | None, messages: list[ChatMessage] | None) -> str:
    """What to look up: the plain prompt, or the last user message (never the chat template around it)."""
    if prompt is not None:
        return prompt
    users = [m.content for m in messages or [] if m.role == "user"]
    return users[-1] if users else ""


class QueryRetrieval:
    def __init__(
        self, tier: RetrievalTier, embedding: nn.Module, tokenizer: Any, injection: str = "prompt", top_k: int = 1
    ) -> None:
        self.tier = tier
        self.embedding = embedding
        self.tokenizer = tokenizer
        self.injection = injection  # what a hit puts in front: RECIPE's prompt, the statement as text, or both
        self.top_k = top_k  # text / hybrid: statements of up to this many edits above the sentinel

    @classmethod
    def load(cls, settings: Settings, tokenizer: Any) -> QueryRetrieval | None:
        tier = RetrievalTier.for_model(settings)
        if tier is None:
            return None
        return cls(tier, load_input_embeddings(settings.resolved_model_path()), tokenizer,
                   settings.retrieval_injection, settings.retrieval_top_k)

    @property
    def stale_seconds(self) -> float:
        """Seconds the tier has answered from memory during a Redis outage (0 for an in-memory tier or in sync)."""
        return float(getattr(self.tier.store, "stale_seconds", 0.0))

    @torch.no_grad()
    def prepare(self, query: str, full_prompt: str) -> tuple[Any, RetrievedEdit | None]:
        """vLLM input for ``full_prompt``: the text itself on a miss; on a hit the edit in front of it, as RECIPE's
        continuous prompt (prompt embeddings), as its statement in plain text (token ids), or both (embeddings)."""
        if not query.strip():
            return full_prompt, None
        texts = self.injection != "prompt"
        if texts and self.top_k > 1:
            hits = self.tier.lookup_all(query, self.top_k)
        else:
            hits = [h] if (h := self.tier.lookup(query)) is not None else []
        if not hits:
            return full_prompt, None
        hit = hits[0]
        ids = list(self.tokenizer(full_prompt)["input_ids"])
        stated = [h for h in hits if h.statement] if texts else []
        if stated:
            # After any leading special tokens (a BOS stays first), best hit last, next to the query.
            special = set(self.tokenizer.all_special_ids)
            lead = next((i for i, t in enumerate(ids) if t not in special), len(ids))
            prefix = [t for h in reversed(stated) for t in text_prefix_ids(self.tokenizer, h.statement)]
            ids = ids[:lead] + prefix + ids[lead:]
        used = RetrievedEdit(edit_id=hit.edit_id, score=float(hit.score), sentinel_score=float(hit.sentinel_score),
                             also=[h.edit_id for h in stated if h is not hit])
        if self.injection == "text" and stated:
            return {"prompt_token_ids": ids}, used
        embeds = self.tier.prompt_embeds(self.embedding, ids, hit).float().contiguous()
        return {"prompt_embeds": embeds}, used
