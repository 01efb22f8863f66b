"""Held-out check of the retrieval tier: N edits held only in the tier, the LLM frozen.

* reliability / generality: share of edit / paraphrase prompts where P(target_new) > P(target_true) (mean
  per-token NLL, as in ``workers.evaluation.metrics``) with the tier active: retrieval through the sentinel over all
  N stored edits, the hit's prompt (whichever edit it is) prepended, nothing prepended on a miss.
* locality: share of neighbourhood prompts whose next-token prediction is unchanged vs the unprompted model (a
  sentinel rejection leaves the input byte-identical, so it counts as unchanged).
* specificity: CounterFact's neighbourhood score (P(true) > P(target_new)) with the tier, for comparison with the
  weight editors; ``base_*`` is the same without the tier, ``oracle_*`` with the query's own prompt forced in.
* hit rates: own edit retrieved for edit / paraphrase prompts, sentinel rejects for neighbourhood prompts.
* ``locality_no_collisions``: locality without the neighbourhood prompts that ask another stored edit's own fact.
  CounterFact draws a record's neighbours from subjects with the same relation and true object, so with hundreds of
  edits stored together some neighbour prompts name a stored subject and expect exactly the answer that edit
  replaces ("The twin city of Riga is" -> Kiev while "Riga is a twin city of" Kiev -> Athens is stored): serving the
  edit there is right, and the plain metric counts it as a failure. ``loc_collisions`` counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.schemas import EditRequest
from workers.editing.tokens import chunks_by_tokens, target_token_ids
from workers.evaluation.scoring import span_logprobs
from workers.retrieval.encoder import SentenceEncoder
from workers.retrieval.index import KnowledgeIndex
from workers.retrieval.injection import embed_prompted, text_prefix_ids
from workers.retrieval.modules import RecipeModel
from workers.retrieval.subject_gate import SubjectGate


def statement(edit: EditRequest) -> str:
    """The knowledge statement RECIPE stores for an edit: the prompt followed by the new target."""
    return f"{edit.text} {edit.target_new.strip()}"


def injected_prefixes(
    injection: str, embedding: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, statements: Sequence[str],
    continuous: torch.Tensor,
) -> list[torch.Tensor]:
    """What goes in front of a query that retrieved each entry, as input embeddings: RECIPE's continuous prompt,
    the statement as text (in-context editing), or both (continuous prompt, then the text)."""
    if injection == "prompt":
        return list(continuous)
    out = []
    for text, prompt in zip(statements, continuous, strict=True):
        ids = torch.tensor(text_prefix_ids(tokenizer, text), dtype=torch.long, device=embedding.weight.device)
        embeds = embedding(ids).float()
        out.append(embeds if injection == "text" else torch.cat([prompt.to(embeds), embeds], 0))
    return out


@dataclass
class TierMetrics:
    n_edits: int
    reliability: float
    generality: float
    locality: float
    specificity: float
    rel_hit: float
    gen_hit: float
    loc_reject: float
    base_reliability: float | None = None
    base_generality: float | None = None
    base_specificity: float | None = None
    oracle_reliability: float | None = None
    oracle_generality: float | None = None
    locality_no_collisions: float | None = None
    loc_collisions: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """The metrics plus the names ``editq retrieval eval --json`` promises: ``n``, ``retrieval_accuracy`` (own
        edit retrieved, edit and paraphrase prompts alike) and ``sentinel_rejects`` (neighbours left untouched)."""
        return asdict(self) | {
            "n": self.n_edits,
            "retrieval_accuracy": (self.rel_hit + self.gen_hit) / 2,
            "sentinel_rejects": self.loc_reject,
        }


Item = tuple[str, str, str | None]  # (prompt text, candidate, prompt id or None)


@torch.no_grad()
def score_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    prompts: dict[str, torch.Tensor],
    max_batch_tokens: int = 2048,
) -> tuple[list[float], list[int]]:
    """Per item: mean NLL of `` candidate`` after the text (prompt prepended when given) and the argmax token at
    the position that predicts the candidate's first token (the model's next-token answer)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    rows, spans, targets = [], [], []
    for text, candidate, pid in items:
        ids = tokenizer(text)["input_ids"]
        cand = target_token_ids(tokenizer, text, candidate)
        offset = 0 if pid is None else prompts[pid].shape[0]
        rows.append(ids + cand[:-1])
        spans.append(range(offset + len(ids) - 1, offset + len(ids) - 1 + len(cand)))
        targets.append(cand)
    nll = [0.0] * len(items)
    top = [0] * len(items)
    widths = [len(r) + (0 if it[2] is None else prompts[it[2]].shape[0]) for r, it in zip(rows, items, strict=True)]
    for group in chunks_by_tokens(widths, max_batch_tokens):
        batch = embed_prompted(
            embedding, [rows[i] for i in group], [None if items[i][2] is None else prompts[items[i][2]] for i in group]
        )
        hidden = model.base_model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        tok_logp, argmax, _ = span_logprobs(head, hidden, group, spans, targets)
        tok_nll = (-tok_logp).tolist()
        arg = argmax.tolist()
        k = 0
        for i in group:
            n = len(targets[i])
            nll[i] = sum(tok_nll[k : k + n]) / n
            top[i] = arg[k]
            k += n
    return nll, top


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def colliding_probes(requests: Sequence[EditRequest]) -> set[tuple[str, str]]:
    """(prompt, expected answer) of the neighbourhood probes that ask a stored edit's own fact: the prompt names the
    edit's subject (the subject gate's rule) and expects exactly the true answer that edit replaces."""
    named = SubjectGate()
    for r in requests:
        named.add(str(r.edit_id), r.subject)
    replaced = {str(r.edit_id): str(r.target_true).strip() for r in requests}
    return {
        (p.prompt, p.target)
        for r in requests
        for p in r.neighborhood_prompts
        if any(replaced[e] == p.target.strip() for e in named.candidates(p.prompt))
    }


@torch.no_grad()
def evaluate_tier(
    recipe: RecipeModel,
    encoder: SentenceEncoder,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    diagnostics: bool = True,
    injection: str = "prompt",
    subject_gate: bool = False,
) -> TierMetrics:
    """Store all ``requests`` in an in-memory tier, query it with every edit / paraphrase / neighbourhood prompt;
    ``injection`` is what a hit puts in front of the query (``prompt``, ``text`` or ``hybrid``); ``subject_gate``
    looks each query up only among the edits it names, as a serving replica does with the setting on."""
    recipe.eval()
    for r in requests:
        if r.target_true is None:
            raise ValueError(f"edit {r.edit_id}: the held-out check needs target_true")
    index = KnowledgeIndex(recipe.search_keys(recipe.sentinel_key(encoder)), recipe.scale, recipe.sentinel_offset)
    keys = recipe.knowledge_keys(encoder.features([statement(r) for r in requests]))
    own_prompts = injected_prefixes(
        injection, model.get_input_embeddings(), tokenizer, [statement(r) for r in requests], recipe.prompts(keys)
    )
    prompts: dict[str, torch.Tensor] = {}
    for r, key, prompt in zip(requests, keys, own_prompts, strict=True):
        index.add(str(r.edit_id), recipe.search_keys(key), prompt, subject=r.subject)
        prompts[str(r.edit_id)] = prompt
    queries: list[tuple[str, str, int]] = []  # (kind, text, record index)
    for i, r in enumerate(requests):
        queries.append(("rel", r.text, i))
        queries += [("gen", p, i) for p in r.paraphrase_prompts]
        queries += [("loc", p.prompt, i) for p in r.neighborhood_prompts]
    query_keys = recipe.search_keys(recipe.query_keys(encoder.features([q[1] for q in queries])))
    if subject_gate:
        results = index.search_among(query_keys, [index.candidates(q[1]) for q in queries])
    else:
        results = index.search(query_keys)
    colliding = colliding_probes(requests)
    items: dict[Item, int] = {}

    def need(item: Item) -> Item:
        items.setdefault(item, len(items))
        return item

    plan = []
    for (kind, text, i), res in zip(queries, results, strict=True):
        r = requests[i]
        used = res.edit_id if res.accepted else None
        own = str(r.edit_id)
        if kind == "loc":
            target = next(p.target for p in r.neighborhood_prompts if p.prompt == text)
            cands = (target, r.target_new)
            hit = not res.accepted
        else:
            cands = (r.target_new, str(r.target_true))
            hit = res.accepted and res.edit_id == own
        variants = {"tier": used}
        if diagnostics or kind == "loc":
            variants["base"] = None
        if diagnostics and kind != "loc":
            variants["oracle"] = own
        pairs = {v: (need((text, cands[0], pid)), need((text, cands[1], pid))) for v, pid in variants.items()}
        plan.append((kind, i, hit, pairs))
    order = list(items)
    nll, top = score_items(model, tokenizer, order, prompts)
    nll_of = {it: nll[items[it]] for it in order}
    top_of = {it: top[items[it]] for it in order}
    per: dict[str, dict[int, list[float]]] = {}

    def add(name: str, i: int, value: float) -> None:
        per.setdefault(name, {}).setdefault(i, []).append(value)

    items_text = {it: it[0] for it in order}
    cands_of = {it: it[1] for it in order}
    collisions = 0
    for kind, i, hit, pairs in plan:
        wins = {v: float(nll_of[a] < nll_of[b]) for v, (a, b) in pairs.items()}
        name = {"rel": "reliability", "gen": "generality", "loc": "specificity"}[kind]
        add({"rel": "rel_hit", "gen": "gen_hit", "loc": "loc_reject"}[kind], i, float(hit))
        for variant, win in wins.items():
            add(name if variant == "tier" else f"{variant}_{name}", i, win)
        if kind == "loc":
            unchanged = float(top_of[pairs["tier"][0]] == top_of[pairs["base"][0]])
            add("locality", i, unchanged)
            text, truth = items_text[pairs["tier"][0]], cands_of[pairs["tier"][0]]
            if (text, truth) in colliding:
                collisions += 1
            else:
                add("locality_no_collisions", i, unchanged)

    def metric(name: str) -> float | None:
        if name not in per:
            return None
        return _mean([_mean(v) for v in per[name].values()])

    return TierMetrics(
        n_edits=len(requests),
        reliability=metric("reliability") or 0.0,
        generality=metric("generality") or 0.0,
        locality=metric("locality") or 0.0,
        specificity=metric("specificity") or 0.0,
        rel_hit=metric("rel_hit") or 0.0,
        gen_hit=metric("gen_hit") or 0.0,
        loc_reject=metric("loc_reject") or 0.0,
        base_reliability=metric("base_reliability"),
        base_generality=metric("base_generality"),
        base_specificity=metric("base_specificity"),
        oracle_reliability=metric("oracle_reliability"),
        oracle_generality=metric("oracle_generality"),
        locality_no_collisions=metric("locality_no_collisions"),
        loc_collisions=collisions,
    )
