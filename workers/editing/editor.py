"""The sequential editor: one call applies one batch of edits with MEMIT, AlphaEdit(-hybrid) or AlphaEdit+, in place.

Per batch: target values v* for all edits (one batched optimisation), then bottom-to-top over the edited layers:
keys on the partially edited model, residual spread over the remaining layers, closed-form update, then the
optional collapse guard (REVIVE filter, PRUNE restraint) before the update is written, so later layers see the
guarded model. A guarded batch whose own edits no longer take is rejected (``GuardRejection``) and the model is
restored exactly. The keys of the applied batch are then re-read on the edited model and accumulated so later
batches preserve them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.delta import MatrixDelta, tensor_sha256
from shared.schemas import EditRequest
from workers.editing.alphaedit import NullSpace, alphaedit_update, null_space_projector
from workers.editing.alphaedit_plus import alphaedit_plus_update
from workers.editing.hparams import NULL_SPACE_ALGOS, V_STAR_ALGOS, EditHParams
from workers.editing.hybrid import hybrid_update
from workers.editing.keys import KeyReader
from workers.editing.layout import ModelLayout
from workers.editing.memit import memit_update
from workers.editing.prompts import key_rows, kl_rows, rewrite_rows
from workers.editing.results import COMPACTED_AUX, BatchResult, Solved, plus_settings
from workers.editing.state import EditorState
from workers.editing.stats import Progress, SecondMomentCache
from workers.editing.templates import generate_context_templates
from workers.editing.ultraedit_solve import solve_ultraedit
from workers.editing.values import ValueResult, compute_target_values
from workers.guards.policy import SpectralGuard, check_batch, edit_success
from workers.guards.revive import Spectrum, load_spectrum, spectrum_cached


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
        templates: list[str] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layout = ModelLayout.from_model(model)
        self.stats = stats
        self.progress = progress
        self.device = next(model.parameters()).device
        # Pretrained matrices for the guards: the model's own when it is still at base, else the spectrum cache.
        self._base: dict[int, torch.Tensor] = {}
        if state is None:
            if templates is None:  # sampled once; workers that must agree pass the same list instead
                templates = generate_context_templates(
                    model, tokenizer, hparams.n_context_templates, hparams.context_template_tokens, hparams.seed
                )
            weights = {layer: self.layout.get_weight(model, layer).float() for layer in hparams.layers}
            self._base = {layer: w.detach().cpu().clone() for layer, w in weights.items()}
            state = EditorState(
                hparams=hparams,
                model_fingerprint=model_fingerprint,
                templates=templates,
                base_sha256={layer: tensor_sha256(w) for layer, w in weights.items()},
                weights={layer: w.cpu() for layer, w in weights.items()},
            )
        else:
            self._check_compatible(state, hparams, model_fingerprint)
            for layer in state.weights:
                current = self.layout.get_weight(model, layer).float().cpu()
                if tensor_sha256(current) == state.base_sha256.get(layer):
                    self._base[layer] = current.clone()
            for layer, weight in state.weights.items():
                self.layout.set_weight(model, layer, weight)
        self.state = state
        self._mom2: dict[int, torch.Tensor] | None = None
        self._null: dict[int, NullSpace] = {}
        self.guard: SpectralGuard | None = None
        self._spectra: dict[int, Spectrum] = {}

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
        """Load (or compute once) the second moments, the null-space projectors and the guard's spectra."""
        if self._mom2 is None and self.hparams.algo in V_STAR_ALGOS:
            mom2 = self.stats.get(
                self.model, self.tokenizer, self.layout, self.hparams.layers,
                max_len=self.hparams.stats_max_len, progress=self.progress,
            )
            dtype = getattr(torch, self.hparams.solve_dtype)
            self._mom2 = {layer: c.to(self.device, dtype) for layer, c in mom2.items()}
        hp = self.hparams
        if hp.algo in NULL_SPACE_ALGOS and not self._null:
            keep = hp.algo == "alphaedit_plus" and hp.aplus_search_eps is not None
            self._null = {
                layer: null_space_projector(c, hp.nullspace_energy, keep_preserved=keep)
                for layer, c in self._mom2.items()
            }
        if SpectralGuard.active(hp) and self.guard is None:
            self.guard = self._build_guard()

    def _build_guard(self) -> SpectralGuard:
        return SpectralGuard(self.hparams, self.base_weights(), self.base_spectra(), self.device)

    def base_weights(self) -> dict[int, torch.Tensor]:
        """Pretrained matrices (float32, CPU): kept from construction, else rebuilt from the spectrum cache."""
        for layer in self.hparams.layers:
            if layer not in self._base:  # resumed from a saved state on an edited model
                spectrum = load_spectrum(self._spectra_dir, self.state.base_sha256[layer])
                if spectrum is None:
                    raise RuntimeError(
                        f"the pretrained matrix of layer {layer} is unknown: load the editor on the base model, "
                        f"or keep its spectrum cache in {self._spectra_dir}"
                    )
                self._base[layer] = spectrum.weight().float()
        return self._base

    def base_spectra(self) -> dict[int, Spectrum]:
        """SVD of each pretrained matrix, cached on disk by checksum (guards and collapse metrics share it)."""
        if not self._spectra:
            base = self.base_weights()
            self._spectra = {
                layer: spectrum_cached(base[layer], self._spectra_dir, self.state.base_sha256.get(layer))
                for layer in self.hparams.layers
            }
        return self._spectra

    @property
    def _spectra_dir(self) -> Path:
        return self.stats.dir.parent / "spectra"

    def null_space(self, layer: int) -> NullSpace:
        self.prepare()
        return self._null[layer]

    def timed(self, seconds: dict[str, float], key: str, fn: Callable[[], object]) -> object:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        return out

    def reader(self, requests: Sequence[EditRequest]) -> KeyReader:
        """Reads this batch's keys bottom to top, resuming each read where the previous one left off."""
        rows = key_rows(self.tokenizer, requests, self.state.templates)
        return KeyReader(
            self.model, self.layout, rows, len(requests), len(self.state.templates), self.tokenizer.pad_token_id,
            self.hparams.v_max_batch_tokens, self.hparams.keys_resume,
        )

    def value_tokens(self, requests: Sequence[EditRequest]) -> int:
        """Tokens the v* optimisation of ``requests`` forwards and back-propagates each step (its memory driver)."""
        tok, templates = self.tokenizer, self.state.templates
        return sum(len(r.ids) for r in (*rewrite_rows(tok, requests, templates), *kl_rows(tok, requests)))

    def compute_values(
        self, requests: Sequence[EditRequest], seconds: dict[str, float] | None = None
    ) -> ValueResult:
        """v* for ``requests`` on the model as it is now (tensors on the CPU).

        Edits are independent in this optimisation, so a batch can be sharded across workers holding the same
        version and the shards' targets concatenated: the result equals one unsharded call (tested).
        """
        if not requests:
            raise ValueError("empty batch")
        if self.hparams.algo not in V_STAR_ALGOS:
            raise ValueError(f"{self.hparams.algo} computes no target values")
        seconds = {} if seconds is None else seconds
        reader = self.reader(requests)
        _, v_init = self.timed(seconds, "keys", lambda: reader.read(None, self.hparams.layers[-1]))
        return self._values(requests, v_init, seconds)

    def _values(self, requests: Sequence[EditRequest], v_init: torch.Tensor, seconds: dict[str, float]) -> ValueResult:
        tok, hp = self.tokenizer, self.hparams
        values = self.timed(
            seconds, "values",
            lambda: compute_target_values(
                self.model, self.layout, rewrite_rows(tok, requests, self.state.templates), kl_rows(tok, requests),
                v_init, hp, tok.pad_token_id, self.progress,
            ),
        )
        return values.cpu()

    def apply(
        self, requests: Sequence[EditRequest], values: ValueResult | None = None,
        accept: Callable[[PreTrainedModel], None] | None = None,
    ) -> BatchResult:
        """Edit the model in place with one batch; returns the per-layer updates and a timing split.

        ``values`` are precomputed v* (e.g. sharded across workers); without them they are computed here.
        ``accept`` sees the candidate model before the batch is kept and may refuse it by raising (the health
        budget). On any error the model and state are left exactly as before the call.
        """
        if not requests:
            raise ValueError("empty batch")
        self.prepare()
        seconds: dict[str, float] = {}
        hp = self.hparams
        try:
            if hp.algo in V_STAR_ALGOS:
                reader = self.reader(requests)
                # Keys of the first layer and the last layer's output before any update (= v_init of v*), one read.
                first = self.timed(seconds, "keys", lambda: reader.read(hp.layers[0], hp.layers[-1]))
                if values is None:
                    values = self._values(requests, first[1], seconds)
                if values.targets.shape[0] != len(requests):
                    raise ValueError(f"{values.targets.shape[0]} targets for {len(requests)} edits")
                solved = self.solve_layers(requests, values.targets.to(self.device), seconds, reader, first)
            else:
                solved = solve_ultraedit(self, requests, seconds)
            if self.guard is not None:
                scores = self.timed(seconds, "guard", lambda: edit_success(self.model, self.tokenizer, requests))
                solved.efficacy = float(scores.mean())
                solved.per_edit_success = scores.tolist()
                check_batch(scores, hp, solved.ids, solved.filtered_energy)
            if accept is not None:
                self.timed(seconds, "accept", lambda: accept(self.model))
        except BaseException:
            self.reset_weights()
            raise
        for delta, layer in zip(solved.deltas, self.hparams.layers, strict=True):
            self.state.weights[layer] = delta.apply(self.state.weights[layer])
        self.accumulate_keys(solved.keys_after)
        self.state.moments.update(solved.moments)
        self.state.edit_ids.extend(solved.ids)
        self.state.n_batches += 1
        targets = values.targets if values is not None else torch.empty(0)
        return BatchResult(
            solved.ids, list(self.hparams.layers), solved.deltas, solved.keys_after, targets,
            values.nll.tolist() if values is not None else [], values.steps if values is not None else 0, seconds,
            solved.filtered_energy, solved.efficacy, solved.per_edit_success, solved.diagnostics, solved.moments,
        )

    def solve_layers(
        self, requests: Sequence[EditRequest], targets: torch.Tensor, seconds: dict[str, float], reader: KeyReader,
        first: tuple[torch.Tensor | None, torch.Tensor | None], basis: dict[int, torch.Tensor] | None = None,
        prev_cov: dict[int, torch.Tensor] | None = None,
    ) -> Solved:
        """Bottom to top: keys on the partially edited model, residual spread over the remaining layers, solve,
        guard. Raises ``GuardRejection`` (model partly written: the caller restores it) when the guard refuses.

        A layer's keys depend only on the layers below it, so the keys read for its solve are exactly its keys on
        the final edited model: they are the batch's edited keys (AlphaEdit's accumulated K_p), no re-read needed.

        Each layer's update is written in the shared delta format and applied exactly as every replica and a
        rebuild from the store will apply it, so the live matrices equal the stored ones bit for bit.

        ``basis`` (the matrices the update is solved on; default the current ones) and ``prev_cov`` (the keys to
        preserve; default the accumulated C_prev) let compaction solve all live edits jointly on the base weights.
        """
        hp, layout, model = self.hparams, self.layout, self.model
        basis = self.state.weights if basis is None else basis
        prev_cov = self.state.prev_keys_cov if prev_cov is None else prev_cov
        dtype = getattr(torch, hp.solve_dtype)
        out = Solved(ids=[r.edit_id or r.content_key() for r in requests])
        for i, layer in enumerate(hp.layers):
            keys, cur = first if i == 0 else self.timed(
                seconds, "keys", lambda layer=layer: reader.read(layer, hp.layers[-1])
            )
            assert keys is not None and cur is not None
            out.keys_after[layer] = keys.T.float().cpu().contiguous()
            gap = targets - cur  # (n, d_out): v1 - v0 at the last edited layer
            residual = gap.T / (len(hp.layers) - i)  # (d_out, n)
            start = time.perf_counter()
            prev = prev_cov.get(layer)
            prev = prev.to(self.device, dtype) if prev is not None else None
            left, right = self._update(requests, layer, i, residual, keys.T, gap.norm(dim=1), out, dtype, prev)
            delta = self.guarded(layer, left, right, out, basis[layer])
            layout.set_weight(model, layer, delta.apply(basis[layer]))
            seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - start
            out.deltas.append(delta)
        return out

    def _update(
        self, requests: Sequence[EditRequest], layer: int, index: int, residual: torch.Tensor, keys: torch.Tensor,
        gap_norms: torch.Tensor, out: Solved, dtype: torch.dtype, prev: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The algorithm's (left, right) factors for one layer: Delta = left @ right^T (``prev``: C_prev)."""
        hp = self.hparams
        if hp.algo == "memit":
            return memit_update(residual, keys, self._mom2[layer], hp.mom2_update_weight, prev, dtype)
        null = self._null[layer]
        if hp.algo == "alphaedit":
            return alphaedit_update(residual, keys, null.projector, hp.l2, prev, dtype)
        if hp.algo == "alphaedit_hybrid":
            return hybrid_update(residual, keys, null.projector, self._mom2[layer], hp.mom2_update_weight, hp.l2, prev,
                                 dtype)
        left, right, info = alphaedit_plus_update(
            residual, keys, null.projector, hp.l2, plus_settings(hp), index,
            prev_keys=self.state.prev_keys.get(layer), prev_keys_cov=prev, candidates=null.preserved,
            residual_norms=gap_norms, score=lambda lt, rt: self._score(requests, layer, lt, rt), dtype=dtype,
        )
        out.diagnostics[f"aplus_added_directions.{layer}"] = float(info.added_directions)
        out.diagnostics[f"aplus_smoothed_edits.{layer}"] = float(info.smoothed_edits)
        out.diagnostics[f"aplus_chosen_step.{layer}"] = info.chosen_step
        out.diagnostics[f"aplus_residual_norm_median.{layer}"] = info.residual_norm_median
        out.diagnostics[f"aplus_objective_gain.{layer}"] = info.objective_gain
        return left, right

    def guarded(
        self, layer: int, left: torch.Tensor, right: torch.Tensor, out: Solved | None = None,
        current: torch.Tensor | None = None,
    ) -> MatrixDelta:
        """The stored delta for update ``left @ right^T`` of ``current`` (default: the layer's matrix now), after
        the guard when one is configured."""
        name, transposed = self.layout.weight_name(layer), self.layout.is_transposed(self.model, layer)
        if self.guard is None:
            return MatrixDelta.from_factors(name, left, right, transposed=transposed)
        current = self.state.weights[layer] if current is None else current
        guarded = self.guard.apply(layer, left, right, current, name, transposed)
        if out is not None:
            out.filtered_energy[layer] = guarded.filtered_energy
            out.diagnostics[f"pruned.{layer}"] = float(guarded.pruned)
            if self.hparams.norm_cap is not None:
                out.diagnostics[f"norm_cap_scale.{layer}"] = guarded.cap_scale
        return guarded.delta

    def _score(self, requests: Sequence[EditRequest], layer: int, left: torch.Tensor, right: torch.Tensor) -> float:
        """Batch efficacy with a candidate update written (guarded) into ``layer``; the layer is restored after."""
        candidate = self.guarded(layer, left, right)
        self.layout.set_weight(self.model, layer, candidate.apply(self.state.weights[layer]))
        try:
            return float(edit_success(self.model, self.tokenizer, requests).mean())
        finally:
            self.layout.set_weight(self.model, layer, self.state.weights[layer])

    def accumulate_keys(self, edited_keys: dict[int, torch.Tensor]) -> None:
        """Add K K^T of applied edits to C_prev, on the CPU in float64, identically on every worker (AlphaEdit+ with
        conflict weights also keeps the keys themselves)."""
        dtype = getattr(torch, self.hparams.solve_dtype)
        keep_raw = self.hparams.algo == "alphaedit_plus" and self.hparams.aplus_conflict
        for layer, keys in edited_keys.items():
            k = keys.to("cpu", dtype)
            cov = k @ k.T
            prev = self.state.prev_keys_cov.get(layer)
            self.state.prev_keys_cov[layer] = cov if prev is None else prev + cov
            if keep_raw:
                raw = keys.detach().to("cpu", torch.float32)
                old = self.state.prev_keys.get(layer)
                self.state.prev_keys[layer] = raw.clone() if old is None else torch.cat([old, raw], dim=1)

    def reset_weights(self) -> None:
        """Write the state's matrices back into the model (undo a partially applied batch)."""
        for layer, weight in self.state.weights.items():
            self.layout.set_weight(self.model, layer, weight)

    def apply_deltas(self, deltas: Sequence[MatrixDelta], aux: dict[str, torch.Tensor]) -> None:
        """Follow a version computed elsewhere: apply its stored deltas and take over its editor state (``aux``,
        as ``BatchResult.aux`` wrote it)."""
        by_name = {self.layout.weight_name(layer): layer for layer in self.hparams.layers}
        for delta in deltas:
            if delta.name not in by_name:
                raise ValueError(f"delta for {delta.name}, which this editor does not edit")
            layer = by_name[delta.name]
            self.state.weights[layer] = delta.apply(self.state.weights[layer])
            self.layout.set_weight(self.model, layer, self.state.weights[layer])
        if COMPACTED_AUX in aux:  # the version re-solved all live edits: their keys replace C_prev
            self.state.prev_keys_cov.clear()
            self.state.prev_keys.clear()
        parts: dict[str, dict[int, torch.Tensor]] = {"keys": {}, "moments": {}}
        for key, tensor in aux.items():
            kind, _, layer = key.partition(".")
            if kind in parts and layer:
                parts[kind][int(layer)] = tensor
        self.accumulate_keys(parts["keys"])
        self.state.moments.update(parts["moments"])
        self.state.n_batches += 1

    def checksums(self) -> dict[str, str]:
        """sha256 of every edited matrix as it is now (float32, Linear orientation), by checkpoint name."""
        return {self.layout.weight_name(layer): tensor_sha256(w) for layer, w in self.state.weights.items()}
