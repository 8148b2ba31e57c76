"""The layers as ARCHITECTURE.md draws them: every import, module-level or inside a function, read from
the source, points down (models <- recsys <- sources <- components <- pipelines; serving beside the
steps, on the core and models only), no step imports another step, and tests do not import benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# package -> top-level packages of the project it must never import
FORBIDDEN = {
    "models": {"recsys", "sources", "components", "serving", "pipelines", "benchmarks"},
    "recsys": {"sources", "components", "serving", "pipelines", "benchmarks"},
    "sources": {"components", "serving", "pipelines", "benchmarks"},
    "components": {"serving", "pipelines", "benchmarks"},
    "serving": {"components", "pipelines", "benchmarks"},
    "pipelines": {"serving", "benchmarks"},
    "tests": {"benchmarks"},
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    wrong = [
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in _modules(package)
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not wrong, wrong


def test_no_step_imports_another_step():
    wrong = []
    for path in _modules("components"):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "components" and len(parts) > 1 and parts[1] not in (path.stem, "__init__"):
                wrong.append(f"{path.relative_to(REPO_ROOT)}: {name}")
    assert not wrong, wrong
