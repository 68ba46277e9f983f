"""Shared pieces of the embedding tests (sync, asyncio, test runners): apps, a relay, a
silent listener, a blocking fetch. Imported by name, like ``httpbackend``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from http.server import HTTPServer
from pathlib import Path
from typing import Any
from wsgiref import simple_server

from werkzeug.serving import make_server

import tunnel2

Message = MutableMapping[str, Any]

#: Seconds any single blocking step of these tests may take before it fails.
STEP_TIMEOUT = 30.0


async def hello_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """An ASGI app that answers ``hello <path>``."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": f"hello {scope['path']}".encode()})


def fetch(url: str) -> tuple[int, str]:
    """GET ``url``: the status and the body text, also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=STEP_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def sync_relay(**options: Any) -> Iterator[tunnel2.sync.Relay]:
    """A relay on 127.0.0.1 port 0 from :func:`tunnel2.start_relay`, closed after."""
    config = tunnel2.ServerConfig(port=0, drain_timeout=1.0, grace_period=0.0, **options)
    with tunnel2.start_relay(config) as relay:
        yield relay


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung relay)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@contextmanager
def wsgi_server(app: Any, *, wsgiref: bool = False) -> Iterator[int]:
    """Serve a WSGI app in a thread with werkzeug's real server, or (``wsgiref``) the
    standard library's (HTTP/1.0, one request at a time); yields its port."""
    server: HTTPServer
    if wsgiref:
        server = simple_server.make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    else:
        server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(STEP_TIMEOUT)
        server.server_close()


class _QuietHandler(simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def tunnel_threads(*, join: bool = False) -> list[str]:
    """Names of the threads tunnel2 handles are running (after joining them, if ``join``:
    a block that was left may still be returning from its thread's function)."""
    threads = [t for t in threading.enumerate() if t.name.startswith("tunnel2-")]
    for thread in threads if join else ():
        thread.join(STEP_TIMEOUT)
    return [t.name for t in threads if t.is_alive()]


def run_python(
    code: str, *, repl: bool = False, args: tuple[str, ...] = ("-i",)
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter that can import this directory's helpers: as a
    ``-c`` script, or (``repl``) typed into ``python ARGS`` (``-i``, ``-m asyncio``)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    code = textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, *args] if repl else [sys.executable, "-c", code],
        input=code if repl else None,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
