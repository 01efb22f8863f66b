"""Loading any HF-format causal LM directory for editing, and fingerprinting it for caches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present so one config runs on laptops and GPU hosts alike."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(
    path: Path | str, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode with frozen parameters, and a right-padding tokenizer that has a pad token."""
    path = Path(path)
    _require_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(resolve_device(device)).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def _require_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"no model directory at {path}: run `editq models fetch` or pass --model PATH (any HF model dir)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not an HF model directory (config.json missing): run `editq models fetch` "
            "or pass --model PATH"
        )


def model_fingerprint(path: Path | str) -> str:
    """Short stable id of a model directory: config plus names, sizes and first MiB of the weight files.

    Cheap (no full hash of hundreds of MB) yet changes whenever the config or the weights' layout/header do;
    used as the cache key for per-model statistics and to check editor states against their model. The
    ``transformers_version`` a conversion wrote into the config is left out: another patch release writing the same
    model must not look like another model (nor lose its shipped statistics corpus).
    """
    path = Path(path)
    _require_model_dir(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        with weights.open("rb") as handle:
            digest.update(handle.read(1 << 20))
    return f"{path.name}-{digest.hexdigest()[:12]}"
