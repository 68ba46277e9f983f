"""Suite-wide set-up: relays started by tests (in process or as ``tunnel2 server``
subprocesses) keep their state in a temporary directory, never in the user's
``~/.local/state/tunnel2``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_home() -> Iterator[None]:
    home = tempfile.mkdtemp(prefix="tunnel2-test-state-")
    saved = {name: os.environ.get(name) for name in ("XDG_STATE_HOME", "TUNNEL2_STATE_DIR")}
    os.environ["XDG_STATE_HOME"] = home
    os.environ.pop("TUNNEL2_STATE_DIR", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(home, ignore_errors=True)
