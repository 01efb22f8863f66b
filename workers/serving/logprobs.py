"""vLLM's per-token log-probabilities as the replica's neutral ``TokenLogprob`` list (the API shapes them as OpenAI's
completions or chat ``logprobs``, so the replica's answer does not depend on which route asked)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.serving.schemas import TokenLogprob, TopLogprob

FLOOR = -9999.0  # OpenAI's stand-in for -inf (JSON has no infinity); vLLM's server uses the same


def token_logprobs(token_ids: Sequence[int], steps: Sequence[dict[int, Any] | None] | None,
                   tokenizer: Any) -> list[TokenLogprob] | None:
    """One entry per generated token; ``steps[i]`` is vLLM's ``{token_id: Logprob}`` for step i (sampled token
    first, then the top tokens by rank). None when the request asked for no log-probabilities."""
    if steps is None:
        return None

    def text(token_id: int, entry: Any) -> str:
        return entry.decoded_token if entry is not None and entry.decoded_token is not None \
            else tokenizer.decode([token_id])

    out = []
    for token_id, step in zip(token_ids, steps, strict=True):
        step = step or {}
        chosen = step.get(token_id)
        out.append(TokenLogprob(
            token=text(token_id, chosen), token_id=token_id,
            logprob=FLOOR if chosen is None else max(chosen.logprob, FLOOR),
            top=[TopLogprob(token=text(t, e), logprob=max(e.logprob, FLOOR)) for t, e in step.items()],
        ))
    return out
