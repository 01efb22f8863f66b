"""General-ability measures of an edited model, finer than canary perplexity and 48 control facts.

* **KL to the base model and top-1 agreement** on >= 20k tokens of mixed text (``general_text.jsonl.gz``: the
  held-out prose plus prose, chat and lists SmolLM2 sampled from itself, see ``build_general_assets.py``). Storing
  the base model's full next-token distribution is too big (49k floats per position), so ``BaseReference`` keeps
  its top-k log-probabilities per position plus the remaining tail mass as one bucket. ``kl_and_agreement``
  returns the mean KL(base || edited) over that (top-k + tail) coarsening: a LOWER BOUND of the true KL (the
  coarsening is a fixed function of the token, so by the data-processing inequality it can only lose divergence),
  and the share of positions whose edited argmax is the base argmax. Both are ~0 / 1 for an untouched model and
  move long before perplexity does, because they compare the whole distribution rather than the observed token.
* **Fact retention** on 620 CounterFact facts the base model completes greedily (``retention_facts.json``,
  1.0 for the base model by construction, some prompts extended by the model's own words before the answer, see
  ``build_general_assets.py``; a fact whose subject was edited, or whose prompt names it, is dropped).
* **Fluency**: ROME's weighted bi/tri-gram entropy of greedy generations on fixed prompts; repetition loops (a
  classic symptom of collapse) drive it down.
* **Perplexity** on the canary prose (``workers.evaluation.collapse.canary_perplexity``).

Costs on the 2-core CPU machine, SmolLM2-135M, float32, measured while another job shared the two cores (load ~4,
so read them as upper bounds; uncontended runs were ~2-3x faster on the same kind of work):

* full (``FULL``: 32,138 KL positions, 620 facts, 16 prompts x 48 new tokens): ~280 s in total (KL ~70 s,
  retention ~16 s, fluency ~40 s, perplexity ~12 s, plus contention); the base reference (~70 s) is computed once
  per model and probe, then loaded from the cache (~5 MB).
* cheap (``CHEAP``: 4,096 positions, 256 facts, 8 prompts x 32 new tokens): ~100 s (its own reference ~38 s,
  once; a prefix of the full reference also serves it via ``max_tokens``).

The module is pure torch/transformers (no Ray, Redis or vLLM) so the pipeline, the CLI and tests share it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.tokens import chunks_by_tokens, pad_right
from workers.evaluation.fluency import FLUENCY_PROMPTS, fluency, greedy_generations, n_gram_entropy
from workers.evaluation.scoring import token_accuracy

GENERAL_TEXT = Path(__file__).with_name("general_text.jsonl.gz")
RETENTION_FACTS = Path(__file__).with_name("retention_facts.json")
DEFAULT_TOP_K = 32
MAX_ROW_TOKENS = 512

# ---- KL to the base model and top-1 agreement ---------------------------------------------------------------


@dataclass(frozen=True)
class GeneralProbe:
    """Token rows of the mixed text; every position but a row's last is a scored next-token prediction.

    ``probe_id`` hashes the token ids, so a reference computed for other text or another tokenizer never matches.
    """

    rows: tuple[tuple[int, ...], ...]
    kinds: tuple[str, ...]

    @property
    def n_positions(self) -> int:
        return sum(len(r) - 1 for r in self.rows)

    @property
    def probe_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.rows).encode())
        return f"p{self.n_positions}-{digest.hexdigest()[:12]}"

    def truncated(self, max_tokens: int | None) -> GeneralProbe:
        """The first ``max_tokens`` positions (a prefix: its reference is a prefix of this probe's reference)."""
        if max_tokens is None or max_tokens >= self.n_positions:
            return self
        rows, kinds, left = [], [], max_tokens
        for row, kind in zip(self.rows, self.kinds, strict=True):
            if left <= 0:
                break
            keep = row[: left + 1]
            rows.append(keep)
            kinds.append(kind)
            left -= len(keep) - 1
        return GeneralProbe(tuple(rows), tuple(kinds))

    @classmethod
    def from_texts(
        cls, tokenizer: PreTrainedTokenizerBase, texts: Iterable[tuple[str, str]], max_tokens: int | None = None,
        max_row_tokens: int = MAX_ROW_TOKENS,
    ) -> GeneralProbe:
        """``texts`` are (kind, text) pairs; rows longer than ``max_row_tokens`` are cut (bounded attention cost)."""
        rows, kinds = [], []
        for kind, text in texts:
            ids = tuple(tokenizer(text)["input_ids"][:max_row_tokens])
            if len(ids) > 1:
                rows.append(ids)
                kinds.append(kind)
        return cls(tuple(rows), tuple(kinds)).truncated(max_tokens)

    @classmethod
    def from_asset(
        cls, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = None, path: Path = GENERAL_TEXT
    ) -> GeneralProbe:
        """The shipped mixed text; records are interleaved by kind so any prefix (``max_tokens``) stays mixed."""
        return cls.from_texts(tokenizer, ((r["kind"], r["text"]) for r in load_general_text(path)), max_tokens)


def load_general_text(path: Path = GENERAL_TEXT) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass(frozen=True)
class BaseReference:
    """The base model's top-k next-token log-probabilities per probe position and the log of the rest's mass."""

    probe_id: str
    topk_ids: torch.Tensor  # [N, k] int64
    topk_logp: torch.Tensor  # [N, k] float32
    tail_logp: torch.Tensor  # [N] float32, log(1 - sum(exp(topk_logp)))

    @property
    def n_positions(self) -> int:
        return int(self.topk_ids.shape[0])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tensors = {"topk_ids": self.topk_ids.to(torch.int32).contiguous(), "topk_logp": self.topk_logp.contiguous(),
                   "tail_logp": self.tail_logp.contiguous()}
        save_file(tensors, str(tmp), metadata={"probe_id": self.probe_id})
        tmp.replace(path)  # readers never see a half-written file

    @classmethod
    def load(cls, path: Path) -> BaseReference:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            probe_id = (handle.metadata() or {})["probe_id"]
        t = load_file(str(path))
        return cls(probe_id, t["topk_ids"].long(), t["topk_logp"], t["tail_logp"])


def _position_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: GeneralProbe, max_batch_tokens: int,
    head_chunk: int = 1024,
) -> Iterable[tuple[int, torch.Tensor]]:
    """(first position index, log-softmax over the vocabulary [n, V]) for chunks of probe positions, in order.

    The LM head runs only on scored positions and in chunks, so memory stays at ``head_chunk`` x vocabulary."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    offsets, total = [], 0
    for row in probe.rows:
        offsets.append(total)
        total += len(row) - 1
    for group in chunks_by_tokens([len(r) for r in probe.rows], max_batch_tokens):
        batch = pad_right([probe.rows[i] for i in group], pad).to(device)
        hidden = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        for j, i in enumerate(group):
            states = hidden[j, : len(probe.rows[i]) - 1]
            for start in range(0, states.shape[0], head_chunk):
                logits = head(states[start : start + head_chunk]).float()
                yield offsets[i] + start, torch.log_softmax(logits, dim=-1).cpu()


@torch.no_grad()
def compute_base_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: GeneralProbe, k: int = DEFAULT_TOP_K,
    max_batch_tokens: int = 4096,
) -> BaseReference:
    """Run the BASE (unedited) model over the probe once and keep its top-k log-probs and tail mass."""
    n = probe.n_positions
    k = min(k, model.get_output_embeddings().weight.shape[0])
    ids = torch.zeros(n, k, dtype=torch.long)
    logp = torch.zeros(n, k)
    tail = torch.zeros(n)
    for start, lp in _position_logprobs(model, tokenizer, probe, max_batch_tokens):
        top = lp.topk(k, dim=-1)
        stop = start + lp.shape[0]
        ids[start:stop], logp[start:stop] = top.indices, top.values
        tail[start:stop] = _tail_logp(lp, top.indices)
    return BaseReference(probe.probe_id, ids, logp, tail)


def _tail_logp(logp: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``topk_ids`` (exact logsumexp, not log(1 - sum), which cancels)."""
    return logp.scatter(1, topk_ids, float("-inf")).logsumexp(dim=-1)


def reference_path(cache_dir: Path, fingerprint: str, probe: GeneralProbe, k: int = DEFAULT_TOP_K) -> Path:
    return Path(cache_dir) / fingerprint / f"{probe.probe_id}-top{k}.safetensors"


def load_or_compute_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: GeneralProbe, cache_dir: Path,
    fingerprint: str, k: int = DEFAULT_TOP_K,
) -> BaseReference:
    """The cached reference for (model fingerprint, probe), else computed now from ``model``, which must then be
    the unedited base model (call this before the first edit)."""
    path = reference_path(cache_dir, fingerprint, probe, k)
    if path.is_file():
        return BaseReference.load(path)
    reference = compute_base_reference(model, tokenizer, probe, k)
    reference.save(path)
    return reference


@torch.no_grad()
def kl_and_agreement(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: GeneralProbe, reference: BaseReference,
    max_tokens: int | None = None, max_batch_tokens: int = 4096,
) -> tuple[float, float]:
    """(mean KL(base || model) over the top-k + tail coarsening in nats, top-1 agreement) on the probe's first
    ``max_tokens`` positions.

    The KL is a LOWER BOUND of the true per-position KL (data-processing inequality: merging the non-top-k tokens
    into one bucket cannot increase divergence). Agreement is the share of positions whose argmax is the base's.
    """
    if reference.probe_id != probe.probe_id:
        raise ValueError(f"reference is for probe {reference.probe_id}, not {probe.probe_id}")
    probe = probe.truncated(max_tokens)
    kl_sum, agree, n = 0.0, 0, 0
    for start, lq in _position_logprobs(model, tokenizer, probe, max_batch_tokens):
        stop = start + lq.shape[0]
        ids = reference.topk_ids[start:stop]
        kl = coarse_kl(reference.topk_logp[start:stop], reference.tail_logp[start:stop], lq.gather(1, ids),
                       _tail_logp(lq, ids))
        kl_sum += float(kl.sum())
        agree += int((lq.argmax(-1) == ids[:, 0]).sum())
        n += lq.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    return kl_sum / n, agree / n


def coarse_kl(lp: torch.Tensor, lp_tail: torch.Tensor, lq: torch.Tensor, lq_tail: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) of the (k + 1)-cell distributions given as log-probs; 0 * log 0 counts as 0."""
    cells_p = torch.cat([lp, lp_tail[:, None]], dim=1)
    cells_q = torch.cat([lq, lq_tail[:, None]], dim=1)
    p = cells_p.exp()
    terms = torch.where(p > 0, p * (cells_p - cells_q), torch.zeros_like(p))
    return terms.sum(dim=1).clamp_min(0.0)


# ---- fact retention -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionFact:
    prompt: str
    answer: str
    subject: str | None = None


def load_retention_facts(model_name: str | None = None, path: Path = RETENTION_FACTS) -> list[RetentionFact]:
    """The shipped facts (in a fixed random order, so a prefix is a uniform subset), or none when they were
    checked on another model than ``model_name`` (a directory name)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if model_name is not None and model_name != data.get("model"):
        return []
    return [RetentionFact(f["prompt"], f["answer"], f.get("subject")) for f in data["facts"]]


def subject_pattern(subjects: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``subjects`` as a whole word, case-sensitive (longest first)."""
    names = sorted({s for s in subjects if s}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, names)) + r")(?!\w)")


def without_subjects(facts: Sequence[RetentionFact], subjects: Iterable[str]) -> list[RetentionFact]:
    """Facts about none of ``subjects``: neither the fact's subject nor a whole-word mention in its prompt (a
    neighbourhood prompt carries no subject field but may name an edited one)."""
    names = set(subjects)
    pattern = subject_pattern(names)
    if pattern is None:
        return list(facts)
    return [f for f in facts if f.subject not in names and not pattern.search(f.prompt)]


def fact_retention(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[RetentionFact],
    exclude_subjects: Iterable[str] = (),
) -> float:
    """Share of facts (minus those about ``exclude_subjects``) whose whole answer is still the greedy
    continuation (teacher-forced argmax on every answer token, as ``control_fact_accuracy``); nan if none left."""
    kept = without_subjects(facts, exclude_subjects)
    if not kept:
        return float("nan")
    acc = token_accuracy(model, tokenizer, [(f.prompt, f.answer) for f in kept])
    return float((acc >= 1.0).float().mean())


# ---- all together -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneralBudget:
    """How much of each probe to use: ``FULL`` for evaluation, ``CHEAP`` per weight version."""

    max_tokens: int | None = None
    max_facts: int | None = None
    n_prompts: int = len(FLUENCY_PROMPTS)
    max_new_tokens: int = 48


FULL = GeneralBudget()
CHEAP = GeneralBudget(max_tokens=4096, max_facts=256, n_prompts=8, max_new_tokens=32)


@dataclass(frozen=True)
class GeneralHealth:
    kl: float
    top1_agreement: float
    retention: float
    ppl: float
    fluency: float


def general_health(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: GeneralProbe, reference: BaseReference,
    facts: Sequence[RetentionFact], exclude_subjects: Iterable[str] = (), budget: GeneralBudget = FULL,
    prompts: Sequence[str] = FLUENCY_PROMPTS, texts: Sequence[str] | None = None,
) -> GeneralHealth:
    """All general measures under ``budget``; ``texts`` overrides the canary prose of the perplexity."""
    from workers.evaluation.collapse import canary_perplexity  # collapse imports runner, which imports us

    kl, agreement = kl_and_agreement(model, tokenizer, probe, reference, budget.max_tokens)
    kept = without_subjects(facts, exclude_subjects)
    if budget.max_facts is not None:
        kept = kept[: budget.max_facts]
    return GeneralHealth(
        kl=kl,
        top1_agreement=agreement,
        retention=fact_retention(model, tokenizer, kept),
        ppl=canary_perplexity(model, tokenizer, texts),
        fluency=fluency(model, tokenizer, prompts[: budget.n_prompts], budget.max_new_tokens),
    )


__all__ = ["FLUENCY_PROMPTS", "fluency", "greedy_generations", "n_gram_entropy"]  # re-exported: one import site
