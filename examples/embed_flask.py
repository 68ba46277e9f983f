"""Expose a Flask app through a tunnel from synchronous code, with ``tunnel2.connect``.

The app is served by werkzeug's WSGI server in a thread; the tunnel runs on trio in a
thread of its own. With no argument a relay runs in this process too::

    python examples/embed_flask.py                          # relay included
    python examples/embed_flask.py http://127.0.0.1:8000    # a relay you run

examples/test_embed_examples.py runs it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

from flask import Flask
from werkzeug.serving import make_server

import tunnel2

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return "Hello from Flask behind the tunnel!\n"


@contextlib.contextmanager
def exposed(server: str | None = None) -> Iterator[str]:
    """Serve ``app`` on a free port and expose it through ``server`` (or a relay of our
    own); yields the public URL, and stops everything after the block."""
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        with contextlib.ExitStack() as stack:
            if server is None:
                relay = stack.enter_context(tunnel2.start_relay(tunnel2.ServerConfig(port=0)))
                server = relay.base_url
            tunnel = stack.enter_context(tunnel2.connect(http.server_port, server=server))
            yield tunnel.public_url
    finally:
        http.shutdown()
        thread.join()
        http.server_close()


if __name__ == "__main__":
    with exposed(sys.argv[1] if len(sys.argv) > 1 else None) as url:
        print(f"Flask app at {url} (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
