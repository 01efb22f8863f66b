"""Resume a forward pass at a layer from cached hidden states, with every position before a split point cached.

v* (``values.py``) changes the residual stream only at the output of the last edited layer L, at the subject's last
token. So at every optimisation step the layers up to L, and every position before the subject in every layer, give
exactly what they gave at step 0. ``encode_rows`` runs each row once (no grad) and keeps the block-L output from the
subject on, plus the key/value cache of the positions before it; ``CachedRows.forward`` then runs only layers above L
on only the positions from the subject on, attending to the cached prefix. Per step this is a fraction of a full
forward and backward (about (layers above L) / layers x (positions from the subject on) / positions).

Model-agnostic: the blocks up to L are bypassed by giving them a pass-through ``forward`` for the duration of the
call, and the prefix is fed through the model's own cache, mask and position handling (``past_key_values``, a 2-D
attention mask, explicit ``position_ids``), so every family whose forward takes those works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from workers.editing.hooks import capture
from workers.editing.layout import ModelLayout
from workers.editing.tokens import chunks_by_tokens, pad_right


@contextmanager
def bypass_blocks(
    layout: ModelLayout, model: nn.Module, last: int, output: Callable[[], torch.Tensor], as_tuple: bool = False
) -> Iterator[None]:
    """Blocks ``0..last`` do no work: the lower ones pass their input through, block ``last`` returns ``output()``.

    Set as an instance attribute, so the class's ``forward`` (and any instance wrapper already present, e.g. an
    offloading hook) is restored exactly on exit.
    """
    blocks = [layout.block(model, i) for i in range(last + 1)]
    saved = [block.__dict__.get("forward") for block in blocks]

    def wrap(hidden: torch.Tensor) -> torch.Tensor | tuple:
        return (hidden,) if as_tuple else hidden

    def passthrough(hidden_states: torch.Tensor, *_args: object, **_kwargs: object) -> torch.Tensor | tuple:
        return wrap(hidden_states)

    def replay(*_args: object, **_kwargs: object) -> torch.Tensor | tuple:
        return wrap(output())

    for block in blocks[:-1]:
        block.forward = passthrough
    blocks[-1].forward = replay
    try:
        yield
    finally:
        for block, old in zip(blocks, saved, strict=True):
            if old is None:
                del block.forward
            else:
                block.forward = old


@dataclass
class CachedRows:
    """Rows split at a position each: what lies before it cached, what lies from it on kept for re-running.

    Prefix keys/values are left-padded to a common length (so the rows of any subset can take the last columns),
    suffixes right-padded. Tensors stay on the model's device.
    """

    layer: int  # the block whose output is replayed
    split: torch.Tensor  # (N,) prefix length of each row = index of its first re-run position
    suffix_len: torch.Tensor  # (N,)
    suffix_ids: torch.Tensor  # (N, S) right-padded
    hidden: torch.Tensor  # (N, S, d) block ``layer`` output at the suffix positions, right-padded
    keys: list[torch.Tensor]  # per layer above ``layer``: (N, H, P, D), left-padded
    values: list[torch.Tensor]
    heads: tuple[int, int]  # (H, D) of the cache, for the placeholder entries of the bypassed layers
    as_tuple: bool  # whether the model's blocks return tuples

    def cast_cache(self, dtype: torch.dtype) -> None:
        """Hold the prefix cache in ``dtype`` (e.g. bf16 when the steps run under bf16 autocast)."""
        self.keys = [k.to(dtype) for k in self.keys]
        self.values = [v.to(dtype) for v in self.values]

    def forward(
        self,
        model: PreTrainedModel,
        layout: ModelLayout,
        rows: torch.Tensor,
        add: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Final hidden states (after the model's last norm) of the suffixes of ``rows``, shape (n, S_rows, d).

        ``add(hidden)`` turns the cached block output of these rows into the one to continue from (e.g. adds a
        trainable offset at column 0); autograd flows through it.
        """
        prefix = int(self.split[rows].max())
        width = int(self.suffix_len[rows].max())
        n = rows.numel()
        device = self.hidden.device
        cache = DynamicCache(config=model.config)
        heads, dim = self.heads
        dtype = self.keys[0].dtype if self.keys else self.hidden.dtype
        placeholder = torch.zeros((), dtype=dtype, device=device).expand(n, heads, prefix, dim)
        for i in range(layout.num_layers):
            j = i - self.layer - 1
            if j < 0:  # bypassed layers never read their cache; it only has to report the prefix length
                cache.update(placeholder, placeholder, i)
            else:
                cache.update(self.keys[j][rows, :, self.keys[j].shape[2] - prefix :],
                             self.values[j][rows, :, self.values[j].shape[2] - prefix :], i)
        cols = torch.arange(max(prefix, width), device=device)
        prefix_mask = cols[None, :prefix] >= (prefix - self.split[rows])[:, None]
        suffix_mask = cols[None, :width] < self.suffix_len[rows][:, None]
        mask = torch.cat([prefix_mask, suffix_mask], dim=1).long()
        positions = self.split[rows][:, None] + cols[None, :width]
        start = self.hidden[rows, :width]
        with bypass_blocks(layout, model, self.layer, lambda: add(start), self.as_tuple):
            out = model.base_model(
                input_ids=self.suffix_ids[rows, :width], attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True,
            )
        return out.last_hidden_state


@torch.no_grad()
def encode_rows(
    model: PreTrainedModel,
    layout: ModelLayout,
    rows: Sequence[Sequence[int]],
    split: Sequence[int],
    layer: int,
    pad_id: int,
    max_batch_tokens: int = 8192,
) -> CachedRows:
    """One no-grad forward of every row: block ``layer``'s output from ``split`` on, and the prefix cache above it."""
    device = next(model.parameters()).device
    n = len(rows)
    n_above = layout.num_layers - layer - 1
    prefix_max = max(split)
    suffix_len = [len(r) - s for r, s in zip(rows, split, strict=True)]
    if min(suffix_len) < 1:
        raise ValueError("every row needs at least one position at or after its split")
    width = max(suffix_len)
    hidden: torch.Tensor | None = None
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    suffix_ids = torch.full((n, width), pad_id, dtype=torch.long)
    for i, (row, s) in enumerate(zip(rows, split, strict=True)):
        suffix_ids[i, : len(row) - s] = torch.tensor(row[s:], dtype=torch.long)
    as_tuple = False
    heads = (0, 0)
    for group in chunks_by_tokens([len(r) for r in rows], max_batch_tokens):
        batch = pad_right([rows[i] for i in group], pad_id).to(device)
        block = layout.block(model, layer)
        seen: dict[str, bool] = {}

        def note(_m: nn.Module, _a: tuple, output: object, seen: dict[str, bool] = seen) -> None:
            seen["tuple"] = isinstance(output, tuple)

        handle = block.register_forward_hook(note)
        try:
            with capture({"h": (block, "output")}) as store:
                out = model.base_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True
                )
        finally:
            handle.remove()
        as_tuple = seen.get("tuple", False)
        h = store["h"]
        cache = out.past_key_values
        if hidden is None:
            hidden = torch.zeros(n, width, h.shape[-1], dtype=h.dtype, device=device)
        for k, i in enumerate(group):
            hidden[i, : suffix_len[i]] = h[k, split[i] : len(rows[i])]
        for j in range(n_above):
            layer_cache = cache.layers[layer + 1 + j]
            k_all, v_all = layer_cache.keys, layer_cache.values
            if len(keys) <= j:
                shape = (n, k_all.shape[1], prefix_max, k_all.shape[3])
                keys.append(torch.zeros(shape, dtype=k_all.dtype, device=device))
                values.append(torch.zeros(shape, dtype=v_all.dtype, device=device))
            for k, i in enumerate(group):
                s = split[i]
                if s:
                    keys[j][i, :, prefix_max - s :] = k_all[k, :, :s]
                    values[j][i, :, prefix_max - s :] = v_all[k, :, :s]
        first = cache.layers[0].keys
        heads = (first.shape[1], first.shape[3])
    assert hidden is not None
    return CachedRows(
        layer=layer, split=torch.tensor(list(split), device=device), suffix_len=torch.tensor(suffix_len, device=device),
        suffix_ids=suffix_ids.to(device), hidden=hidden, keys=keys, values=values, heads=heads, as_tuple=as_tuple,
    )
