"""Packaging: every third-party import is declared, one version source, entry points."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import tomllib
from importlib.metadata import metadata, packages_distributions, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tunnel2
from tunnel2._util import compiled_modules

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_COMPILED = ", ".join(name.removeprefix("tunnel2.") for name in compiled_modules())
COMPILED_SUFFIX = f" (compiled: {_COMPILED})" if _COMPILED else ""


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
        tree = ast.parse(path.read_text())
        # Imports under `if TYPE_CHECKING:` are for mypy (and mypyc) only.
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
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
        assert result.stdout.strip() == f"tunnel2 {tunnel2.__version__}" + COMPILED_SUFFIX


def _setup_py_compiled() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "COMPILED":
            paths: list[str] = ast.literal_eval(node.value)
            return sorted(path.removesuffix(".py").replace("/", ".") for path in paths)
    raise AssertionError("setup.py has no COMPILED list")


def test_the_build_is_the_one_asked_for() -> None:
    # .ci/run installs one build with TUNNEL2_COMPILE=1 and runs the suite against it with
    # that variable still set: this test makes sure those runs did test compiled modules
    # (and that the others did not).
    expected = _setup_py_compiled() if os.environ.get("TUNNEL2_COMPILE") == "1" else []
    assert compiled_modules() == expected


def test_license_file_and_lowest_constraints_match_the_lower_bounds() -> None:
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    # An SPDX expression, not the TOML table setuptools stops accepting in 2027.
    assert metadata("tunnel2")["License-Expression"] == "MIT"
    pins: dict[str, str] = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name] = pinned
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, _, lowest = requirement.partition(">=")
        assert pins.get(name) is not None, f"{name} is not tested at its lower bound"
        assert pins[name].startswith(lowest), f"{name}: tested {pins[name]}, declared {lowest}"


def _backend() -> Any:
    path = ROOT / "_build" / "backend.py"
    spec = importlib.util.spec_from_file_location("_tunnel2_backend", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_backend_asks_for_mypyc_only_when_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend()
    assert PYPROJECT["build-system"]["build-backend"] == "backend"
    assert PYPROJECT["build-system"]["backend-path"] == ["_build"]
    monkeypatch.setenv("TUNNEL2_COMPILE", "1")
    compiling = [backend.MYPYC, *PYPROJECT["project"]["dependencies"]]
    assert backend.MYPYC.startswith("mypy>=")
    assert backend.get_requires_for_build_wheel() == compiling
    assert backend.get_requires_for_build_editable() == compiling
    # Otherwise setuptools' own answers, untouched (stubbed: they would run setup.py here).
    monkeypatch.delenv("TUNNEL2_COMPILE")
    monkeypatch.setattr(backend._setuptools, "get_requires_for_build_wheel", lambda _: ["w"])
    monkeypatch.setattr(backend._setuptools, "get_requires_for_build_editable", lambda _: ["e"])
    assert backend.get_requires_for_build_wheel() == ["w"]
    assert backend.get_requires_for_build_editable() == ["e"]
