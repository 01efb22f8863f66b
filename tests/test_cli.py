"""The CLI rejects bad input with a clear message and exit code 2, before loading any model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from controller.cli import app

runner = CliRunner()


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args])


def test_missing_data_file(tmp_path) -> None:
    result = _eval("--data", str(tmp_path / "nope.json"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_unknown_algorithm(tmp_path) -> None:
    data = tmp_path / "d.json"
    data.write_text("[]")
    result = _eval("--data", str(data), "--algo", "rome")
    assert result.exit_code == 2
    assert "memit, alphaedit" in result.output


def test_bad_record_names_record_and_field(tmp_path) -> None:
    data = tmp_path / "cf.json"
    record = {"case_id": 1, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
              "ground_truth": "Paris"}
    data.write_text(json.dumps([record, {**record, "case_id": 2, "target_new": "  "}]))
    result = _eval("--data", str(data), "--home", str(tmp_path / "home"))
    assert result.exit_code == 2
    assert "record 1" in result.output and "target_new" in result.output


def test_bad_override_syntax(tmp_path) -> None:
    data = tmp_path / "d.json"
    data.write_text("[]")
    result = _eval("--data", str(data), "--set", "layers")
    assert result.exit_code == 2
    assert "key=value" in result.output


def test_unknown_hyperparameter(tmp_path) -> None:
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": 1, "prompt": "The capital of France is", "subject": "France",
                                 "target_new": "Rome", "ground_truth": "Paris"}]))
    result = _eval("--data", str(data), "--set", "warp_factor=9", "--home", str(tmp_path / "home"))
    assert result.exit_code == 2
    assert "warp_factor" in result.output
