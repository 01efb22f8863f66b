"""Sequential editing state in one object: what a restarted editor needs to continue exactly where it stopped.

It holds the current edited matrices, the accumulated covariance of previously edited keys (so later batches do
not overwrite earlier ones), the fixed context templates and the hyperparameters. Saved as one safetensors file
with JSON metadata; saving and loading is bit-exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.editing.hparams import EditHParams

FORMAT_VERSION = 1


@dataclass
class EditorState:
    hparams: EditHParams
    model_fingerprint: str
    templates: list[str]
    base_sha256: dict[int, str]
    weights: dict[int, torch.Tensor]  # current (d_out, d_in) matrix per edited layer
    prev_keys_cov: dict[int, torch.Tensor] = field(default_factory=dict)  # sum of K K^T of applied edits
    prev_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # (d_in, M) keys themselves (AlphaEdit+ only)
    moments: dict[int, torch.Tensor] = field(default_factory=dict)  # UltraEdit's packed lifelong normaliser
    edit_ids: list[str] = field(default_factory=list)
    n_batches: int = 0

    def save(self, path: Path | str) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves a truncated state."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"weight.{layer}": w.detach().cpu().contiguous() for layer, w in self.weights.items()}
        tensors |= {f"prev_keys_cov.{layer}": c.detach().cpu().contiguous() for layer, c in self.prev_keys_cov.items()}
        tensors |= {f"prev_keys.{layer}": k.detach().cpu().contiguous() for layer, k in self.prev_keys.items()}
        tensors |= {f"moments.{layer}": m.detach().cpu().contiguous() for layer, m in self.moments.items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "hparams": self.hparams.to_dict(),
            "model_fingerprint": self.model_fingerprint,
            "templates": self.templates,
            "base_sha256": {str(k): v for k, v in self.base_sha256.items()},
            "edit_ids": self.edit_ids,
            "n_batches": self.n_batches,
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"editq_state": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> EditorState:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["editq_state"])
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported state format {meta.get('format_version')}")
            parts: dict[str, dict[int, torch.Tensor]] = {
                "weight": {}, "prev_keys_cov": {}, "prev_keys": {}, "moments": {}
            }
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                kind, layer = key.rsplit(".", 1)
                parts[kind][int(layer)] = f.get_tensor(key)
        return cls(
            hparams=EditHParams.from_dict(meta["hparams"]),
            model_fingerprint=meta["model_fingerprint"],
            templates=list(meta["templates"]),
            base_sha256={int(k): v for k, v in meta["base_sha256"].items()},
            weights=parts["weight"],
            prev_keys_cov=parts["prev_keys_cov"],
            prev_keys=parts["prev_keys"],
            moments=parts["moments"],
            edit_ids=list(meta["edit_ids"]),
            n_batches=int(meta["n_batches"]),
        )
