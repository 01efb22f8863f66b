"""Versions as artifacts: a committed weight version written out as a normal Hugging Face model directory (``hf``)
that ``vllm serve`` or ``transformers`` load as is, or as only its changed matrices (``delta``).

The matrices come from ``workers.serving.weights.materialise`` (base + every delta on the lineage, each checked
against its manifest's checksum), so an export is bit-identical to what the edit worker committed and the replicas
serve. Every written file is checksummed in ``editq_export.json``, beside the version's lineage and the edits it
contains (reverted and not-taken edits are listed apart, not as contained).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open
from safetensors.torch import save_file

from shared.delta import to_checkpoint_orientation
from shared.weight_store import BASE_VERSION, WeightStore, file_sha256, lineage
from workers.serving.weights import BaseReader, materialise

EXPORT_MANIFEST = "editq_export.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ExportedEdit(BaseModel):
    edit_id: str
    version: int
    subject: str
    prompt: str
    target_new: str
    source: str


class ExportManifest(BaseModel):
    """What an export holds, written as ``editq_export.json`` in the output directory."""

    format: Literal["hf", "delta"]
    version: int
    lineage: list[int] = Field(description="Versions from the base up to this one (parent links).")
    base_model: str | None = Field(description="Fingerprint of the base model the deltas apply to.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    edits: list[ExportedEdit] = Field(description="Edits the weights of this version hold.")
    reverted_edit_ids: list[str] = Field(default_factory=list, description="Taken out by a revert on the lineage.")
    missed_edit_ids: list[str] = Field(default_factory=list, description="Written but did not take (the "
                                       "retrieval tier serves them in editq; an export does not carry the tier).")
    matrices: dict[str, str] = Field(description="sha256 of every changed matrix (float32, Linear orientation), as "
                                     "the version's manifests record them.")
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every file written.")


class ExportError(RuntimeError):
    """The export cannot be written (the message says why)."""


def export_version(
    store: WeightStore, model_dir: Path, version: int, out: Path, fmt: Literal["hf", "delta"] = "hf",
    progress: Callable[[str], None] | None = None,
) -> ExportManifest:
    """Write ``version`` to ``out`` (which must not exist or be empty); returns what was written."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty: export into a new directory")
    chain = lineage(store, version) if version != BASE_VERSION else []
    base = BaseReader(model_dir)
    matrices, _ = materialise(store, base, version)  # verified against every manifest checksum on the lineage
    manifest = _describe(chain, fmt, version, matrices.expected)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "delta":
        matrices.write(out / "delta.safetensors")
    else:
        changed = {name: to_checkpoint_orientation(w, matrices.transposed.get(name, False)).contiguous()
                   for name, w in matrices.matrices.items()}
        _write_hf(model_dir, out, changed, progress)
    manifest.files = {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / EXPORT_MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def _describe(chain, fmt: str, version: int, expected: dict[str, str]) -> ExportManifest:
    reverted = {e for m in chain for e in m.reverted_edit_ids}
    missed = {e for m in chain for e in m.missed_edit_ids}
    edits = [
        ExportedEdit(edit_id=str(r.edit_id), version=m.version, subject=r.subject, prompt=r.prompt,
                     target_new=r.target_new, source=r.source)
        for m in chain for r in m.edits if r.edit_id not in reverted and r.edit_id not in missed
    ]
    return ExportManifest(
        format=fmt, version=version, lineage=[m.version for m in chain],
        base_model=chain[-1].base_model if chain else None, edits=edits, reverted_edit_ids=sorted(reverted),
        missed_edit_ids=sorted(missed), matrices=dict(sorted(expected.items())),
    )


def _write_hf(model_dir: Path, out: Path, changed: dict[str, torch.Tensor],
              progress: Callable[[str], None] | None) -> None:
    """Copy the model directory, rewriting each safetensors shard with the changed matrices in place (same names,
    dtype and sharding, so any loader that reads the base reads the export)."""
    shards = sorted(set(BaseReader(model_dir).files.values()))  # the files the model's loader reads, no others
    if not shards:
        raise ExportError(f"{model_dir} holds no safetensors weights (only safetensors models can be exported)")
    strays = sorted(p.name for p in model_dir.glob("*.safetensors") if p not in shards)
    if strays:  # e.g. consolidated.safetensors beside HF shards: copied unedited, a loader could pick it
        raise ExportError(f"{model_dir} holds weight files its index does not list ({', '.join(strays)}): remove "
                          "them or export from a clean model directory")
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != EXPORT_MANIFEST:
            shutil.copy2(path, out / path.name)
    written: set[str] = set()
    for shard in shards:
        if progress:
            progress(shard.name)
        with safe_open(str(shard), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open API)
            metadata = handle.metadata()
        for name in tensors.keys() & changed.keys():
            tensors[name] = changed[name].to(tensors[name].dtype)
            written.add(name)
        save_file(tensors, str(out / shard.name), metadata=metadata or {"format": "pt"})
    missing = changed.keys() - written
    if missing:
        raise ExportError(f"the base model's shards hold no tensor named {sorted(missing)[0]}")
