"""The CLI rejects bad input with a clear message and exit code 2, before loading any model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from controller.cli.main import app

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


def test_submit_queues_valid_records_and_rejects_bad_ones_by_field(tmp_path, redis_url, monkeypatch) -> None:
    """`editq submit` names the record and field of each bad edit, queues the rest, exits 1; `status` follows."""
    import uuid

    from redis import Redis

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("EDITQ_REDIS_URL", redis_url)
    monkeypatch.setenv("EDITQ_NAMESPACE", namespace)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps(r) for r in [
        {"edit_id": "ok-1", "subject": "Acme", "prompt": "The CEO of {} is", "target_new": "Jane Doe"},
        {"edit_id": "bad-1", "subject": "Acme", "prompt": "The CEO of Globex is", "target_new": "Jane"},
        {"edit_id": "bad-2", "subject": "Acme", "prompt": "The CEO of {} is"},
    ]) + "\n")
    try:
        result = runner.invoke(app, ["submit", str(edits)])
        assert result.exit_code == 1, result.output
        assert "record 1" in result.output and "subject" in result.output
        assert "record 2" in result.output and "target_new" in result.output
        assert "queued ok-1" in result.output and "1 queued, 0 duplicate, 2 rejected" in result.output
        again = runner.invoke(app, ["submit", str(edits), "--limit", "1"])
        assert "duplicate ok-1" in again.output
        status = runner.invoke(app, ["status", "ok-1"])
        assert status.exit_code == 0 and "queued" in status.output
        assert runner.invoke(app, ["status", "bad-1"]).exit_code == 1
    finally:
        client = Redis.from_url(redis_url)
        for key in client.scan_iter(match="{" + namespace + "}:*"):
            client.delete(key)


def test_stats_computes_once_then_is_instant(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """`editq stats` computes the statistics the worker will look up (same cache key), says from what text, and a
    second run finds them cached without loading the model; a --stats-corpus file gets its own cache."""
    from controller.cli.common import console
    from workers.model_io import model_fingerprint

    monkeypatch.setattr(console, "width", 400)  # long temp paths: no wrapping inside the checked phrases
    monkeypatch.setenv("EDITQ_HPARAMS_PATH", str(tiny_model_dir / "hparams.json"))  # layers 1, 2; 32 x 16 texts
    home = tmp_path / "home"
    args = ["stats", "--home", str(home), "--model", str(tiny_model_dir)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "sampled from the model now (32 x 16 tokens)" in first.output and "key statistics ready" in first.output
    stats_dir = home / "stats" / model_fingerprint(tiny_model_dir) / "self-32x16-seed0"
    files = sorted(p.name for p in stats_dir.glob("*.mom2.safetensors"))
    assert files == ["model.layers.1.mlp.down_proj.mom2.safetensors", "model.layers.2.mlp.down_proj.mom2.safetensors"]
    mtimes = {p: p.stat().st_mtime_ns for p in stats_dir.iterdir()}

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "cached in" in again.output and "ready" not in again.output
    assert {p: p.stat().st_mtime_ns for p in stats_dir.iterdir()} == mtimes

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the capital of france is paris\n\nthe eiffel tower is located in paris , france\n")
    own = runner.invoke(app, [*args, "--stats-corpus", str(corpus)])
    assert own.exit_code == 0, own.output
    assert f"corpus file {corpus}" in own.output
    assert len(list(stats_dir.parent.glob("file-*/*.mom2.safetensors"))) == 2

    missing = runner.invoke(app, [*args, "--stats-corpus", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())
