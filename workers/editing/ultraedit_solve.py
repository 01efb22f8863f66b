"""UltraEdit's per-batch solve inside the editor (the math is in ``ultraedit.py``): keys and output gradients of every
edited layer in one pass on the unedited batch, the lifelong normaliser updated, then each layer's ridge fit written
(guarded), bottom to top."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from shared.schemas import EditRequest
from workers.editing.prompts import rewrite_rows
from workers.editing.results import Solved
from workers.editing.ultraedit import keys_and_output_grads, layer_update

if TYPE_CHECKING:
    from workers.editing.editor import Editor


def solve_ultraedit(editor: Editor, requests: Sequence[EditRequest], seconds: dict[str, float]) -> Solved:
    """UltraEdit: keys and output gradients of every edited layer in one pass on the unedited batch, the
    lifelong normaliser updated, then each layer's ridge fit written (guarded)."""
    hp, layout, model = editor.hparams, editor.layout, editor.model
    dtype = getattr(torch, hp.solve_dtype)
    templates = editor.state.templates if hp.ultra_templates else ["{}"]
    rows = rewrite_rows(editor.tokenizer, requests, templates)
    read = editor.timed(seconds, "keys", lambda: keys_and_output_grads(
        model, layout, rows, hp.layers, editor.tokenizer.pad_token_id, hp.v_max_batch_tokens))
    out = Solved(ids=[r.edit_id or r.content_key() for r in requests])
    for layer in hp.layers:
        start = time.perf_counter()
        keys, grads = read[layer]
        left, right, out.moments[layer] = layer_update(
            keys.cpu(), grads.cpu(), editor.state.moments.get(layer), hp.ultra_lr, hp.ultra_ridge, dtype
        )
        delta = editor.guarded(layer, left.to(editor.device), right.to(editor.device), out)
        layout.set_weight(model, layer, delta.apply(editor.state.weights[layer]))
        seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - start
        out.deltas.append(delta)
    return out
