"""Target values v* for a whole batch in ONE optimisation (MEMIT's compute_z, batched).

Each edit i gets its own offset delta_i added to the residual stream at the last edited layer, at the subject's
last token of each of its prompts. The loss is a *sum* of independent per-edit losses and Adam is elementwise,
so every delta_i follows exactly the trajectory it would alone, while all edits share each forward/backward.
Converged edits are frozen and dropped from later forward passes (per-edit early stopping).

Cost levers (each a setting, measured in ``benchmarks/edit_compute.py``):
* ``v_prefix_cache``: layers up to the edited one and positions before the subject are computed once per batch
  (``replay.py``); each step re-runs only the layers above on the positions from the subject on.
* ``v_dtype="bfloat16"``: the steps' forward/backward under bf16 autocast; the offset, Adam and the losses stay
  float32. On CPUs the steps use eager attention then: torch's CPU flash-attention backward is ~10x slower in bf16
  than in float32 (measured), while eager attention's bf16 matmuls are fast.
* ``v_early_stop``: stop an edit when its target NLL is low (``nll``, MEMIT), or as soon as every target token is
  the most probable one in every context (``mpes``, ENCORE's most-probable early stopping) plus a margin.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from workers.editing.hooks import add_at_positions
from workers.editing.hparams import EditHParams
from workers.editing.layout import ModelLayout
from workers.editing.prompts import Row
from workers.editing.replay import CachedRows, encode_rows
from workers.editing.tokens import chunks_by_tokens, pad_right


@dataclass
class ValueResult:
    targets: torch.Tensor  # v* per edit, (B, d)
    deltas: torch.Tensor  # v* - v_init, (B, d)
    nll: torch.Tensor  # final mean target NLL per edit, (B,)
    steps: int

    def cpu(self) -> ValueResult:
        return ValueResult(self.targets.detach().cpu(), self.deltas.detach().cpu(), self.nll.detach().cpu(), self.steps)

    @staticmethod
    def concat(parts: Sequence[ValueResult]) -> ValueResult:
        """Join the results of shards of one batch, in shard order."""
        return ValueResult(
            torch.cat([p.targets for p in parts]), torch.cat([p.deltas for p in parts]),
            torch.cat([p.nll for p in parts]), max(p.steps for p in parts),
        )


@dataclass
class _Terms:
    """Per-row loss terms of one chunk: target NLL and the smallest margin of a target token over the best other
    token (rewrite rows; > 0 means every target token is the argmax), log-probs at the subject (KL rows)."""

    nll: torch.Tensor  # (n,), 0 for KL rows
    margin: torch.Tensor  # (n,) log-prob margin, +inf for KL rows
    kl_logprobs: torch.Tensor | None  # (n_kl, V)


def _terms_from_hidden(
    model: PreTrainedModel, rows: Sequence[Row], hidden: torch.Tensor, offsets: Sequence[int]
) -> _Terms:
    """Loss terms from final hidden states. ``offsets[i]``: how many leading positions of row i are not in
    ``hidden`` (0 for full rows, the cached prefix length for cached rows), so position p is column p - offsets[i]."""
    device = hidden.device
    n = len(rows)
    head = model.get_output_embeddings()
    nll = torch.zeros(n, device=device)
    margin = torch.full((n,), float("inf"), device=device)
    rewrite = [i for i, r in enumerate(rows) if r.target_pos]
    if rewrite:
        tok_rows = torch.tensor([i for i in rewrite for _ in rows[i].target_pos], device=device)
        tok_pos = torch.tensor([p - offsets[i] for i in rewrite for p in rows[i].target_pos], device=device)
        tok_ids = torch.tensor([t for i in rewrite for t in rows[i].target_ids], device=device)
        logp = torch.log_softmax(head(hidden[tok_rows, tok_pos]).float(), dim=-1)
        tok_logp = logp.gather(1, tok_ids[:, None]).squeeze(1)
        counts = torch.zeros(n, device=device).index_add_(0, tok_rows, torch.ones_like(tok_logp))
        nll = torch.zeros(n, device=device).index_add(0, tok_rows, -tok_logp) / counts.clamp(min=1)
        with torch.no_grad():
            others = logp.detach().scatter(1, tok_ids[:, None], float("-inf")).max(dim=1).values
            tok_margin = tok_logp.detach() - others
            margin = margin.scatter_reduce(0, tok_rows, tok_margin, reduce="amin")
    kl_idx = [i for i, r in enumerate(rows) if not r.target_pos]
    kl_logprobs = None
    if kl_idx:
        idx = torch.tensor(kl_idx, device=device)
        pos = torch.tensor([rows[i].subject_pos - offsets[i] for i in kl_idx], device=device)
        kl_logprobs = torch.log_softmax(head(hidden[idx, pos]).float(), dim=-1)
    return _Terms(nll, margin, kl_logprobs)


class _FullRows:
    """Reference path: every step forwards whole rows through the whole model (MEMIT's compute_z)."""

    def __init__(self, model: PreTrainedModel, layout: ModelLayout, rows: Sequence[Row], layer: int, pad_id: int):
        self.model, self.layout, self.rows, self.layer, self.pad_id = model, layout, rows, layer, pad_id

    def cost(self, i: int) -> int:
        return len(self.rows[i].ids)

    def terms(self, idx: Sequence[int], delta: torch.Tensor) -> _Terms:
        device = delta.device
        rows = [self.rows[i] for i in idx]
        batch = pad_right([r.ids for r in rows], self.pad_id).to(device)
        row_idx = torch.arange(len(rows), device=device)
        subj = torch.tensor([r.subject_pos for r in rows], device=device)
        edit = torch.tensor([r.edit for r in rows], device=device)
        with add_at_positions(self.layout.block(self.model, self.layer), row_idx, subj, lambda: delta[edit]):
            hidden = self.model.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        return _terms_from_hidden(self.model, rows, hidden, [0] * len(rows))


class _CachedPrefixRows:
    """Fast path: prefix and lower layers computed once (``replay.encode_rows``), steps re-run the rest."""

    def __init__(
        self, model: PreTrainedModel, layout: ModelLayout, rows: Sequence[Row], layer: int, pad_id: int,
        max_batch_tokens: int, cache_dtype: torch.dtype | None = None,
    ):
        self.model, self.layout, self.rows = model, layout, rows
        split = [r.subject_pos for r in rows]
        self.cached: CachedRows = encode_rows(
            model, layout, [r.ids for r in rows], split, layer, pad_id, max_batch_tokens
        )
        if cache_dtype is not None:
            self.cached.cast_cache(cache_dtype)
        self.suffix = self.cached.suffix_len.tolist()
        self.split = split

    def cost(self, i: int) -> int:
        return self.suffix[i]

    def terms(self, idx: Sequence[int], delta: torch.Tensor) -> _Terms:
        device = delta.device
        rows = [self.rows[i] for i in idx]
        edit = torch.tensor([r.edit for r in rows], device=device)

        def add(hidden: torch.Tensor) -> torch.Tensor:
            # The subject's last token is column 0 of every suffix.
            first = hidden[:, :1] + delta[edit].to(hidden.dtype)[:, None]
            return torch.cat([first, hidden[:, 1:]], dim=1)

        hidden = self.cached.forward(self.model, self.layout, torch.tensor(list(idx), device=device), add)
        return _terms_from_hidden(self.model, rows, hidden, [self.split[i] for i in idx])


def _stopped(hp: EditHParams, nll: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per edit: has its optimisation reached the target (see ``EditHParams.v_early_stop``)?"""
    low_nll = nll < hp.v_early_stop_loss
    if hp.v_early_stop == "nll":
        return low_nll
    confident = margin > hp.v_early_stop_margin
    return confident if hp.v_early_stop == "mpes" else confident | low_nll


def step_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype v* steps run in: ``auto`` takes bf16 only where the hardware has it natively (emulated bf16 on an
    older CPU would be slower than float32)."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or getattr(
        torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


@contextlib.contextmanager
def attention(model: PreTrainedModel, name: str | None) -> Iterator[None]:
    """Run with the model's attention implementation set to ``name`` (None: unchanged), restored after."""
    old = model.config._attn_implementation
    if name is None or name == old:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def compute_target_values(
    model: PreTrainedModel,
    layout: ModelLayout,
    rewrite: Sequence[Row],
    kl: Sequence[Row],
    v_init: torch.Tensor,
    hp: EditHParams,
    pad_id: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> ValueResult:
    """Optimise one delta per edit; ``v_init`` is the plain-prompt block output at layer ``hp.layers[-1]``."""
    device = v_init.device
    n_edits, _ = v_init.shape
    layer = hp.layers[-1]
    all_rows = [*rewrite, *kl]
    low = step_dtype(hp.v_dtype, device) == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if low else contextlib.nullcontext()
    step_attention = "eager" if low and device.type == "cpu" else None
    source = (  # the cache is computed in the model's own precision, once
        _CachedPrefixRows(model, layout, all_rows, layer, pad_id, hp.v_max_batch_tokens,
                          torch.bfloat16 if low else None)
        if hp.v_prefix_cache else _FullRows(model, layout, all_rows, layer, pad_id)
    )
    v_init32 = v_init.to(torch.float32)
    delta = torch.zeros_like(v_init32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    n_templates = torch.zeros(n_edits, device=device).index_add_(
        0, torch.tensor([r.edit for r in rewrite], device=device), torch.ones(len(rewrite), device=device)
    )
    init_norm_sq = v_init32.norm(dim=1) ** 2
    max_norm = hp.clamp_norm_factor * v_init32.norm(dim=1)
    kl_init = torch.zeros(n_edits, model.get_output_embeddings().weight.shape[0], device=device)
    active = torch.ones(n_edits, dtype=torch.bool, device=device)
    nll_per_edit = torch.zeros(n_edits, device=device)
    steps = 0
    for step in range(hp.v_num_grad_steps):
        steps = step + 1
        opt.zero_grad()
        keep = active.tolist()
        live = [i for i, r in enumerate(all_rows) if keep[r.edit]]
        nll_step = torch.zeros(n_edits, device=device)
        margin_step = torch.full((n_edits,), float("inf"), device=device)
        for group in chunks_by_tokens([source.cost(i) for i in live], hp.v_max_batch_tokens):
            idx = [live[g] for g in group]
            chunk = [all_rows[i] for i in idx]
            with autocast, attention(model, step_attention):
                terms = source.terms(idx, delta)
            edits = torch.tensor([r.edit for r in chunk], device=device)
            is_rw = torch.tensor([bool(r.target_pos) for r in chunk], device=device)
            rw_edits = edits[is_rw]
            per_edit = torch.zeros(n_edits, device=device).index_add(
                0, rw_edits, terms.nll[is_rw] / n_templates[rw_edits]
            )
            nll_step += per_edit.detach()
            margin_step = margin_step.scatter_reduce(0, rw_edits, terms.margin[is_rw], reduce="amin")
            if terms.kl_logprobs is not None:
                kl_edits = edits[~is_rw]
                if step == 0:
                    kl_init[kl_edits] = terms.kl_logprobs.detach()
                ref = kl_init[kl_edits]
                kl_term = (terms.kl_logprobs.exp() * (terms.kl_logprobs - ref)).sum(-1)
                per_edit = per_edit.index_add(0, kl_edits, hp.kl_factor * kl_term)
            per_edit.sum().backward()
        # Weight decay on the offset relative to the value's own norm (MEMIT uses ||delta||, not its square);
        # the epsilon keeps the gradient finite at delta = 0.
        decay = hp.v_weight_decay * (delta.pow(2).sum(dim=1) + 1e-12).sqrt() / init_norm_sq
        (decay * active).sum().backward()
        nll_per_edit = torch.where(active, nll_step, nll_per_edit)
        if progress:
            progress("v* optimisation", step + 1, hp.v_num_grad_steps)
        # Stop an edit once its target is reached. MEMIT tests the total loss, but the decay and KL regularisers
        # alone keep that above 5e-2 here, so every edit ran all steps.
        active = active & ~_stopped(hp, nll_step, margin_step)
        if not bool(active.any()) or step == hp.v_num_grad_steps - 1:
            break
        frozen = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[~active] = frozen[~active]
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
    if progress:
        progress("v* optimisation", hp.v_num_grad_steps, hp.v_num_grad_steps)
    final = delta.detach().to(v_init.dtype)
    return ValueResult(targets=v_init + final, deltas=final, nll=nll_per_edit, steps=steps)
