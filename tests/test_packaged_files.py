"""Every module-level path a package builds from its own ``__file__`` names a file that is there. Moving a module
one folder down once pointed the alert rules and the canary's control facts at files that did not exist, and the
code that read them fell back quietly; this finds such a path on the source, without Prometheus or a model."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def file_relative_constants() -> list[tuple[str, str]]:
    """(module, name) of each top-level ``NAME = ...__file__...`` in controller/, workers/ and shared/."""
    found = []
    for package in ("controller", "workers", "shared"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in tree.body:
                if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                    continue
                target = node.targets[0]
                uses_file = any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node.value))
                if isinstance(target, ast.Name) and uses_file:
                    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                    found.append((module, target.id))
    return found


CONSTANTS = file_relative_constants()


def test_the_scan_finds_the_paths_that_moved_before() -> None:
    assert {("controller.cli.prometheus_setup", "ALERTS"),
            ("controller.rollout.rolling", "DEFAULT_CONTROL_FACTS_FILE")} <= set(CONSTANTS)


@pytest.mark.parametrize(("module", "name"), CONSTANTS, ids=[f"{m}.{n}" for m, n in CONSTANTS])
def test_a_file_relative_path_exists(module: str, name: str) -> None:
    value = getattr(importlib.import_module(module), name)
    assert isinstance(value, Path), f"{module}.{name} is {type(value).__name__}, not a Path"
    assert value.exists(), f"{module}.{name} = {value} does not exist"


def test_a_prometheus_config_without_its_alert_rules_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json

    from controller.cli.prometheus_setup import write_local_config

    shipped = json.loads(write_local_config(tmp_path / "a", "127.0.0.1:1", None, None).read_text())
    assert shipped["rule_files"] and Path(shipped["rule_files"][0]).is_file()
    with caplog.at_level("WARNING", logger="editq.prometheus"):
        config = json.loads(write_local_config(tmp_path / "b", "127.0.0.1:1", None, None,
                                               alerts=tmp_path / "gone.yml").read_text())
    assert "rule_files" not in config and "no alert rules at" in caplog.text
