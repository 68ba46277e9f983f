"""The build backend: setuptools', plus what mypyc needs when compiling.

``TUNNEL2_COMPILE=1`` in the environment of ``pip install`` or ``python -m build`` asks
``setup.py`` for the compiled build. Only then does the isolated build environment need
mypy (mypyc comes with it) and the runtime dependencies (mypyc type-checks the modules it
compiles against them), so they are added here instead of to ``[build-system]``, which
every pure-Python install would download.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the rest of the PEP 517 interface)

MYPYC = "mypy>=2.4"


def _compile_requires() -> list[str]:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    return [MYPYC, *pyproject["project"]["dependencies"]]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    if os.environ.get("TUNNEL2_COMPILE") == "1":
        # (not setuptools' answer: it runs setup.py, which imports mypyc, not there yet)
        return _compile_requires()
    requires: list[str] = _setuptools.get_requires_for_build_wheel(config_settings)
    return requires


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    if os.environ.get("TUNNEL2_COMPILE") == "1":
        return _compile_requires()
    requires: list[str] = _setuptools.get_requires_for_build_editable(config_settings)
    return requires
