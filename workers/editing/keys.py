"""Keys k (input of the edited MLP matrix at the subject's last token, averaged over contexts) and the block
output at the last edited layer, read in one forward pass that stops as soon as both are captured."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from workers.editing.hooks import capture, run_until_stopped
from workers.editing.layout import ModelLayout
from workers.editing.prompts import Row
from workers.editing.templates import template_weights
from workers.editing.tokens import chunks_by_tokens, pad_right


@torch.no_grad()
def read_keys_and_output(
    model: PreTrainedModel,
    layout: ModelLayout,
    rows: Sequence[Row],
    n_edits: int,
    n_templates: int,
    key_layers: Sequence[int],
    output_layer: int | None,
    pad_id: int,
    max_batch_tokens: int = 8192,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Template-averaged keys per layer, shape (n_edits, d_in), and the plain-template block output (n_edits, d).

    ``rows`` are ``prompts.key_rows``: every edit under every template.
    """
    device = next(model.parameters()).device
    weights = template_weights(list(range(n_templates))).to(device=device, dtype=torch.float64)
    targets: dict[str, tuple[torch.nn.Module, str]] = {
        f"k{layer}": (layout.mlp_out_module(model, layer), "input") for layer in key_layers
    }
    last = f"k{max(key_layers)}" if key_layers else None
    if output_layer is not None:
        targets["out"] = (layout.block(model, output_layer), "output")
        if not key_layers or output_layer >= max(key_layers):
            last = "out"
    keys = {layer: None for layer in key_layers}
    out = None
    for group in chunks_by_tokens([len(r.ids) for r in rows], max_batch_tokens):
        chunk = [rows[i] for i in group]
        batch = pad_right([r.ids for r in chunk], pad_id).to(device)
        row_idx = torch.arange(len(chunk), device=device)
        pos = torch.tensor([r.subject_pos for r in chunk], device=device)
        edit = torch.tensor([r.edit for r in chunk], device=device)
        w = weights[torch.tensor([r.template for r in chunk], device=device)]
        with capture(targets, stop_after=last) as store:
            run_until_stopped(
                lambda batch=batch: model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                )
            )
        for layer in key_layers:
            k = store[f"k{layer}"][row_idx, pos].to(torch.float64) * w[:, None]
            if keys[layer] is None:
                keys[layer] = torch.zeros(n_edits, k.shape[1], dtype=torch.float64, device=device)
            keys[layer].index_add_(0, edit, k)
        if output_layer is not None:
            plain = torch.tensor([r.template == 0 for r in chunk], device=device)
            h = store["out"][row_idx, pos].to(torch.float64)
            if out is None:
                out = torch.zeros(n_edits, h.shape[1], dtype=torch.float64, device=device)
            out.index_copy_(0, edit[plain], h[plain])
    return keys, out
