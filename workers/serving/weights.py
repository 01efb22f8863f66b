"""Full matrices of a weight version for a serving engine: base matrices from the model directory plus the stored
deltas, verified against the manifests' checksums on the way.

A replica keeps the matrices of its current version (only those some version changed: a few MiB), so moving
forward along the lineage applies just the new deltas; any other move (rollback, a version off the current
lineage) rebuilds from base. The matrices written for a swap cover every name the current *or* the target version
changed, so a matrix the target no longer changes goes back to its base value.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.delta import tensor_sha256, to_checkpoint_orientation
from shared.weight_store import BASE_VERSION, StoreError, VersionManifest, WeightStore, lineage


@dataclass
class VersionMatrices:
    """Matrices (float32, Linear orientation) of one version, for every name any applied version touched."""

    version: int
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    transposed: dict[str, bool] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)  # manifest sha256 of matrices the lineage changed

    @property
    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.matrices.values())

    def write(self, path: Path) -> Path:
        """A safetensors file in checkpoint names and orientation, as vLLM's loader expects."""
        tensors = {
            name: to_checkpoint_orientation(w, self.transposed.get(name, False)).contiguous()
            for name, w in sorted(self.matrices.items())
        }
        save_file(tensors, str(path))
        return path

    def covering(self, target: VersionMatrices, base: BaseReader) -> VersionMatrices:
        """These matrices for every name ``target`` holds (base values where this version changed nothing): what a
        swap from this version to ``target`` must be able to restore."""
        return VersionMatrices(self.version, {
            n: self.matrices[n] if n in self.matrices else base.read(n, t) for n, t in target.transposed.items()
        }, dict(target.transposed), dict(self.expected))

    def checkpoint_sha256(self) -> dict[str, str]:
        """sha256 of each tensor as written (what the engine's worker must report after reading the file)."""
        return {
            name: tensor_sha256(to_checkpoint_orientation(w, self.transposed.get(name, False)).contiguous())
            for name, w in self.matrices.items()
        }


class BaseReader:
    """Reads single matrices from an HF safetensors model directory (sharded or not), in Linear orientation."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: self.model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = self.model_dir / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{self.model_dir} holds no safetensors weights")
            with safe_open(str(single), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), single)

    def read(self, name: str, transposed: bool) -> torch.Tensor:
        if name not in self.files:
            raise StoreError(f"the base model has no tensor {name}")
        with safe_open(str(self.files[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name).to(torch.float32)
        return tensor.T.contiguous() if transposed else tensor


def _names(chain: list[VersionManifest]) -> dict[str, bool]:
    return {e.name: e.transposed for m in chain for e in m.matrices}


def materialise(
    store: WeightStore, base: BaseReader, target: int, current: VersionMatrices | None = None
) -> tuple[VersionMatrices, dict[str, float]]:
    """Matrices of ``target``; starts from ``current`` when ``target`` descends from it. Returns timings too.

    Every matrix a version on the lineage changes is checked against that version's manifest checksum, so the
    result is bit-identical to what the edit worker committed, or an error.
    """
    t0 = time.perf_counter()
    chain = lineage(store, target) if target != BASE_VERSION else []
    on_chain = [m.version for m in chain]
    transposed = dict(current.transposed) if current else {}
    transposed.update(_names(chain))
    forward = current is not None and (current.version == BASE_VERSION or current.version in on_chain)
    start = on_chain.index(current.version) + 1 if forward and current.version in on_chain else 0
    matrices: dict[str, torch.Tensor] = {}
    expected: dict[str, str] = {}
    for name, is_t in transposed.items():
        if forward and name in current.matrices:
            matrices[name] = current.matrices[name]
            if name in current.expected:
                expected[name] = current.expected[name]
        else:
            matrices[name] = base.read(name, is_t)
    read_s = time.perf_counter() - t0
    for manifest in chain[start:]:
        deltas, _ = store.deltas(manifest.version)
        for delta in deltas:
            matrices[delta.name] = delta.apply(matrices[delta.name])
            sha = manifest.matrix(delta.name).sha256
            if tensor_sha256(matrices[delta.name]) != sha:
                raise StoreError(f"version {manifest.version}: {delta.name} does not match its manifest checksum")
            expected[delta.name] = sha
    result = VersionMatrices(target, matrices, transposed, expected)
    return result, {"read_base_s": read_s, "materialise_s": time.perf_counter() - t0}


def version_bytes(store: WeightStore, version: int) -> dict[str, int]:
    """Bytes a version moves: its stored delta (low-rank factors where smaller) vs its dense changed matrices."""
    manifest = store.manifest(version)
    return {
        "delta_bytes": sum(e.delta_bytes for e in manifest.matrices),
        "dense_bytes": sum(e.shape[0] * e.shape[1] * 4 for e in manifest.matrices),
        "matrices": len(manifest.matrices),
    }
