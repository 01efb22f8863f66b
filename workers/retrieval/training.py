"""Training RECIPE's heads on CounterFact with the frozen LLM and encoder (``editq retrieval train``).

Losses, all weight 1 as in the paper (``__train_a_batch__`` of qizhou000/RECIPE):

* contrastive q->k: an edit or paraphrase query must pick its own knowledge among the batch's knowledge + sentinel;
* contrastive q->sentinel: with its own knowledge removed, the query must prefer the sentinel (hinge 1.2);
* contrastive loc->sentinel: a neighbourhood query must prefer the sentinel over all knowledge (hinge 1.2);
* reliability / generality: NLL of target_new after the edit / paraphrase prompt with the edit's continuous prompt
  prepended (the paper's hinge: tokens whose p(label) >= 1.2 x the runner-up stop contributing);
* locality: KL(unprompted || prompted) on the neighbourhood answer tokens, with the edit's prompt prepended.

``injection="hybrid"`` trains the prompt head for what a hit serves by default: the continuous prompt, then the
statement as text (``text_prefix_ids``), then the query, so the prompt learns to complement the text instead of
standing alone (locality rows: see ``_rows_for``). ``init_from`` starts from a trained checkpoint (its
standardisation and sentinel calibration are kept), so such a fine-tune costs a few hundred steps, not a full run.

One change for CPU budgets: the encoder is frozen, so its features are computed once (cached in the work dir) and
the contrastive terms run on a large batch (default 256) at almost no cost, while the LLM terms, which dominate the
cost, run on a small batch of other edits each step. The paper uses one batch of 8 for both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

from shared.schemas import EditRequest
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.tokens import chunks_by_tokens, target_token_ids
from workers.model_io import load_model, model_fingerprint
from workers.retrieval.encoder import SentenceEncoder
from workers.retrieval.evaluation import evaluate_tier, statement
from workers.retrieval.injection import embed_prompted, text_prefix_ids
from workers.retrieval.modules import RecipeConfig, RecipeModel

Progress = Callable[[str, int, int], None]
Log = Callable[[dict[str, Any]], None]
EPS = 1e-8


class TrainSettings(BaseModel):
    """Everything that defines a training run (validated at the CLI boundary, recorded in the output JSON)."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    work_dir: Path
    model_path: Path
    encoder_path: Path
    limit: int | None = Field(default=None, ge=1, description="Use only the first N training records.")
    steps: int = Field(default=300, ge=1)
    edit_batch: int = Field(default=8, ge=1, description="Edits per step through the LLM (rel + gen + loc).")
    contrastive_batch: int = Field(default=256, ge=2, description="Records per step for the contrastive terms.")
    lr: float = Field(default=5e-3, gt=0, description="Adam lr of MLP_P (cosine decay to 10%).")
    retriever_lr: float = Field(default=1e-4, gt=0, description="Adam lr of MLP_K, MLP_Q, the sentinel and scale.")
    warmup_steps: int = Field(default=20, ge=0)
    rep_dim: int = Field(default=512, ge=8)
    prompt_tokens: int = Field(default=3, ge=1)
    sentinel_tokens: int = Field(default=10, ge=1)
    pooling: Literal["mean", "mean_max_min"] = "mean_max_min"
    edit_hinge_scale: float | None = Field(default=1.2, description="None: plain NLL on every target token.")
    contrastive_hinge_scale: float = 1.2
    llm_dtype: Literal["float32", "bfloat16"] = "float32"
    max_batch_tokens: int = Field(default=512, ge=16)
    save_every: int = Field(default=20, ge=1)
    val_limits: list[int] = Field(default_factory=lambda: [100])
    seed: int = 0
    resume: bool = False
    injection: Literal["prompt", "hybrid"] = Field(
        default="prompt", description="What a hit puts in front of the query during training (see module doc)."
    )
    init_from: Path | None = Field(default=None, description="Start from this checkpoint instead of from scratch.")


@dataclass
class TrainData:
    """Text per record (one paraphrase and one neighbourhood probe each) and their cached encoder features."""

    requests: list[EditRequest]
    features: dict[str, torch.Tensor]  # stmt / rel / gen / loc -> [N, F]

    @property
    def size(self) -> int:
        return len(self.requests)


def _texts(requests: list[EditRequest]) -> dict[str, list[str]]:
    return {
        "stmt": [statement(r) for r in requests],
        "rel": [r.text for r in requests],
        "gen": [r.paraphrase_prompts[0] for r in requests],
        "loc": [r.neighborhood_prompts[0].prompt for r in requests],
    }


def prepare_data(settings: TrainSettings, encoder: SentenceEncoder, progress: Progress | None = None) -> TrainData:
    """Load the records that have a paraphrase and a neighbourhood probe; encode them once (cached)."""
    requests = [
        r
        for r in load_edits(settings.data, limit=settings.limit).requests
        if r.paraphrase_prompts and r.neighborhood_prompts
    ]
    texts = _texts(requests)
    digest = hashlib.sha256(
        json.dumps([encoder.fingerprint, encoder.pooling, texts["stmt"], texts["gen"], texts["loc"]]).encode()
    ).hexdigest()[:16]
    cache = settings.work_dir / f"features-{digest}.pt"
    if cache.is_file():
        return TrainData(requests, torch.load(cache))
    features: dict[str, torch.Tensor] = {}
    for name, items in texts.items():
        report = None if progress is None else (lambda d, t, n=name: progress(f"encode {n}", d, t))
        features[name] = encoder.features(items, progress=report)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    torch.save(features, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)
    return TrainData(requests, features)


def contrastive_losses(
    recipe: RecipeModel, sentinel: torch.Tensor, feats: dict[str, torch.Tensor], hinge: float
) -> dict[str, torch.Tensor]:
    """The paper's three InfoNCE-style terms on one batch of precomputed features (rel and gen both used)."""
    keys = recipe.knowledge_keys(feats["stmt"])
    n = keys.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=keys.device)
    q_rg = recipe.query_keys(torch.cat([feats["rel"], feats["gen"]], 0))
    own = torch.arange(n, device=keys.device).repeat(2)
    sim = torch.cat([recipe.similarity(q_rg, keys), recipe.sentinel_similarity(q_rg, sentinel)[:, None]], 1)
    q_to_k = F.cross_entropy(sim, own)
    # Own knowledge replaced by the sentinel: the sentinel must beat every other item.
    others = sim[:, :n].masked_fill(eye.repeat(2, 1), float("-inf"))
    logits = torch.cat([others, sim[:, n:]], 1)
    q_to_s = _hinged_nll(logits.log_softmax(1), hinge)
    q_loc = recipe.query_keys(feats["loc"])
    loc_sim = torch.cat([recipe.similarity(q_loc, keys), recipe.sentinel_similarity(q_loc, sentinel)[:, None]], 1)
    loc_to_s = _hinged_nll(loc_sim.log_softmax(1), hinge)
    return {"q_to_k": q_to_k, "q_to_sentinel": q_to_s, "loc_to_sentinel": loc_to_s}


def _hinged_nll(logp: torch.Tensor, hinge: float) -> torch.Tensor:
    """-log p(sentinel) (last column) for rows where it does not yet beat the runner-up by ``hinge``, averaged
    over all rows. The reference code averages over the active rows only, which gives the last few violators
    the weight of a whole batch; with the contrastive terms alone that pushed the sentinel above many
    paraphrases' own knowledge (paraphrase hit rate on 100 val edits 0.68 vs 0.94 with this mean, neighbour
    rejection 1.0 in both)."""
    target = logp[:, -1]
    runner_up = logp.topk(2, dim=1).values[:, 1]
    active = target < runner_up + math.log(hinge)
    return -(target * active).sum() / target.shape[0]


def _label_loss(logp: torch.Tensor, labels: torch.Tensor, hinge: float | None) -> torch.Tensor:
    """Mean NLL of the labels; with ``hinge``, only tokens whose p(label) < hinge x runner-up count (paper)."""
    picked = logp.gather(1, labels[:, None]).squeeze(1)
    if hinge is None:
        return -picked.mean()
    runner_up = logp.topk(2, dim=1).values[:, 1]
    active = picked < runner_up + math.log(hinge)
    return -(picked[active]).sum() / active.sum().clamp_min(1)


@dataclass
class _Row:
    kind: str  # rel / gen / loc / ref
    ids: list[int]
    targets: list[int]
    edit: int  # index into the step's prompt batch; -1 for the unprompted reference


def _rows_for(tokenizer: Any, requests: list[EditRequest], injection: str = "prompt", step: int = 0) -> list[_Row]:
    """Four rows per edit. With ``hybrid`` the edit and paraphrase rows carry the statement text in front, as served;
    the locality row keeps the continuous prompt alone, so its KL term holds the part the head controls (the text's
    own pull on a neighbour would dominate it, ~2 nats, and train the prompt to cancel the statement). The
    paraphrase rotates with ``step`` so every paraphrase of a record is trained on over the epochs."""
    rows: list[_Row] = []
    for j, r in enumerate(requests):
        probe = r.neighborhood_prompts[0]
        prefix = text_prefix_ids(tokenizer, statement(r)) if injection == "hybrid" else []
        for kind, text, target, edit in (
            ("rel", r.text, r.target_new, j),
            ("gen", r.paraphrase_prompts[step % len(r.paraphrase_prompts)], r.target_new, j),
            ("loc", probe.prompt, probe.target, j),
            ("ref", probe.prompt, probe.target, -1),
        ):
            ids = tokenizer(text)["input_ids"]
            cand = target_token_ids(tokenizer, text, target)
            rows.append(_Row(kind, (prefix if kind in ("rel", "gen") else []) + ids + cand[:-1], cand, edit))
    return rows


def edit_losses(
    recipe: RecipeModel,
    model: Any,
    tokenizer: Any,
    requests: list[EditRequest],
    keys: torch.Tensor,
    settings: TrainSettings,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """Reliability / generality NLL and locality KL for one batch of edits, through the frozen LLM."""
    prompts = recipe.prompts(keys)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = _rows_for(tokenizer, requests, settings.injection, step)
    p = settings.prompt_tokens
    widths = [len(r.ids) + (0 if r.kind == "ref" else p) for r in rows]
    logps: dict[int, torch.Tensor] = {}
    for group in chunks_by_tokens(widths, settings.max_batch_tokens):
        ref = [i for i in group if rows[i].kind == "ref"]
        live = [i for i in group if rows[i].kind != "ref"]
        for part, grad in ((ref, False), (live, True)):
            if not part:
                continue
            with torch.set_grad_enabled(grad):
                batch = embed_prompted(
                    embedding,
                    [rows[i].ids for i in part],
                    [None if rows[i].edit < 0 else prompts[rows[i].edit] for i in part],
                )
                hidden = model.base_model(
                    inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=False
                ).last_hidden_state
                for j, i in enumerate(part):
                    start = batch.offsets[j] + len(rows[i].ids) - len(rows[i].targets)
                    pos = torch.arange(start, start + len(rows[i].targets), device=hidden.device)
                    logps[i] = torch.log_softmax(head(hidden[j, pos]).float(), dim=-1)
    losses: dict[str, torch.Tensor] = {}
    for kind in ("rel", "gen"):
        idx = [i for i, r in enumerate(rows) if r.kind == kind]
        labels = torch.tensor([t for i in idx for t in rows[i].targets], device=prompts.device)
        losses[kind] = _label_loss(torch.cat([logps[i] for i in idx]), labels, settings.edit_hinge_scale)
    loc = [i for i, r in enumerate(rows) if r.kind == "loc"]
    post = torch.cat([logps[i] for i in loc])
    pre = torch.cat([logps[i + 1] for i in loc])  # the "ref" row follows its "loc" row
    losses["loc_kl"] = (pre.exp() * (pre - post)).sum(-1).mean()
    return losses


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    done = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def _batch(step: int, size: int, n: int, seed: int) -> list[int]:
    """Deterministic epoch-wise shuffling from (seed, step), so a resumed run draws the same batches."""
    per_epoch = max(1, n // size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * size : (k + 1) * size].tolist()


def _save_state(path: Path, recipe: RecipeModel, opt: torch.optim.Optimizer, step: int, seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"recipe": recipe.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds}, tmp)
    tmp.replace(path)


def train(settings: TrainSettings, progress: Progress | None = None, log: Log | None = None) -> dict[str, Any]:
    """Train, export the checkpoint and its JSON record to ``settings.out``, return the record."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    encoder = SentenceEncoder(settings.encoder_path, pooling=settings.pooling)
    data = prepare_data(settings, encoder, progress)
    feature_seconds = time.perf_counter() - t0
    dtype = torch.bfloat16 if settings.llm_dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model(settings.model_path, device="cpu", dtype=dtype)
    config = RecipeConfig(
        llm_hidden=model.get_input_embeddings().weight.shape[1],
        feature_dim=encoder.feature_dim,
        encoder_hidden=encoder.hidden_size,
        pooling=settings.pooling,
        rep_dim=settings.rep_dim,
        prompt_tokens=settings.prompt_tokens,
        sentinel_tokens=settings.sentinel_tokens,
    )
    if settings.init_from is not None:
        recipe, _ = RecipeModel.load(settings.init_from)
        if recipe.config != config:
            raise ValueError(f"{settings.init_from} was trained with {recipe.config}, this run asks for {config}")
    else:
        recipe = RecipeModel(config)
        recipe.fit_standardisation(torch.cat(list(data.features.values()), 0))
        recipe.set_embed_rms(model.get_input_embeddings().weight)
        recipe.calibrate_sentinel(encoder, {k: v[:2000] for k, v in data.features.items()})
    prompt_params = list(recipe.prompt_head.parameters())
    retriever_params = [p for n, p in recipe.named_parameters() if not n.startswith("prompt_head.")]
    opt = torch.optim.Adam(
        [
            {"params": prompt_params, "lr": settings.lr, "base_lr": settings.lr},
            {"params": retriever_params, "lr": settings.retriever_lr, "base_lr": settings.retriever_lr},
        ]
    )
    state_path = settings.work_dir / "train_state.pt"
    start, seconds = 0, 0.0
    if settings.resume and state_path.is_file():
        state = torch.load(state_path)
        recipe.load_state_dict(state["recipe"])
        opt.load_state_dict(state["opt"])
        start, seconds = int(state["step"]), float(state["seconds"])
    log_path = settings.work_dir / "train_log.jsonl"
    if start == 0:
        log_path.unlink(missing_ok=True)
    recipe.train()
    for step in range(start, settings.steps):
        tick = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(step, settings)
        c_idx = _batch(step, settings.contrastive_batch, data.size, settings.seed)
        e_idx = _batch(step, settings.edit_batch, data.size, settings.seed + 1)
        sentinel = recipe.sentinel_key(encoder)
        losses = contrastive_losses(
            recipe, sentinel, {k: v[c_idx] for k, v in data.features.items()}, settings.contrastive_hinge_scale
        )
        keys = recipe.knowledge_keys(data.features["stmt"][e_idx])
        losses |= edit_losses(recipe, model, tokenizer, [data.requests[i] for i in e_idx], keys, settings, step)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        seconds += time.perf_counter() - tick
        record = {"step": step + 1, "loss": float(total), **{k: round(float(v), 4) for k, v in losses.items()}}
        record["seconds"] = round(seconds, 1)
        if log is not None:
            log(record)
        with log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if progress is not None:
            progress("train", step + 1, settings.steps)
        if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
            _save_state(state_path, recipe, opt, step + 1, seconds)
    recipe.eval()
    if dtype != torch.float32:  # the held-out check runs the LLM as the tests and the HF path do
        model, tokenizer = load_model(settings.model_path, device="cpu", dtype=torch.float32)
    return finish(settings, recipe, encoder, model, tokenizer, data.size, seconds, feature_seconds, progress)


def finish(
    settings: TrainSettings,
    recipe: RecipeModel,
    encoder: SentenceEncoder,
    model: Any,
    tokenizer: Any,
    n_train: int,
    seconds: float,
    feature_seconds: float,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export the checkpoint, run the held-out val check on the bundled records, write the JSON record."""
    meta = {
        "encoder_fingerprint": encoder.fingerprint,
        "model_fingerprint": model_fingerprint(settings.model_path),
        "model_name": settings.model_path.name,
    }
    recipe.save(settings.out, meta)
    val_records = load_edits(bundled_counterfact_path()).requests
    val: dict[str, Any] = {}
    for n in settings.val_limits:
        if progress is not None:
            progress("val", 0, len(settings.val_limits))
        tick = time.perf_counter()
        metrics = evaluate_tier(
            recipe, encoder, model, tokenizer, val_records[:n], injection=settings.injection
        ).as_dict()
        metrics["seconds"] = round(time.perf_counter() - tick, 1)
        val[str(n)] = metrics
    record = {
        "checkpoint": settings.out.name,
        "bytes": settings.out.stat().st_size,
        "model": meta["model_name"],
        "model_fingerprint": meta["model_fingerprint"],
        "encoder_fingerprint": meta["encoder_fingerprint"],
        "data": {"path": settings.data.name, "records_used": n_train, "limit": settings.limit},
        "train_seconds": round(seconds, 1),
        "feature_seconds": round(feature_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "settings": json.loads(
            settings.model_dump_json(exclude={"data", "out", "work_dir", "model_path", "encoder_path", "init_from"})
        ),
        "init_from": None if settings.init_from is None else settings.init_from.name,
        "val": {"data": bundled_counterfact_path().name, "injection": settings.injection, **val},
    }
    settings.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
