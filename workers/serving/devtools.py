"""Committing weight versions without the controller, for serving tests and benchmarks.

``commit_edits`` runs the real editor on a batch and stores the result exactly as the controller's commit does
(``build_manifest`` with the version's reference answers + ``LocalWeightStore.put``); ``commit_scaled`` stores a
deliberately broken version (every edited matrix scaled, no reference answers), the kind of update a canary gate must
stop; ``store_base_reference`` stores version 0's reference answers as an edit worker does when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.delta import MatrixDelta, tensor_sha256
from shared.schemas import EditRequest
from shared.weight_store import LocalWeightStore, ReferenceAnswers, VersionManifest, build_manifest, rebuild
from workers.evaluation.reference_answers import reference_answers
from workers.serving.weights import BaseReader


def commit_edits(
    store: LocalWeightStore,
    editor: object,
    requests: Sequence[EditRequest],
    version: int,
    parent: int,
    base_model: str,
) -> VersionManifest:
    """Apply one batch with ``editor`` (a ``workers.editing.editor.Editor`` at ``parent``) and store it."""
    result = editor.apply(list(requests))
    checksums = editor.checksums()
    manifest = build_manifest(
        version, parent, base_model, result.edit_ids, editor.hparams.algo, result.deltas,
        {d.name: checksums[d.name] for d in result.deltas}, hparams=editor.hparams.to_dict(),
        reference=reference_answers(editor.model, editor.tokenizer), edits=list(requests),
    )
    store.put(manifest, result.deltas, result.aux)
    return store.manifest(version)


def store_base_reference(store: LocalWeightStore, model: object, tokenizer: object) -> ReferenceAnswers:
    """Version 0's reference answers (``model`` must be the unedited base model)."""
    reference = reference_answers(model, tokenizer)
    store.put_base_reference(reference)
    return reference


def commit_scaled(
    store: LocalWeightStore, base: BaseReader, names: Sequence[str], version: int, parent: int, factor: float,
    base_model: str,
) -> VersionManifest:
    """A version that multiplies the given matrices (as of ``parent``) by ``factor``: a collapsed update."""
    current = rebuild(store, {n: base.read(n, False) for n in names}, parent)
    deltas = [MatrixDelta.from_dense(n, current[n] * (factor - 1.0)) for n in names]
    after = {d.name: tensor_sha256(d.apply(current[d.name])) for d in deltas}
    manifest = build_manifest(version, parent, base_model, [f"scaled-{version}"], "scaled", deltas, after)
    store.put(manifest, deltas, {})
    return store.manifest(version)


def greedy_contains(text: str, target: str) -> bool:
    return target.strip().lower() in text.lower()


def dense_bytes(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    return shape[0] * shape[1] * torch.tensor([], dtype=dtype).element_size()
