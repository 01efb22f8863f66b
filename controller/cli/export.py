"""``editq export``: a committed weight version as a normal HF model directory (``vllm serve DIR`` or
``AutoModelForCausalLM.from_pretrained(DIR)`` load it as is) or as only its changed matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from controller.cli.common import console, fail
from shared.settings import Settings
from shared.weight_store import LocalWeightStore, StoreError


def export(
    version: Annotated[int, typer.Option("--version", "-v", min=0, help="The committed version to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New (or empty) output directory.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="hf: full model directory; delta: changed matrices.")]
    = "hf",
    model: Annotated[Path | None, typer.Option(help="Base model directory (default: the configured model).")] = None,
) -> None:
    """Write a weight version out, checksummed, with the list of edits it holds (editq_export.json)."""
    from workers.export import ExportError, export_version  # torch: only when exporting

    if fmt not in ("hf", "delta"):
        fail(f"--format must be 'hf' or 'delta', got {fmt!r}")
    settings = Settings()
    store = LocalWeightStore(settings.resolved_store_dir())
    model_dir = model or settings.resolved_model_path()
    kind: Literal["hf", "delta"] = "hf" if fmt == "hf" else "delta"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"exporting version {version} ({kind})", total=None)
        try:
            manifest = export_version(store, model_dir, version, out, kind,
                                      progress=lambda shard: bar.update(task, description=f"writing {shard}"))
        except (StoreError, ExportError, FileNotFoundError) as err:
            fail(str(err))
    console.print(f"version {version}: {len(manifest.edits)} edits, {len(manifest.matrices)} changed matrices, "
                  f"{len(manifest.files)} files in {out} (checksums in editq_export.json)")
    if kind == "hf":
        console.print(f"serve it with: vllm serve {out}")
