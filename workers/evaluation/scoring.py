"""Scoring candidates the way the MEMIT/AlphaEdit evaluation does.

``candidate_nll`` is the mean per-token negative log-likelihood of `` candidate`` after a prompt; CounterFact
metrics compare it between target_new and target_true. ``token_accuracy`` is zsRE's teacher-forced share of target
tokens that are the argmax.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.tokens import chunks_by_tokens, pad_right, target_token_ids


def _span_logp(
    head: torch.nn.Module, hidden: torch.Tensor, group: Sequence[int], spans: Sequence[range],
    targets: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full next-token log-probabilities at every target position of the rows ``group``, the target tokens and
    which batch row each belongs to (all flat, in order)."""
    device = hidden.device
    r_idx = torch.tensor([j for j, i in enumerate(group) for _ in spans[i]], device=device)
    p_idx = torch.tensor([p for i in group for p in spans[i]], device=device)
    t_ids = torch.tensor([t for i in group for t in targets[i]], device=device)
    return torch.log_softmax(head(hidden[r_idx, p_idx]).float(), dim=-1), t_ids, r_idx


def span_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, group: Sequence[int], spans: Sequence[range],
    targets: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced target tokens of the rows ``group`` of a batch: for every target token its log-probability
    and the argmax token at its position, and which batch row it belongs to (all flat, in order)."""
    logp, t_ids, r_idx = _span_logp(head, hidden, group, spans, targets)
    return logp.gather(1, t_ids[:, None]).squeeze(1), logp.argmax(-1), r_idx


def _teacher_forced(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[range], list[list[int]]]:
    """Per pair: the input row (prompt + all answer tokens but the last), the positions predicting the answer tokens,
    and those tokens."""
    rows, spans, targets = [], [], []
    for prompt, candidate in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        cand = target_token_ids(tokenizer, prompt, candidate)
        rows.append(prompt_ids + cand[:-1])
        spans.append(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(cand)))
        targets.append(cand)
    return rows, spans, targets


def _answer_batches(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]],
    max_batch_tokens: int,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher-forced batches of ``pairs``: per batch, the pair indices and ``_span_logp`` of their answer tokens."""
    device = next(model.parameters()).device
    rows, spans, targets = _teacher_forced(tokenizer, pairs)
    head = model.get_output_embeddings()
    for group in chunks_by_tokens([len(r) for r in rows], max_batch_tokens):
        batch = pad_right([rows[i] for i in group], tokenizer.pad_token_id).to(device)
        hidden = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        yield list(group), *_span_logp(head, hidden, group, spans, targets)


def _score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_batch_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: mean target-token NLL and share of target tokens predicted exactly (argmax)."""
    nll = torch.zeros(len(pairs))
    acc = torch.zeros(len(pairs))
    for group, logp, t_ids, r_idx in _answer_batches(model, tokenizer, pairs, max_batch_tokens):
        tok_nll = -logp.gather(1, t_ids[:, None]).squeeze(1)
        hit = (logp.argmax(-1) == t_ids).float()
        counts = torch.zeros(len(group), device=logp.device).index_add_(0, r_idx, torch.ones_like(tok_nll))
        nll[group] = (torch.zeros_like(counts).index_add_(0, r_idx, tok_nll) / counts).cpu()
        acc[group] = (torch.zeros_like(counts).index_add_(0, r_idx, hit) / counts).cpu()
    return nll, acc


@torch.no_grad()
def candidate_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_batch_tokens: int = 8192,
) -> torch.Tensor:
    return _score(model, tokenizer, pairs, max_batch_tokens)[0]


@torch.no_grad()
def token_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_batch_tokens: int = 8192,
) -> torch.Tensor:
    return _score(model, tokenizer, pairs, max_batch_tokens)[1]


@torch.no_grad()
def answer_margins(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_batch_tokens: int = 8192,
) -> torch.Tensor:
    """Per pair: how firmly the model gives the answer, teacher-forced: the least, over its tokens, of the log-prob of
    the answer token minus that of the best other token (> 0 exactly when every answer token is the argmax)."""
    out = torch.zeros(len(pairs))
    for group, logp, t_ids, r_idx in _answer_batches(model, tokenizer, pairs, max_batch_tokens):
        answer = logp.gather(1, t_ids[:, None]).squeeze(1)
        others = logp.scatter(1, t_ids[:, None], float("-inf")).amax(dim=1)
        least = torch.full((len(group),), float("inf"), device=logp.device).scatter_reduce(
            0, r_idx, answer - others, reduce="amin")
        out[group] = least.cpu()
    return out


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_batch_tokens: int = 8192
) -> float:
    """Token-weighted perplexity of ``texts`` (each scored from its first token)."""
    device = next(model.parameters()).device
    rows = [tokenizer(t)["input_ids"] for t in texts]
    rows = [r for r in rows if len(r) > 1]
    total, count = 0.0, 0
    for group in chunks_by_tokens([len(r) for r in rows], max_batch_tokens):
        batch = pad_right([rows[i] for i in group], tokenizer.pad_token_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
        mask = batch.attention_mask[:, 1:].bool()
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return float(torch.exp(torch.tensor(total / max(count, 1))))
