"""The replica's per-token log-probabilities in OpenAI's two shapes, as vLLM's own server writes them: the legacy
completions object (``tokens``, ``token_logprobs``, ``top_logprobs`` as dicts of the sampled token plus the top
``n``, ``text_offset``) and chat's ``content`` list (``token``, ``logprob``, ``bytes``, ``top_logprobs``)."""

from __future__ import annotations

from workers.serving.schemas import TokenLogprob


def completion_logprobs(tokens: list[TokenLogprob] | None, top_n: int | None, offset: int = 0) -> dict | None:
    """``offset``: where the first token's text starts in the choice's text (echoed prompt, earlier stream chunks)."""
    if tokens is None or top_n is None:
        return None
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{c.token: c.logprob for c in t.top[: top_n + 1]} for t in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[TokenLogprob] | None, top_n: int | None) -> dict | None:
    if tokens is None or top_n is None:
        return None

    def as_bytes(text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": as_bytes(t.token),
         "top_logprobs": [{"token": c.token, "logprob": c.logprob, "bytes": as_bytes(c.token)} for c in t.top[:top_n]]}
        for t in tokens
    ]}
