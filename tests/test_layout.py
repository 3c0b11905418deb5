"""The layout holds: the maths packages (DINO, few-shot) import neither Ray nor MLflow nor the integration layers,
so they run and are tested without a cluster or a tracking server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metallo_core"
MATHS_PACKAGES = ("ssl", "fewshot")
FORBIDDEN = ("ray", "mlflow", "metallo_core.train", "metallo_core.tracking", "metallo_core.tuning")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden_imports(path: Path) -> list[str]:
    return sorted(name for name in imported_modules(path)
                  if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN))


@pytest.mark.parametrize("package", MATHS_PACKAGES)
def test_maths_packages_import_no_orchestration(package):
    offenders = {str(path.relative_to(PACKAGE)): forbidden_imports(path)
                 for path in sorted((PACKAGE / package).rglob("*.py"))}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_check_sees_function_level_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import ray.train\n    from metallo_core import tracking\n")
    assert forbidden_imports(sample) == ["metallo_core.tracking", "ray.train"]
