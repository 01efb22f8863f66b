"""Context templates: the plain prompt plus short self-generated prefixes, as in MEMIT.

Keys and target values are averaged over these contexts so that an edit holds in more than the literal prompt.
They are sampled once with a fixed seed and stored in the editor state, so a saved state reproduces exactly.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, length: int, seed: int
) -> list[str]:
    """``["{}"]`` followed by ``n`` prefixes of ``length`` sampled tokens ending in ``". {}"``."""
    if n == 0:
        return ["{}"]
    seeds = [PREFIX_SEEDS[i % len(PREFIX_SEEDS)] for i in range(n)]
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer(seeds, return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **batch,
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=tokenizer.pad_token_id,
            )
        finally:
            tokenizer.padding_side = old_side
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    prefixes = [" ".join(t.replace("{", " ").replace("}", " ").split()) for t in texts]
    return ["{}", *[f"{p}. {{}}" for p in prefixes]]


def template_weights(templates: list[str]) -> torch.Tensor:
    """MEMIT's averaging: half weight on the plain prompt, half spread over the prefixed ones."""
    n_prefixed = len(templates) - 1
    if n_prefixed == 0:
        return torch.ones(1)
    return torch.tensor([0.5] + [0.5 / n_prefixed] * n_prefixed)
