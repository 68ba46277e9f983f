"""Serve an ASGI app through a tunnel with no local port at all.

Run a relay (``tunnel2 server``), then ``python examples/embed_asgi.py``: the app below
answers at the printed public URL, called in-process by the agent.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

import tunnel2

Message = MutableMapping[str, Any]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """A tiny ASGI 3 app: greets and says which path it got."""
    if scope["type"] != "http":
        return
    body = f"Hello from an in-process ASGI app at {scope['path']}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def main(server: str) -> None:
    async with tunnel2.open_tunnel(server, app) as tunnel:
        print(f"Serving the ASGI app at {tunnel.public_url}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the receiver is open
        server = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
        trio.run(tunnel2.until_signalled, main, server)  # until Ctrl-C or SIGTERM
