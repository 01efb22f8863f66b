"""Versioned weight store: per version a manifest and a delta file; any version rebuilds from base + deltas.

Version 0 is the base model (its weights come from the model directory, not from the store). Every later version
has a parent; a version that was rolled back leaves the lineage, so rebuilding follows parent links, not numbers.
``WeightStore`` is the small interface an object store (S3, GCS) can implement; ``LocalWeightStore`` keeps
``<root>/v00000012/{manifest.json,delta.safetensors}`` on a local or shared file system, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from shared.delta import MatrixDelta, tensor_sha256
from shared.schemas import EditRequest

BASE_VERSION = 0
BASE_REFERENCE_FILE = "reference-v00000000.json"


class MatrixEntry(BaseModel):
    """One changed matrix of a version."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: tuple[int, int]
    format: Literal["lowrank", "dense"]
    rank: int | None = None
    transposed: bool = False
    delta_bytes: int
    sha256: str = Field(description="sha256 of the full float32 matrix after this version (Linear orientation).")


class ReferenceAnswer(BaseModel):
    """One probe's greedy answer by the reference (transformers, float32) on a version's exact weights."""

    model_config = ConfigDict(extra="forbid")

    name: str
    prompt_token_ids: list[int] = Field(description="The probe as token ids: both sides see identical input.")
    token_ids: list[int] = Field(description="Greedy continuation; ends with a stop token or at max_tokens.")
    gaps: list[float] = Field(description="Per generated token: top-1 minus top-2 logit (how close the choice was).")
    top_logits: list[float] = Field(default_factory=list, description="Per generated token: the top-1 logit.")


class ReferenceAnswers(BaseModel):
    """Greedy answers of the reference on a fixed probe set: what every serving engine must reproduce
    (``workers/evaluation/reference_answers.py`` computes them; ``workers/serving/agreement.py`` compares)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)
    dtype: str = "float32"
    device: str = "cpu"
    answers: list[ReferenceAnswer]
    seconds: float = 0.0


class VersionManifest(BaseModel):
    """What a version is, where it came from and what it changed: the audit record of one weight update."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    parent: int = Field(ge=0)
    base_model: str = Field(description="Fingerprint of the base model directory.")
    edit_ids: list[str]
    algo: str
    kind: Literal["edit", "compaction", "revert"] = Field(
        default="edit", description="``compaction``: all live edits re-solved jointly on the base weights; writes "
        "no new edits (``edit_ids`` empty) and replaces the accumulated preserved keys. ``revert``: the same joint "
        "solve without the edits in ``reverted_edit_ids`` (undo on demand).",
    )
    reverted_edit_ids: list[str] = Field(
        default_factory=list, description="Edits this version takes out of the weights (kind ``revert``); they stay "
        "out of every later compaction of this lineage.",
    )
    edits: list[EditRequest] = Field(
        default_factory=list, description="The edits this version wrote, as submitted, in ``edit_ids`` order: "
        "compaction re-reads their keys (with the v* stored beside the delta). Empty in older manifests.",
    )
    hparams: dict = Field(default_factory=dict)
    matrices: list[MatrixEntry]
    metrics: dict[str, float] = Field(default_factory=dict)
    missed_edit_ids: list[str] = Field(
        default_factory=list,
        description="Edits written into this version that did not take on their own prompt (efficacy check); the "
        "retrieval tier keeps serving them.",
    )
    reference: ReferenceAnswers | None = Field(
        default=None, description="Reference greedy answers on this version's weights (None in manifests written "
        "before they existed, or by tools that compute none): replicas check their own answers against them.",
    )
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    delta_sha256: str = ""

    def matrix(self, name: str) -> MatrixEntry:
        for entry in self.matrices:
            if entry.name == name:
                return entry
        raise KeyError(f"version {self.version} does not change {name}")


def build_manifest(
    version: int,
    parent: int,
    base_model: str,
    edit_ids: list[str],
    algo: str,
    deltas: list[MatrixDelta],
    result_sha256: Mapping[str, str],
    hparams: dict | None = None,
    metrics: dict[str, float] | None = None,
    missed_edit_ids: list[str] | None = None,
    reference: ReferenceAnswers | None = None,
    edits: list[EditRequest] | None = None,
    kind: Literal["edit", "compaction", "revert"] = "edit",
    reverted_edit_ids: list[str] | None = None,
) -> VersionManifest:
    entries = [
        MatrixEntry(
            name=d.name, shape=d.shape, format="lowrank" if d.is_low_rank else "dense", rank=d.rank,
            transposed=d.transposed, delta_bytes=d.nbytes, sha256=result_sha256[d.name],
        )
        for d in deltas
    ]
    return VersionManifest(
        version=version, parent=parent, base_model=base_model, edit_ids=edit_ids, algo=algo,
        hparams=hparams or {}, matrices=entries, metrics=metrics or {}, missed_edit_ids=missed_edit_ids or [],
        reference=reference, edits=edits or [], kind=kind,
        reverted_edit_ids=reverted_edit_ids or [],
    )


class StoreError(RuntimeError):
    """A version is missing, corrupt, or does not belong to this store's base model."""


class WeightStore(Protocol):
    """What the pipeline needs from a version store; implement it for an object store to scale out."""

    def put(self, manifest: VersionManifest, deltas: list[MatrixDelta], aux: Mapping[str, torch.Tensor]) -> None:
        """Write one version atomically; ``aux`` holds algorithm state that travels with it (e.g. edited keys)."""

    def manifest(self, version: int) -> VersionManifest: ...

    def deltas(self, version: int) -> tuple[list[MatrixDelta], dict[str, torch.Tensor]]: ...

    def versions(self) -> list[int]: ...

    def put_base_reference(self, reference: ReferenceAnswers) -> None: ...

    def reference(self, version: int) -> ReferenceAnswers | None: ...


class LocalWeightStore:
    """Versions as directories under ``root``; a half-written version is never visible (temp dir + rename)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def put(self, manifest: VersionManifest, deltas: list[MatrixDelta], aux: Mapping[str, torch.Tensor]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for delta in deltas:
            tensors.update(delta.to_tensors())
        for key, value in aux.items():
            tensors[f"aux::{key}"] = value.detach().cpu().contiguous()
        final = self._dir(manifest.version)
        if final.exists():  # history is never rewritten: a version number, once written, keeps its files
            raise StoreError(f"version {manifest.version} already exists in the store at {self.root}")
        tmp = Path(tempfile.mkdtemp(prefix=f".v{manifest.version:08d}-", dir=self.root))
        save_file(tensors, str(tmp / "delta.safetensors"))
        manifest = manifest.model_copy(update={"delta_sha256": file_sha256(tmp / "delta.safetensors")})
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        for path in (tmp / "delta.safetensors", tmp / "manifest.json", tmp):
            _fsync(path)  # durable before it becomes visible: a power cut never leaves a torn committed version
        tmp.rename(final)
        _fsync(self.root)

    def manifest(self, version: int) -> VersionManifest:
        path = self._dir(version) / "manifest.json"
        if not path.exists():
            raise StoreError(f"version {version} is not in the store at {self.root}")
        return VersionManifest.model_validate_json(path.read_text())

    def deltas(self, version: int) -> tuple[list[MatrixDelta], dict[str, torch.Tensor]]:
        manifest = self.manifest(version)
        path = self._dir(version) / "delta.safetensors"
        if manifest.delta_sha256 and file_sha256(path) != manifest.delta_sha256:
            raise StoreError(f"version {version}: delta file does not match its manifest checksum")
        tensors = load_file(str(path))
        deltas = [MatrixDelta.from_tensors(e.name, tensors, e.transposed) for e in manifest.matrices]
        aux = {k.removeprefix("aux::"): v for k, v in tensors.items() if k.startswith("aux::")}
        return deltas, aux

    def put_base_reference(self, reference: ReferenceAnswers) -> None:
        """Reference answers of version 0 (the base model has no manifest to carry them), written atomically."""
        tmp = self.root / f".{BASE_REFERENCE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(reference.model_dump_json() + "\n")
        tmp.replace(self.root / BASE_REFERENCE_FILE)

    def reference(self, version: int) -> ReferenceAnswers | None:
        """Reference answers of a committed version; None when none were stored (older stores and manifests)."""
        if version != BASE_VERSION:
            return self.manifest(version).reference
        path = self.root / BASE_REFERENCE_FILE
        return ReferenceAnswers.model_validate_json(path.read_text()) if path.exists() else None

    def delta_path(self, version: int) -> Path:
        return self._dir(version) / "delta.safetensors"

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v[0-9]*") if (p / "manifest.json").exists())


def lineage(store: WeightStore, version: int) -> list[VersionManifest]:
    """Manifests from the first version after base up to ``version``, following parent links."""
    chain: list[VersionManifest] = []
    while version != BASE_VERSION:
        manifest = store.manifest(version)
        chain.append(manifest)
        version = manifest.parent
    return chain[::-1]


def rebuild(
    store: WeightStore,
    base: Mapping[str, torch.Tensor],
    version: int,
    on_version: Callable[[VersionManifest, dict[str, torch.Tensor]], None] | None = None,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Matrices of ``version`` from the base matrices (Linear orientation) plus every delta on its lineage.

    ``on_version`` sees each version's aux tensors (editors use it to re-accumulate edited keys). With ``verify``,
    every matrix is checked against its manifest checksum, so a rebuild is either bit-identical or an error.
    """
    current = {name: w.detach().to("cpu", torch.float32).clone() for name, w in base.items()}
    for manifest in lineage(store, version):
        deltas, aux = store.deltas(manifest.version)
        for delta in deltas:
            if delta.name not in current:
                raise StoreError(f"version {manifest.version} changes {delta.name}, which the base does not have")
            current[delta.name] = delta.apply(current[delta.name])
            if verify and tensor_sha256(current[delta.name]) != manifest.matrix(delta.name).sha256:
                raise StoreError(f"version {manifest.version}: {delta.name} does not match its manifest checksum")
        if on_version is not None:
            on_version(manifest, aux)
    return current


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_json(manifest: VersionManifest) -> str:
    return json.dumps(json.loads(manifest.model_dump_json()), sort_keys=True)
