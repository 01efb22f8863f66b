"""UltraEdit (Gu et al., arXiv 2505.14679): lifelong editing with no v* optimisation, no key statistics and no
subject location: one forward/backward per batch, then a closed form per edited matrix.

For every position that predicts a target token (teacher forcing), the edited matrix's input k and the gradient g
of the target cross-entropy (summed over tokens, so a token's gradient does not depend on what shares its batch)
with respect to the matrix's output are read in one pass. A lifelong normaliser keeps the running mean and variance
of [k; g] over every batch so far (Chan's parallel update, including this batch); with the standardised (k^, g^)
each position's target change is

    v = -lr * ||k^||^2 * g^

and the update is the ridge least-squares fit of those changes on the raw keys K (n, d_in), V (n, d_out):

    Delta^T = argmin_X ||K X - V||^2 + ridge ||X||^2 = (K^T K + ridge I)^-1 K^T V
            => Delta = V^T (K K^T + ridge I)^-1 K         (push-through identity: an n x n solve, rank <= n)

The reference implementation differs in two details, both kept out on purpose: its variance update adds
n_b * var_b (unbiased) where Chan's update adds (n_b - 1) * var_b, and it averages the cross-entropy over a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from workers.editing.layout import ModelLayout
from workers.editing.prompts import Row
from workers.editing.tokens import chunks_by_tokens, pad_right

_EPS = torch.finfo(torch.float32).eps


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations of feature vectors seen so far (float64)."""

    n: float
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, size: int) -> RunningMoments:
        return cls(0.0, torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Merge a batch of rows ``x`` (m, size) into the moments."""
        x = x.to(torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.n + m
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (m / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.n * m / total)
        self.n = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.n - 1.0, _EPS)).sqrt()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) - self.mean) / (self.std + _EPS)

    def pack(self) -> torch.Tensor:
        """One float64 vector [n, mean, m2] (how it is stored in editor states and version files)."""
        return torch.cat([torch.tensor([self.n], dtype=torch.float64), self.mean, self.m2])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> RunningMoments:
        size = (packed.numel() - 1) // 2
        return cls(float(packed[0]), packed[1 : 1 + size].clone(), packed[1 + size :].clone())


def pseudo_values(keys: torch.Tensor, grads: torch.Tensor, moments: RunningMoments, lr: float) -> torch.Tensor:
    """v = -lr ||k^||^2 g^ per position, from raw keys (n, d_in) and output gradients (n, d_out)."""
    z = moments.normalise(torch.cat([keys, grads], dim=1))
    k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], dim=1)
    return -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat


def ultraedit_update(
    keys: torch.Tensor, values: torch.Tensor, ridge: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys K (n, d_in), target changes V (n, d_out) -> (left, right) with Delta = left @ right^T, (d_out, d_in)."""
    k, v = keys.to(dtype), values.to(dtype)
    gram = k @ k.T + ridge * torch.eye(k.shape[0], dtype=dtype, device=k.device)
    right = torch.linalg.solve(gram, k).T  # (d_in, n) = K^T (K K^T + ridge I)^-1, the Gram matrix is symmetric
    return v.T.contiguous(), right.contiguous()


def layer_update(
    keys: torch.Tensor, grads: torch.Tensor, packed_moments: torch.Tensor | None, lr: float, ridge: float,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One edited matrix's step: merge this batch into the normaliser, then fit. Returns (left, right, the packed
    normaliser after this batch); Delta = left @ right^T."""
    moments = (RunningMoments.unpack(packed_moments) if packed_moments is not None
               else RunningMoments.empty(keys.shape[1] + grads.shape[1]))
    moments.update(torch.cat([keys, grads], dim=1))
    left, right = ultraedit_update(keys, pseudo_values(keys, grads, moments, lr), ridge, dtype)
    return left, right, moments.pack()


def keys_and_output_grads(
    model: PreTrainedModel,
    layout: ModelLayout,
    rows: Sequence[Row],
    layers: Sequence[int],
    pad_id: int,
    max_batch_tokens: int = 8192,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the edited matrix's inputs (n, d_in) and the gradients of the summed target cross-entropy w.r.t.
    its outputs (n, d_out), at every position that predicts a target token of ``rows``."""
    parts = [
        _chunk_keys_and_grads(model, layout, [rows[i] for i in group], layers, pad_id)
        for group in chunks_by_tokens([len(r.ids) for r in rows], max_batch_tokens)
    ]
    return {
        layer: (torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts])) for layer in layers
    }


def _chunk_keys_and_grads(
    model: PreTrainedModel, layout: ModelLayout, rows: Sequence[Row], layers: Sequence[int], pad_id: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    device = next(model.parameters()).device
    batch = pad_right([r.ids for r in rows], pad_id).to(device)
    tok_rows = torch.tensor([i for i, r in enumerate(rows) for _ in r.target_pos], device=device)
    tok_pos = torch.tensor([p for r in rows for p in r.target_pos], device=device)
    tok_ids = torch.tensor([t for r in rows for t in r.target_ids], device=device)
    keys: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(layer: int, args: tuple, output: torch.Tensor) -> torch.Tensor:
        keys[layer] = args[0][tok_rows, tok_pos].detach().float()
        if not output.requires_grad:  # the lowest edited matrix: nothing below it needs a gradient
            output = output.detach().requires_grad_(True)
        output.retain_grad()
        outputs[layer] = output
        return output

    handles = [
        layout.mlp_out_module(model, layer).register_forward_hook(
            lambda _m, args, output, layer=layer: hook(layer, args, output)
        )
        for layer in layers
    ]
    try:
        with torch.enable_grad():
            hidden = model.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
            logp = torch.log_softmax(model.get_output_embeddings()(hidden[tok_rows, tok_pos]).float(), dim=-1)
            (-logp.gather(1, tok_ids[:, None]).sum()).backward()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer in layers:
        grad = outputs[layer].grad
        if grad is None:
            raise RuntimeError(f"no gradient reached the edited matrix of layer {layer}")
        out[layer] = (keys[layer], grad[tok_rows, tok_pos].float())
    return out
