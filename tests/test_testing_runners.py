"""Tests for :mod:`tunnel2.testing` under every test runner, and its sync helper.

The README's example test is copied verbatim into a fresh project (a tmp dir holding only
that file, and a pyproject only where the runner needs its config) and run by pytest in a
subprocess under pytest-trio (``trio_mode`` and ``@pytest.mark.trio``), anyio (both
backends) and pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import trio
from apps.flask_app import app as flask_app
from embed_helpers import STEP_TIMEOUT, hello_app, tunnel_threads, wsgi_server

from tunnel2.testing import open_memory_tunnel_here, sync_memory_tunnel

README = Path(__file__).parent.parent / "README.md"

Message = MutableMapping[str, Any]


def readme_test() -> str:
    """The first Python block of README's "Test through a tunnel with no sockets"."""
    section = README.read_text().split("## Test through a tunnel with no sockets", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


ANYIO_BOTH_BACKENDS = """\
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
"""

RUNNERS = {
    # runner: (pyproject's [tool.pytest.ini_options] body, lines above the README's code,
    #          tests expected to pass)
    "trio_mode": ("trio_mode = true\n", "", 1),
    "mark.trio": ("", "import pytest\npytestmark = pytest.mark.trio\n", 1),
    "mark.anyio": ("", "import pytest\npytestmark = pytest.mark.anyio\n" + ANYIO_BOTH_BACKENDS, 2),
    "mark.asyncio": ("", "import pytest\npytestmark = pytest.mark.asyncio\n", 1),
}


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_readme_test_passes_under(runner: str, tmp_path: Path) -> None:
    ini, header, expected = RUNNERS[runner]
    if ini:
        (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n" + ini)
    (tmp_path / "test_readme.py").write_text(header + "\n\n" + readme_test())
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_readme.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{expected} passed" in done.stdout, done.stdout


async def hang_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Answers ``/slow`` never (its code runs on asyncio), the rest at once."""
    if scope["path"] == "/slow":
        await asyncio.sleep(3600)
    await hello_app(scope, receive, send)


def test_the_fixture_bridges_asyncio_and_survives_a_cancelled_request() -> None:
    async def main() -> None:
        async with open_memory_tunnel_here(hang_app) as tunnel:
            assert tunnel.public_url == f"http://relay.test{tunnel.path_prefix}/"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(tunnel.request("GET", "/slow"), 0.2)
            response = await tunnel.request("GET", "/fast")
            assert (response.status, response.text) == (200, "hello /fast")
            assert type(tunnel).__name__ == "AioMemoryTunnel"

    asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))
    assert tunnel_threads(join=True) == []


async def test_the_fixture_is_the_native_memory_tunnel_under_trio() -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel_here(hello_app) as tunnel:
            response = await tunnel.request("GET", "/t")
            assert type(tunnel).__name__ == "MemoryTunnel"
    assert (response.status, response.text) == (200, "hello /t")


def test_sync_memory_tunnel_with_an_asgi_app() -> None:
    with sync_memory_tunnel(hello_app) as tunnel:
        response = tunnel.request("GET", "/sync", headers=[("X-A", "1")])
        assert tunnel.public_url.endswith(tunnel.path_prefix + "/")
    assert (response.status, response.text) == (200, "hello /sync")
    assert tunnel.closed
    assert tunnel_threads() == []


def test_sync_memory_tunnel_with_a_port_of_a_flask_server() -> None:
    with wsgi_server(flask_app) as port, sync_memory_tunnel(port) as tunnel:
        response = tunnel.request("GET", "/items/3")
    assert (response.status, response.body) == (200, b'{"item":3}\n')
    assert response.header("content-type") == "application/json"


def test_a_sync_request_that_takes_too_long_times_out() -> None:
    with sync_memory_tunnel(hang_app) as tunnel:
        with pytest.raises(TimeoutError):
            tunnel.request("GET", "/slow", timeout=0.2)
        assert tunnel.request("GET", "/fast").status == 200
