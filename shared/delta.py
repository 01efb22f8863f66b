"""The weight-delta format every tier shares: how one version's change to one matrix is stored and applied.

A batch update of an MLP output matrix has rank at most the batch size, so it is stored as low-rank factors
``Delta = left @ right^T`` when that is smaller than the dense matrix, and densely otherwise (e.g. after a PRUNE
restraint, which is not low-rank). Matrices are always in ``nn.Linear`` orientation ``(d_out, d_in)``; a
``transposed`` flag says the checkpoint stores the transpose (GPT-2 ``Conv1D``).

Applying a delta is defined once, here, and is deterministic: the dense delta is formed in float64 on the CPU and
rounded to float32 before an elementwise add, so the edit worker that computed it, its peers, the serving replicas
and a rebuild from the store all get bit-identical matrices (checked against per-matrix sha256 in the manifest).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

DELTA_DTYPE = torch.float32


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Checksum of a tensor's exact bytes (dtype and shape included)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class MatrixDelta:
    """Change of one matrix in one version: low-rank factors or a dense tensor, float32 on the CPU."""

    name: str  # checkpoint (HF state-dict) name, e.g. ``model.layers.4.mlp.down_proj.weight``
    shape: tuple[int, int]  # (d_out, d_in)
    left: torch.Tensor | None = None  # (d_out, r)
    right: torch.Tensor | None = None  # (d_in, r)
    dense_delta: torch.Tensor | None = None  # (d_out, d_in)
    transposed: bool = False  # the checkpoint stores (d_in, d_out)

    def __post_init__(self) -> None:
        if (self.dense_delta is None) == (self.left is None or self.right is None):
            raise ValueError(f"{self.name}: give either low-rank factors or a dense delta")
        got = self.dense_delta.shape if self.dense_delta is not None else (self.left.shape[0], self.right.shape[0])
        if tuple(got) != tuple(self.shape):
            raise ValueError(f"{self.name}: delta shape {tuple(got)} does not match {self.shape}")

    @classmethod
    def from_factors(
        cls, name: str, left: torch.Tensor, right: torch.Tensor, transposed: bool = False
    ) -> MatrixDelta:
        """Store ``left @ right^T`` as factors when they are smaller than the dense matrix, else densely."""
        left = left.detach().to("cpu", DELTA_DTYPE).contiguous()
        right = right.detach().to("cpu", DELTA_DTYPE).contiguous()
        shape = (left.shape[0], right.shape[0])
        if left.shape[1] * (shape[0] + shape[1]) < shape[0] * shape[1]:
            return cls(name, shape, left=left, right=right, transposed=transposed)
        dense = (left.double() @ right.double().T).to(DELTA_DTYPE)
        return cls(name, shape, dense_delta=dense, transposed=transposed)

    @classmethod
    def from_dense(cls, name: str, delta: torch.Tensor, transposed: bool = False) -> MatrixDelta:
        delta = delta.detach().to("cpu", DELTA_DTYPE).contiguous()
        return cls(name, (delta.shape[0], delta.shape[1]), dense_delta=delta, transposed=transposed)

    @property
    def is_low_rank(self) -> bool:
        return self.dense_delta is None

    @property
    def rank(self) -> int | None:
        return self.left.shape[1] if self.left is not None else None

    @property
    def nbytes(self) -> int:
        parts = (self.left, self.right) if self.is_low_rank else (self.dense_delta,)
        return sum(p.numel() * p.element_size() for p in parts)

    def dense(self) -> torch.Tensor:
        """The delta as a float32 (d_out, d_in) tensor, formed deterministically (float64 product, one rounding)."""
        if self.dense_delta is not None:
            return self.dense_delta
        return (self.left.double() @ self.right.double().T).to(DELTA_DTYPE)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + delta`` as a new float32 CPU tensor; ``weight`` in (d_out, d_in) orientation."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"{self.name}: weight shape {tuple(weight.shape)} does not match delta {self.shape}")
        return weight.detach().to("cpu", DELTA_DTYPE) + self.dense()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat safetensors entries for this delta."""
        if self.is_low_rank:
            return {f"{self.name}::left": self.left, f"{self.name}::right": self.right}
        return {f"{self.name}::dense": self.dense_delta}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor], transposed: bool) -> MatrixDelta:
        if f"{name}::dense" in tensors:
            return cls.from_dense(name, tensors[f"{name}::dense"], transposed)
        try:
            left, right = tensors[f"{name}::left"], tensors[f"{name}::right"]
        except KeyError:
            raise ValueError(f"delta file has no entry for {name}") from None
        return cls(name, (left.shape[0], right.shape[0]), left=left, right=right, transposed=transposed)


def to_checkpoint_orientation(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The matrix as the checkpoint (and thus a serving engine's loader) stores it."""
    return weight.T.contiguous() if transposed else weight
