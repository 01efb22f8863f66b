"""Collapse guards for sequential editing: REVIVE (spectral filter), PRUNE (singular-value restraint), the norm cap
(drift anchor), the per-batch policy that rejects a batch the guard would weaken too much, and per-matrix collapse
metrics. The math modules (``revive``, ``prune``, ``norm_cap``, ``collapse``) use plain tensors only."""

from workers.guards.policy import COLLAPSE_RISK, GuardRejection

__all__ = ["COLLAPSE_RISK", "GuardRejection"]
