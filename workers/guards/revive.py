"""REVIVE (Zhang et al., ACL 2026): keep every update out of the dominant singular subspace of the pretrained matrix.

    W0 = U S V^T,   k = smallest rank whose sigma^2 share reaches the energy threshold (or a fixed rank)
    Delta_safe = (I - U_k U_k^T) Delta (I - V_k V_k^T)

No reference code is public; this is the reconstruction in ``editing-algorithms.md`` section 6 (energy counted as
sigma^2, recorded here). Because every accepted update avoids the same subspaces, ``U_k^T W V_k = S_k`` holds for
ever: the top-k singular triplets of W0, which carry most general ability, stay singular triplets of W.

An update in factor form ``Delta = L R^T`` stays in factor form: ``L' = (I - U_k U_k^T) L``, ``R' = (I - V_k V_k^T)
R``, so the filter costs O((d_out + d_in) k r) and the stored delta keeps its rank. Plain tensors, no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.delta import tensor_sha256


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD of one pretrained matrix (float64, CPU): ``weight = u @ diag(s) @ v.T``, singular values descending."""

    u: torch.Tensor  # (d_out, r)
    s: torch.Tensor  # (r,)
    v: torch.Tensor  # (d_in, r)

    @classmethod
    def of(cls, weight: torch.Tensor) -> Spectrum:
        u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
        return cls(u.contiguous(), s.contiguous(), vh.T.contiguous())

    @property
    def sigma_max(self) -> float:
        return float(self.s[0])

    def rank_for(self, energy: float | None = None, rank: int | None = None) -> int:
        """Protected rank: ``rank`` when given, else the fewest top directions holding ``energy`` of sum sigma^2."""
        if rank is not None:
            return max(0, min(int(rank), self.s.numel()))
        if energy is None:
            raise ValueError("give an energy share or a rank")
        share = torch.cumsum(self.s.pow(2), 0) / self.s.pow(2).sum().clamp(min=torch.finfo(torch.float64).tiny)
        target = torch.tensor(energy, dtype=torch.float64)
        return min(int(torch.searchsorted(share, target).item()) + 1, self.s.numel())

    def weight(self) -> torch.Tensor:
        return (self.u * self.s) @ self.v.T


@dataclass(frozen=True)
class FilterResult:
    left: torch.Tensor  # (d_out, r): (I - U_k U_k^T) left
    right: torch.Tensor  # (d_in, r): (I - V_k V_k^T) right
    filtered_energy: float  # 1 - ||Delta_safe||_F^2 / ||Delta||_F^2 (0 for a zero update)


def _frob2(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||left @ right^T||_F^2 from the r x r Gram matrices, without forming the product."""
    return ((left.T @ left) * (right.T @ right)).sum()


def _remove(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return x - basis @ (basis.T @ x) if basis.shape[1] else x


def revive_filter(left: torch.Tensor, right: torch.Tensor, u_k: torch.Tensor, v_k: torch.Tensor) -> FilterResult:
    """Filter ``Delta = left @ right^T`` out of span(u_k) on the output side and span(v_k) on the input side.

    ``u_k``/``v_k`` have orthonormal columns. Computed in the factors' dtype (the editor solves in float64).
    """
    u_k, v_k = u_k.to(left), v_k.to(right)
    safe_left, safe_right = _remove(left, u_k), _remove(right, v_k)
    total = float(_frob2(left, right))
    kept = float(_frob2(safe_left, safe_right))
    filtered = 0.0 if total <= 0.0 else min(1.0, max(0.0, 1.0 - kept / total))
    return FilterResult(safe_left, safe_right, filtered)


def protected_bases(
    spectrum: Spectrum, energy: float | None, rank: int | None, subspace: str = "dominant", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the protected output / input subspaces: the top-k singular vectors, or (``random``,
    the control) random orthonormal k-dimensional subspaces of the same sizes, deterministic in ``seed``."""
    k = spectrum.rank_for(energy, rank)
    if subspace == "dominant":
        return spectrum.u[:, :k], spectrum.v[:, :k]
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(spectrum.u.shape[0], k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(spectrum.v.shape[0], k, generator=gen, dtype=torch.float64))[0]
    return u, v


def spectrum_cached(weight: torch.Tensor, cache_dir: Path | None, sha256: str | None = None) -> Spectrum:
    """SVD of a pretrained matrix, computed once and cached on disk under its float32 checksum (the editor state's
    ``base_sha256``), since O(d_out^2 d_in) is worth keeping for large models; ``cache_dir=None``: no cache."""
    if cache_dir is None:
        return Spectrum.of(weight)
    key = sha256 or tensor_sha256(weight.detach().to("cpu", torch.float32))
    cached = load_spectrum(cache_dir, key)
    if cached is not None:
        return cached
    spectrum = Spectrum.of(weight)
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"u": spectrum.u, "s": spectrum.s, "v": spectrum.v}, str(tmp))
    tmp.replace(path)
    return spectrum



def load_spectrum(cache_dir: Path, sha256: str) -> Spectrum | None:
    """A cached spectrum by the pretrained matrix's checksum, or None."""
    path = _path(cache_dir, sha256)
    if not path.exists():
        return None
    data = load_file(str(path))
    return Spectrum(data["u"], data["s"], data["v"])


def _path(cache_dir: Path, sha256: str) -> Path:
    return Path(cache_dir) / f"{sha256}.svd.safetensors"
