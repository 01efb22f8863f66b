"""Forward hooks that read and patch hidden states, for decoder layers that return a tensor *or* a tuple.

Recent transformers decoder layers return a plain tensor; older ones (and GPT-2 blocks) a tuple. A hook written
for tuples would index batch element 0 of a tensor and silently edit the wrong thing, so both forms are explicit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Literal

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been captured."""


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def add_at_positions(
    block: nn.Module, rows: torch.Tensor, cols: torch.Tensor, vectors: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """Add ``vectors()[j]`` to the block's output at ``(rows[j], cols[j])`` (out of place, keeps autograd)."""

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        hidden = _hidden(output)
        patched = hidden.index_put((rows, cols), vectors().to(hidden.dtype), accumulate=True)
        return _replace_hidden(output, patched)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(
    targets: dict[str, tuple[nn.Module, Literal["input", "output"]]], *, stop_after: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named module's first input or its (hidden) output; optionally stop after one of them."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, (module, kind) in targets.items():

        def hook(
            _m: nn.Module, args: tuple, output: torch.Tensor | tuple, name: str = name, kind: str = kind
        ) -> None:
            store[name] = (args[0] if kind == "input" else _hidden(output)).detach()
            if name == stop_after:
                raise StopForward

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_until_stopped(fn: Callable[[], object]) -> None:
    """Run a forward that may end early through ``StopForward``."""
    with suppress(StopForward):
        fn()
