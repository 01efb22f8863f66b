"""When the health budget is spent, stop paying to hear it again: a back-off on trying the weights.

Every batch the health budget refuses costs a full edit (v* optimisation, solve, health scoring: about 1.5 s per edit
on a CPU, a GPU-second or so on a GPU) and changes nothing: the model stays as it was and the edits go to the
retrieval tier. The budget is measured against the *base* model, so once a few batches in a row are refused on one
version, the next ones almost surely will be too. Past ``patience`` refusals on the same parent version, the weights
are tried again only after 1, 2, 4, ... skipped batches (at most ``max_skip``); the skipped batches go straight to
the tier with reason ``health_budget``. Any new parent version (a batch accepted, a revert, a compaction) starts
afresh. Plain state, no I/O: the controller and the lifelong benchmark use the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BudgetBackoff:
    patience: int = 3  # refusals in a row on one version before batches are skipped; 0: always try the weights
    max_skip: int = 32
    parent: int | None = None
    refusals: int = 0
    skipped: int = 0

    def _on(self, parent: int) -> None:
        if parent != self.parent:
            self.parent, self.refusals, self.skipped = parent, 0, 0

    def wait(self) -> int:
        """Batches still to skip before the weights are tried again on this version."""
        if self.patience <= 0 or self.refusals < self.patience:
            return 0
        return max(0, min(2 ** (self.refusals - self.patience), self.max_skip) - self.skipped)

    def should_try(self, parent: int) -> bool:
        """Whether the next batch on ``parent`` should be edited into the weights; a ``False`` counts as a skip."""
        self._on(parent)
        if self.wait() == 0:
            return True
        self.skipped += 1
        return False

    def refused(self, parent: int) -> None:
        """The budget refused a batch computed on ``parent``."""
        self._on(parent)
        self.refusals += 1
        self.skipped = 0

    def describe(self) -> str:
        return (f"the health budget refused the last {self.refusals} batches on v{self.parent}; the weights are "
                f"tried again after {self.wait()} more batch(es)")
