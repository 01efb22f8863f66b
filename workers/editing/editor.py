"""The sequential editor: one call applies one batch of edits with MEMIT or AlphaEdit, in place.

Per batch: target values v* for all edits (one batched optimisation), then bottom-to-top over the edited layers:
keys on the partially edited model, residual spread over the remaining layers, closed-form update. The keys of
the applied batch are then re-read on the edited model and accumulated so later batches preserve them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.schemas import EditRequest
from workers.editing.alphaedit import NullSpace, alphaedit_update, null_space_projector
from workers.editing.hparams import EditHParams
from workers.editing.keys import read_keys_and_output
from workers.editing.layout import ModelLayout
from workers.editing.memit import memit_update
from workers.editing.prompts import key_rows, kl_rows, rewrite_rows
from workers.editing.state import EditorState, tensor_sha256
from workers.editing.stats import Progress, SecondMomentCache
from workers.editing.templates import generate_context_templates
from workers.editing.values import compute_target_values


@dataclass
class LayerDelta:
    """Update of one matrix as low-rank factors: Delta = left @ right^T, (d_out, r) and (d_in, r)."""

    layer: int
    name: str
    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.T


@dataclass
class BatchResult:
    edit_ids: list[str]
    deltas: list[LayerDelta]
    targets: torch.Tensor  # v* per edit at the last edited layer, (n, d)
    v_nll: list[float]  # final target NLL of the v* optimisation per edit
    v_steps: int
    seconds: dict[str, float] = field(default_factory=dict)  # keys / values / solve


class Editor:
    """Holds the model at its current edited version plus the state needed to keep editing it."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        hparams: EditHParams,
        stats: SecondMomentCache,
        model_fingerprint: str = "unknown",
        state: EditorState | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layout = ModelLayout.from_model(model)
        self.stats = stats
        self.progress = progress
        self.device = next(model.parameters()).device
        if state is None:
            templates = generate_context_templates(
                model, tokenizer, hparams.n_context_templates, hparams.context_template_tokens, hparams.seed
            )
            weights = {layer: self.layout.get_weight(model, layer) for layer in hparams.layers}
            state = EditorState(
                hparams=hparams,
                model_fingerprint=model_fingerprint,
                templates=templates,
                base_sha256={layer: tensor_sha256(w) for layer, w in weights.items()},
                weights={layer: w.cpu() for layer, w in weights.items()},
            )
        else:
            self._check_compatible(state, hparams, model_fingerprint)
            for layer, weight in state.weights.items():
                self.layout.set_weight(model, layer, weight)
        self.state = state
        self._mom2: dict[int, torch.Tensor] | None = None
        self._null: dict[int, NullSpace] = {}

    @property
    def hparams(self) -> EditHParams:
        return self.state.hparams

    @staticmethod
    def _check_compatible(state: EditorState, hparams: EditHParams, fingerprint: str) -> None:
        if state.model_fingerprint != fingerprint:
            raise ValueError(
                f"editor state was made for model {state.model_fingerprint}, not {fingerprint}"
            )
        if tuple(state.hparams.layers) != tuple(hparams.layers) or state.hparams.algo != hparams.algo:
            raise ValueError("editor state was made with other layers/algorithm than requested")

    def prepare(self) -> None:
        """Load (or compute once) the second moments and, for AlphaEdit, the null-space projectors."""
        if self._mom2 is None:
            mom2 = self.stats.get(
                self.model, self.tokenizer, self.layout, self.hparams.layers,
                max_len=self.hparams.stats_max_len, progress=self.progress,
            )
            dtype = getattr(torch, self.hparams.solve_dtype)
            self._mom2 = {layer: c.to(self.device, dtype) for layer, c in mom2.items()}
        if self.hparams.algo == "alphaedit" and not self._null:
            self._null = {
                layer: null_space_projector(c, self.hparams.nullspace_energy) for layer, c in self._mom2.items()
            }

    def null_space(self, layer: int) -> NullSpace:
        self.prepare()
        return self._null[layer]

    def _timed(self, seconds: dict[str, float], key: str, fn: Callable[[], object]) -> object:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        return out

    def apply(self, requests: Sequence[EditRequest]) -> BatchResult:
        """Edit the model in place with one batch; returns the per-layer updates and a timing split."""
        if not requests:
            raise ValueError("empty batch")
        self.prepare()
        hp, layout, model, tok = self.hparams, self.layout, self.model, self.tokenizer
        templates = self.state.templates
        pad = tok.pad_token_id
        n = len(requests)
        seconds: dict[str, float] = {}

        def read(layers: Sequence[int], out_layer: int | None) -> tuple[dict, torch.Tensor | None]:
            return read_keys_and_output(
                model, layout, krows, n, len(templates), layers, out_layer, pad, hp.v_max_batch_tokens
            )

        krows = key_rows(tok, requests, templates)
        _, v_init = self._timed(seconds, "keys", lambda: read([], hp.layers[-1]))
        values = self._timed(
            seconds, "values",
            lambda: compute_target_values(
                model, layout, rewrite_rows(tok, requests, templates), kl_rows(tok, requests), v_init, hp, pad,
                self.progress,
            ),
        )
        dtype = getattr(torch, hp.solve_dtype)
        deltas: list[LayerDelta] = []
        for i, layer in enumerate(hp.layers):
            keys, cur = self._timed(seconds, "keys", lambda layer=layer: read([layer], hp.layers[-1]))
            residual = (values.targets - cur).T / (len(hp.layers) - i)  # (d_out, n)
            k = keys[layer].T  # (d_in, n)
            start = time.perf_counter()
            prev = self.state.prev_keys_cov.get(layer)
            prev = prev.to(self.device, dtype) if prev is not None else None
            if hp.algo == "memit":
                left, right = memit_update(residual, k, self._mom2[layer], hp.mom2_update_weight, prev, dtype)
            else:
                left, right = alphaedit_update(residual, k, self._null[layer].projector, hp.l2, prev, dtype)
            layout.add_to_weight(model, layer, left @ right.T)
            seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - start
            deltas.append(LayerDelta(layer, layout.weight_name(layer), left.float().cpu(), right.float().cpu()))
        keys_after, _ = self._timed(seconds, "keys", lambda: read(hp.layers, None))
        for layer in hp.layers:
            k = keys_after[layer].T.to(dtype)
            cov = (k @ k.T).cpu()
            prev = self.state.prev_keys_cov.get(layer)
            self.state.prev_keys_cov[layer] = cov if prev is None else prev + cov
            self.state.weights[layer] = layout.get_weight(model, layer).cpu()
        ids = [r.edit_id or r.content_key() for r in requests]
        self.state.edit_ids.extend(ids)
        self.state.n_batches += 1
        return BatchResult(ids, deltas, values.targets.cpu(), values.nll.tolist(), values.steps, seconds)
