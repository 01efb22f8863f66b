"""Target values v* for a whole batch in ONE optimisation (MEMIT's compute_z, batched).

Each edit i gets its own offset delta_i added to the residual stream at the last edited layer, at the subject's
last token of each of its prompts. The loss is a *sum* of independent per-edit losses and Adam is elementwise,
so every delta_i follows exactly the trajectory it would alone, while all edits share each forward/backward.
Converged edits are frozen and dropped from later forward passes (per-edit early stopping).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from workers.editing.hooks import add_at_positions
from workers.editing.hparams import EditHParams
from workers.editing.layout import ModelLayout
from workers.editing.prompts import Row
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


def _row_terms(
    model: PreTrainedModel,
    layout: ModelLayout,
    rows: Sequence[Row],
    delta: torch.Tensor,
    layer: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward ``rows`` with delta applied; return per-row NLL (rewrite rows) and per-row log-probs (KL rows)."""
    device = delta.device
    batch = pad_right([r.ids for r in rows], pad_id).to(device)
    n = len(rows)
    row_idx = torch.arange(n, device=device)
    subj = torch.tensor([r.subject_pos for r in rows], device=device)
    edit = torch.tensor([r.edit for r in rows], device=device)
    with add_at_positions(layout.block(model, layer), row_idx, subj, lambda: delta[edit]):
        hidden = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
    head = model.get_output_embeddings()
    nll = torch.zeros(n, device=device)
    rewrite = [i for i, r in enumerate(rows) if r.target_pos]
    if rewrite:
        tok_rows = torch.tensor([i for i in rewrite for _ in rows[i].target_pos], device=device)
        tok_pos = torch.tensor([p for i in rewrite for p in rows[i].target_pos], device=device)
        tok_ids = torch.tensor([t for i in rewrite for t in rows[i].target_ids], device=device)
        logp = torch.log_softmax(head(hidden[tok_rows, tok_pos]).float(), dim=-1)
        tok_nll = -logp.gather(1, tok_ids[:, None]).squeeze(1)
        counts = torch.zeros(n, device=device).index_add_(0, tok_rows, torch.ones_like(tok_nll))
        nll = torch.zeros(n, device=device).index_add(0, tok_rows, tok_nll) / counts.clamp(min=1)
    kl_idx = [i for i, r in enumerate(rows) if not r.target_pos]
    kl_logprobs = None
    if kl_idx:
        idx = torch.tensor(kl_idx, device=device)
        kl_logprobs = torch.log_softmax(head(hidden[idx, subj[idx]]).float(), dim=-1)
    return nll, kl_logprobs


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
        rows = [r for r in (*rewrite, *kl) if keep[r.edit]]
        nll_step = torch.zeros(n_edits, device=device)
        for group in chunks_by_tokens([len(r.ids) for r in rows], hp.v_max_batch_tokens):
            chunk = [rows[i] for i in group]
            nll, kl_logprobs = _row_terms(model, layout, chunk, delta, layer, pad_id)
            edits = torch.tensor([r.edit for r in chunk], device=device)
            is_rw = torch.tensor([bool(r.target_pos) for r in chunk], device=device)
            rw_edits = edits[is_rw]
            per_edit = torch.zeros(n_edits, device=device).index_add(
                0, rw_edits, nll[is_rw] / n_templates[rw_edits]
            )
            nll_step += per_edit.detach()
            if kl_logprobs is not None:
                kl_edits = edits[~is_rw]
                if step == 0:
                    kl_init[kl_edits] = kl_logprobs.detach()
                ref = kl_init[kl_edits]
                kl_term = (kl_logprobs.exp() * (kl_logprobs - ref)).sum(-1)
                per_edit = per_edit.index_add(0, kl_edits, hp.kl_factor * kl_term)
            per_edit.sum().backward()
        # Weight decay on the offset relative to the value's own norm (MEMIT uses ||delta||, not its square);
        # the epsilon keeps the gradient finite at delta = 0.
        decay = hp.v_weight_decay * (delta.pow(2).sum(dim=1) + 1e-12).sqrt() / init_norm_sq
        (decay * active).sum().backward()
        nll_per_edit = torch.where(active, nll_step, nll_per_edit)
        if progress:
            progress("v* optimisation", step + 1, hp.v_num_grad_steps)
        # Stop an edit once its target is reached (NLL below the threshold). MEMIT tests the total loss, but
        # the decay and KL regularisers alone keep that above 5e-2 here, so every edit ran all steps.
        active = active & ~(nll_step < hp.v_early_stop_loss)
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
