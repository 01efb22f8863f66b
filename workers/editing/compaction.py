"""Compaction: replace the pile of sequential batch updates with one joint solve of all live edits on the base weights.

Why: every sequential batch is solved on the model as the previous batches left it, against an ever larger C_prev,
and its residual errors stay in the weights; the pile drifts further from the base than one solve of the same
edits would (MEMIT's batch setting). Compaction solves all live edits at once on the *base* matrices with the same
algorithm and preservation terms, then writes the difference to the current matrices as one ordinary version.

The stored v* stay valid: they are targets for the last edited layer's output, and the layers above it never
change. Keys are re-read bottom to top on the partially compacted stack, exactly as a batch is solved. After it,
C_prev holds the live edits' keys on the compacted model (``BatchResult.compacted`` tells followers to replace,
not add). When one subject's prompt was edited twice, only the latest edit is live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from shared.delta import MatrixDelta
from shared.schemas import EditRequest
from shared.weight_store import StoreError, WeightStore, lineage
from workers.editing.editor import Editor
from workers.editing.results import TARGETS_AUX, BatchResult
from workers.guards.policy import edit_success

COMPACTABLE_ALGOS = ("memit", "alphaedit", "alphaedit_hybrid")


class CompactionRefused(RuntimeError):
    """The joint solve would lose edits that the sequential weights hold; the editor is unchanged."""


@dataclass
class LiveEdits:
    """Edits the weights hold, each with its stored v* (row i of ``targets`` belongs to ``requests[i]``)."""

    requests: list[EditRequest]
    targets: torch.Tensor  # (n, d) at the last edited layer

    @classmethod
    def latest(cls, pairs: Iterable[tuple[EditRequest, torch.Tensor]]) -> LiveEdits:
        """Oldest first in, one edit per rewritten prompt out: a later edit of the same prompt replaces the earlier
        (sequential editing overwrote it too; a joint solve would otherwise average the two targets)."""
        latest: dict[str, tuple[EditRequest, torch.Tensor]] = {}
        for request, target in pairs:
            latest.pop(request.text, None)  # re-insert so the order stays "last written last"
            latest[request.text] = (request, target)
        if not latest:
            return cls([], torch.empty(0))
        requests, targets = zip(*latest.values(), strict=True)
        return cls(list(requests), torch.stack([t.float() for t in targets]))

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class Compacted:
    result: BatchResult  # the version's deltas (current -> compacted, dense) and the new C_prev keys
    requests: list[EditRequest]  # the live edits, in the order of the two lists below
    took_before: list[bool]  # per live edit: its new target won on its own prompt before compaction
    takes_after: list[bool]  # ... and after

    @property
    def lost(self) -> list[str]:
        """Edits that took before and no longer do: the tier would have to serve them again."""
        return [
            str(r.edit_id or r.content_key())
            for r, before, after in zip(self.requests, self.took_before, self.takes_after, strict=True)
            if before and not after
        ]

    def efficacy(self, after: bool = True) -> float:
        scores = self.takes_after if after else self.took_before
        return sum(scores) / len(scores) if scores else float("nan")


def compact(
    editor: Editor, live: LiveEdits, accept: Callable[[PreTrainedModel], None] | None = None,
    max_lost: int | None = 0,
) -> Compacted:
    """Solve ``live`` jointly on the base matrices and make the result the editor's current state.

    Refused (``CompactionRefused``) when more than ``max_lost`` edits that took before no longer take after (None:
    never refused for that); ``accept`` sees the compacted model before it is kept and may refuse it by raising
    (the health budget). On any error the model and state are left exactly as before.
    """
    hp = editor.hparams
    if hp.algo not in COMPACTABLE_ALGOS:
        raise ValueError(f"compaction solves {', '.join(COMPACTABLE_ALGOS)} in closed form, not {hp.algo}")
    if live.requests and live.targets.shape[0] != len(live.requests):
        raise ValueError(f"{live.targets.shape[0]} targets for {len(live.requests)} edits")
    editor.prepare()
    model, tokenizer, layout = editor.model, editor.tokenizer, editor.layout
    seconds: dict[str, float] = {}
    current = dict(editor.state.weights)
    base = {layer: w.float() for layer, w in editor.base_weights().items()}
    def success() -> torch.Tensor:
        return edit_success(model, tokenizer, live.requests) if live.requests else torch.empty(0)

    took_before = editor.timed(seconds, "efficacy_before", success)
    try:
        for layer in hp.layers:
            layout.set_weight(model, layer, base[layer])
        if live.requests:
            reader = editor.reader(live.requests)
            first = editor.timed(seconds, "keys", lambda: reader.read(hp.layers[0], hp.layers[-1]))
            solved = editor.solve_layers(
                live.requests, live.targets.to(editor.device), seconds, reader, first, basis=base, prev_cov={}
            )
            joints, keys_after, filtered = solved.deltas, solved.keys_after, solved.filtered_energy
        else:  # every edit reverted: the weights go back to the base
            joints, keys_after, filtered = [None] * len(hp.layers), {}, {}
        deltas, new = [], {}
        for joint, layer in zip(joints, hp.layers, strict=True):
            target = joint.apply(base[layer]) if joint is not None else base[layer]
            name, transposed = layout.weight_name(layer), layout.is_transposed(model, layer)
            if joint is not None:
                name, transposed = joint.name, joint.transposed
            delta = MatrixDelta.from_dense(name, target - current[layer], transposed)
            new[layer] = delta.apply(current[layer])
            layout.set_weight(model, layer, new[layer])
            deltas.append(delta)
        takes_after = editor.timed(seconds, "efficacy_after", success)
        lost = int(((took_before >= 0.5) & (takes_after < 0.5)).sum())
        if max_lost is not None and lost > max_lost:
            raise CompactionRefused(
                f"compaction of {len(live)} edits would lose {lost} that take now (allowed: {max_lost})"
            )
        if accept is not None:
            editor.timed(seconds, "accept", lambda: accept(model))
    except BaseException:
        editor.reset_weights()
        raise
    state = editor.state
    state.weights.update(new)
    state.prev_keys_cov.clear()
    state.prev_keys.clear()
    editor.accumulate_keys(keys_after)
    state.n_batches += 1
    after = [bool(x >= 0.5) for x in takes_after.tolist()]
    result = BatchResult(
        [], list(hp.layers), deltas, keys_after, torch.empty(0), [], 0, seconds, filtered,
        guard_efficacy=sum(after) / len(after) if after else 1.0, diagnostics={"compacted_edits": float(len(live))},
        compacted=True,
    )
    return Compacted(result, live.requests, [bool(x >= 0.5) for x in took_before.tolist()], after)


def live_edits(store: WeightStore, version: int, exclude: Iterable[str] = ()) -> LiveEdits:
    """The live edits of ``version``'s lineage with their stored v*, oldest first (compactions write none), without
    the edits a revert on the lineage took out, nor ``exclude``."""
    pairs: list[tuple[EditRequest, torch.Tensor]] = []
    chain = lineage(store, version)
    gone = set(exclude) | {e for m in chain for e in m.reverted_edit_ids}
    for manifest in chain:
        if manifest.kind != "edit":
            continue
        _, aux = store.deltas(manifest.version)
        targets = aux.get(TARGETS_AUX)
        if not manifest.edits or targets is None or targets.shape[0] != len(manifest.edits):
            raise StoreError(
                f"version {manifest.version} records no edits with their v* (written before compaction existed, or "
                "by an algorithm without v*): this lineage cannot be compacted"
            )
        pairs += [(r, t) for r, t in zip(manifest.edits, targets, strict=True) if r.edit_id not in gone]
    return LiveEdits.latest(pairs)
