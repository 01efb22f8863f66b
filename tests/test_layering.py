"""The house rules, checked on the source: imports point one way (controller -> workers -> shared; inside the
controller cli -> api -> pipeline -> rollout) and the math imports no Ray, Redis or vLLM. Every import counts,
including the ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


RULES = [
    ("shared", ("controller", "workers")),
    ("workers", ("controller",)),
    ("workers/editing", ("ray", "redis", "vllm")),
    ("workers/guards", ("ray", "redis", "vllm", "workers.editing")),
    ("controller/rollout", ("controller.pipeline", "controller.api", "controller.cli")),
    ("controller/pipeline", ("controller.api", "controller.cli")),
    ("controller/api", ("controller.cli",)),
    ("controller/security", ("controller.pipeline", "controller.rollout", "controller.api", "controller.cli")),
]


@pytest.mark.parametrize(("folder", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_imports_point_one_way(folder: str, forbidden: tuple[str, ...]) -> None:
    assert (ROOT / folder).is_dir()
    assert violations(folder, forbidden) == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from controller.cli import main\n    import ray.util\n")
    assert {"controller.cli", "controller.cli.main", "ray.util"} <= imported_modules(module)


def test_controller_modules_live_in_their_stage() -> None:
    """No module floats at the controller's top level: each one belongs to a stage's subpackage."""
    loose = [p.name for p in (ROOT / "controller").glob("*.py") if p.name != "__init__.py"]
    assert loose == []
