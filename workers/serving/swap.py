"""The engine-facing steps of a hot swap, each a thin use of vLLM's own API (``pause_generation``,
``collective_rpc`` into ``extension.EditqWorkerExtension``, ``reset_prefix_cache``)."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from workers.serving.weights import VersionMatrices

log = logging.getLogger("editq.replica")
PROBE_ROWS = 8


class SwapCheckError(RuntimeError):
    """The engine does not hold the matrices it was asked to load."""


@dataclass(frozen=True)
class SwapFiles:
    """Both versions' matrices and the probe inputs, written before the pause so nothing slow happens in it."""

    folder: Path
    target: Path
    previous: Path
    probe: Path
    separation: dict[str, float]  # per matrix: ||x (W_new - W_old)^T|| / ||x W_new^T|| on the probe inputs


def write_swap_files(work_dir: Path, target: VersionMatrices, previous: VersionMatrices) -> SwapFiles:
    """Probe inputs lie in the row space of the change (both directions share it), so a kernel still computing
    with the old matrix misses by ``separation``, far above the check's tolerance."""
    folder = Path(tempfile.mkdtemp(prefix=f"v{target.version}-", dir=work_dir))
    probes: dict[str, torch.Tensor] = {}
    separation: dict[str, float] = {}
    generator = torch.Generator().manual_seed(target.version)
    for name, new in target.matrices.items():
        change = new - previous.matrices[name]
        if change.abs().max() > 0:
            x = torch.randn(PROBE_ROWS, new.shape[0], generator=generator) @ change
        else:
            x = torch.randn(PROBE_ROWS, new.shape[1], generator=generator)
        x = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * new.shape[1] ** 0.5).contiguous()
        probes[name] = x
        separation[name] = float((x @ change.T).norm() / (x @ new.T).norm().clamp_min(1e-12))
    save_file(probes, str(folder / "probe.safetensors"))
    return SwapFiles(
        folder, target.write(folder / "target.safetensors"), previous.write(folder / "previous.safetensors"),
        folder / "probe.safetensors", separation,
    )


async def drain(engine: Any, admitted: asyncio.Event, timeout_s: float, name: str) -> str:
    """Let admitted requests finish on the old weights, then hold new ones (``mode="wait"``), within
    ``timeout_s``; after it, abort what still runs (``mode="abort"``) so the swap cannot hang on a long request."""
    deadline = time.monotonic() + timeout_s
    try:
        await asyncio.wait_for(admitted.wait(), timeout_s)
        remaining = max(0.01, deadline - time.monotonic())
        await asyncio.wait_for(engine.pause_generation(mode="wait", clear_cache=False), remaining)
        return "wait"
    except TimeoutError:
        log.warning("%s: in-flight requests did not finish within %.1f s: aborting them for the swap "
                    "(the router retries them on another replica)", name, timeout_s)
        await engine.pause_generation(mode="abort", clear_cache=False)
        return "abort"


async def load_and_verify(
    engine: Any, path: Path, probe: Path, mats: VersionMatrices, rtol: float
) -> tuple[bool, float]:
    """Reload ``mats`` in every engine worker and prove it: the bytes each worker read, then the live kernels'
    outputs. Returns (checksums ok, worst relative output error); raises ``SwapCheckError`` on any mismatch."""
    sums = await engine.collective_rpc("editq_load_matrices", args=(str(path),))
    want = mats.checkpoint_sha256()
    bad_manifest = [n for n, sha in mats.expected.items() if not mats.transposed.get(n) and want[n] != sha]
    bad_read = sorted({n for rank in sums for n in want if rank.get(n) != want[n]})
    if bad_manifest or bad_read:
        raise SwapCheckError(f"checksum mismatch: {bad_manifest or bad_read}")
    transposed = [n for n, t in mats.transposed.items() if t]
    errors = await engine.collective_rpc("editq_probe_matrices", args=(str(path), str(probe), transposed))
    worst = max(e for rank in errors for e in rank.values())
    if worst > rtol:
        raise SwapCheckError(f"live kernels differ from the loaded matrices (relative error {worst:.4f} > {rtol})")
    return True, worst


async def reset_prefix_cache(engine: Any, attempts: int = 5) -> bool:
    """vLLM refuses while blocks are in use; we are paused and drained, so a refusal is retried, then reported."""
    for attempt in range(attempts):
        if await engine.reset_prefix_cache():
            return True
        await asyncio.sleep(0.05 * (attempt + 1))
    return False
