"""Keys k (input of the edited MLP matrix at the subject's last token, averaged over contexts) and the block
output at the last edited layer.

``KeyReader`` reads them layer by layer, bottom to top, as the editor updates each layer in turn. Between two reads
only the layer just read (and updated) changed, so each read resumes from the residual stream cached at the previous
read's layer (``replay.bypass_blocks``) and re-runs only from there, stopping as soon as everything is captured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from workers.editing.hooks import capture, run_until_stopped
from workers.editing.layout import ModelLayout
from workers.editing.prompts import Row
from workers.editing.replay import bypass_blocks
from workers.editing.templates import template_weights
from workers.editing.tokens import PaddedBatch, chunks_by_tokens, pad_right


class KeyReader:
    """Template-averaged keys (n_edits, d_in) and plain-template block outputs (n_edits, d) of ``rows`` (every edit
    under every template, ``prompts.key_rows``), read in non-decreasing layer order.

    The caller promises that between two reads it changes no layer below the previously read one.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layout: ModelLayout,
        rows: Sequence[Row],
        n_edits: int,
        n_templates: int,
        pad_id: int,
        max_batch_tokens: int = 8192,
        resume: bool = True,
    ) -> None:
        self.model, self.layout, self.rows, self.n_edits = model, layout, rows, n_edits
        self.resume = resume  # False: every read starts from the embeddings (the old cost, for benchmarks)
        self.device = next(model.parameters()).device
        self.weights = template_weights(list(range(n_templates))).to(device=self.device, dtype=torch.float64)
        self.chunks = chunks_by_tokens([len(r.ids) for r in rows], max_batch_tokens)
        self.batches: list[PaddedBatch] = [pad_right([rows[i].ids for i in c], pad_id) for c in self.chunks]
        self.resume_at = 0  # block whose input is cached (0: nothing cached, start from the embeddings)
        self.cached: list[torch.Tensor | None] = [None] * len(self.chunks)
        self.forwarded_blocks = 0  # blocks x chunks actually run (tests and benchmarks read it)

    @torch.no_grad()
    def read(self, key_layer: int | None, output_layer: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys at ``key_layer`` and the block output at ``output_layer`` (either may be None)."""
        layers = [x for x in (key_layer, output_layer) if x is not None]
        if not layers:
            raise ValueError("nothing to read")
        if key_layer is not None and key_layer < self.resume_at:
            raise ValueError(f"keys of layer {key_layer} read after layer {self.resume_at}: reads go bottom to top")
        model, layout, device = self.model, self.layout, self.device
        targets: dict[str, tuple[torch.nn.Module, str]] = {}
        if key_layer is not None:
            targets["k"] = (layout.mlp_out_module(model, key_layer), "input")
            if key_layer > 0:  # the residual stream entering it: where the next read resumes
                targets["h"] = (layout.block(model, key_layer - 1), "output")
        if output_layer is not None:
            targets["out"] = (layout.block(model, output_layer), "output")
        last = "out" if key_layer is None or (output_layer is not None and output_layer >= key_layer) else "k"
        keys = out = None
        for c, (chunk, batch) in enumerate(zip(self.chunks, self.batches, strict=True)):
            rows = [self.rows[i] for i in chunk]
            gpu_batch = batch.to(device)
            row_idx = torch.arange(len(rows), device=device)
            pos = torch.tensor([r.subject_pos for r in rows], device=device)
            edit = torch.tensor([r.edit for r in rows], device=device)
            cached = self.cached[c]
            with capture(targets, stop_after=last) as store:
                run = lambda b=gpu_batch: model(  # noqa: E731
                    input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
                )
                if self.resume and self.resume_at > 0 and cached is not None:
                    with bypass_blocks(layout, model, self.resume_at - 1, lambda h=cached: h):
                        run_until_stopped(run)
                else:
                    run_until_stopped(run)
            self.forwarded_blocks += max(layers) + 1 - (self.resume_at if self.resume and cached is not None else 0)
            if key_layer is not None:
                w = self.weights[torch.tensor([r.template for r in rows], device=device)]
                k = store["k"][row_idx, pos].to(torch.float64) * w[:, None]
                if keys is None:
                    keys = torch.zeros(self.n_edits, k.shape[1], dtype=torch.float64, device=device)
                keys.index_add_(0, edit, k)
                self.cached[c] = store.get("h")
            if output_layer is not None:
                plain = torch.tensor([r.template == 0 for r in rows], device=device)
                h = store["out"][row_idx, pos].to(torch.float64)
                if out is None:
                    out = torch.zeros(self.n_edits, h.shape[1], dtype=torch.float64, device=device)
                out.index_copy_(0, edit[plain], h[plain])
        if key_layer is not None:
            self.resume_at = key_layer
        return keys, out


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
    """Keys of several layers (one ``KeyReader`` pass per layer) and the output at ``output_layer``."""
    reader = KeyReader(model, layout, rows, n_edits, n_templates, pad_id, max_batch_tokens)
    keys: dict[int, torch.Tensor] = {}
    out = None
    for i, layer in enumerate(sorted(key_layers)):
        keys[layer], got = reader.read(layer, output_layer if i == len(key_layers) - 1 else None)
        out = got if got is not None else out
    if not key_layers:
        _, out = reader.read(None, output_layer)
    return keys, out
