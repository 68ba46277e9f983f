"""Packaging: every third-party import is declared, one version source, entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import tunnel2

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared(requirements: list[str]) -> set[str]:
    names: set[str] = set()
    for requirement in requirements:
        name = requirement.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.lower().replace("_", "-"))
    return names


def _third_party_imports() -> set[str]:
    modules: set[str] = set()
    for path in (ROOT / "tunnel2").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "tunnel2"}


def test_every_imported_package_is_a_declared_dependency() -> None:
    declared = _declared(PYPROJECT["project"]["dependencies"])
    optional: set[str] = set()
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        optional |= _declared(extra)
    owners = packages_distributions()
    missing: dict[str, set[str]] = {}
    for module in _third_party_imports():
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        # pytest is imported only by tunnel2.testing's fixture, behind an ImportError guard.
        if not dists & declared and not (module == "pytest" and dists & optional):
            missing[module] = dists
    assert not missing, f"imported but not declared in [project.dependencies]: {missing}"


def test_one_version_source() -> None:
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert "version" not in PYPROJECT["project"]
    assert version("tunnel2") == tunnel2.__version__


def test_version_flag_and_python_dash_m() -> None:
    for command in (
        [sys.executable, "-m", "tunnel2", "--version"],
        [sys.executable, "-m", "tunnel2.cli", "--version"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"tunnel2 {tunnel2.__version__}"


def test_license_file_and_lowest_constraints_match_the_lower_bounds() -> None:
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    pins: dict[str, str] = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name] = pinned
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, _, lowest = requirement.partition(">=")
        assert pins.get(name) is not None, f"{name} is not tested at its lower bound"
        assert pins[name].startswith(lowest), f"{name}: tested {pins[name]}, declared {lowest}"
