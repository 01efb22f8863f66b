"""Payloads of the Ray calls between the controller and the edit workers.

Tensors cross this boundary inside ``MatrixDelta`` (the shared delta format) and the v* shards; everything else is
validated data, so a worker and a controller of different builds fail loudly instead of misreading each other.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from shared.delta import MatrixDelta
from shared.schemas import EditRequest
from shared.weight_store import ReferenceAnswers


class StoreMeta(BaseModel):
    """What every version in a store was made with; workers refuse a store made for another model or editor."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    algo: str
    hparams: dict
    templates: list[str]


class WorkerConfig(BaseModel):
    """Everything an edit worker needs to start; ``settings`` is a dump of ``shared.settings.Settings``."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    settings: dict
    meta: StoreMeta | None = None  # None only for the first worker of a new store, which then defines it


class WorkerInfo(BaseModel):
    index: int
    version: int
    device: str
    checksums: dict[str, str]
    meta: StoreMeta


class ValuesJob(BaseModel):
    """v* for one shard of a batch, on the worker's model at ``version``."""

    version: int
    requests: list[EditRequest]


class ValuesShard(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    targets: torch.Tensor
    deltas: torch.Tensor
    nll: torch.Tensor
    steps: int
    seconds: dict[str, float]


class EditJob(BaseModel):
    """Apply one batch on top of ``parent`` to make ``version`` (leader only)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    parent: int
    version: int
    requests: list[EditRequest]
    shards: list[ValuesShard] | None = None  # precomputed v* of the requests, in order; None: compute here


class CompactJob(BaseModel):
    """Re-solve every live edit of ``parent``'s lineage jointly on the base weights to make ``version``."""

    parent: int = Field(ge=0)
    version: int = Field(ge=1)
    max_lost: int | None = Field(default=0, ge=0, description="Refuse when more edits that take now would stop "
                                 "taking (None: never refuse for that).")
    exclude: list[str] = Field(default_factory=list, description="Edits to take out of the weights (a revert).")


class EditResult(BaseModel):
    """The leader's update for one batch, in the stored format, plus what the manifest records."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    version: int
    parent: int
    edit_ids: list[str]
    deltas: list[MatrixDelta]
    aux: dict[str, torch.Tensor]  # tensors that travel with the version (edited keys per layer)
    checksums: dict[str, str]  # sha256 of every changed matrix after the update
    v_nll: list[float]
    seconds: dict[str, float]
    metrics: dict[str, float] = Field(default_factory=dict)
    # edits whose update did not make them take on their own prompt (empty when the check is off)
    missed_edit_ids: list[str] = Field(default_factory=list)
    # greedy answers of the leader's model (exactly the committed weights) on the fixed probe set; every replica
    # must reproduce them (None when they could not be computed: the replicas then skip the check, logged)
    reference: ReferenceAnswers | None = None
    kind: str = "edit"  # "compaction" / "revert": ``edit_ids`` empty, ``metrics`` holds the joint solve's record
