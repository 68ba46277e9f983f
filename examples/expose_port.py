"""Expose a local HTTP port through a tunnel2 relay.

With no arguments it is self-contained: it starts a relay on 127.0.0.1:8000 and a tiny demo
backend in this process, exposes the backend, prints the public URL and serves until Ctrl-C
(or SIGTERM)::

    python examples/expose_port.py
    curl http://127.0.0.1:8000/session/<id>/

With ``--server URL --port N`` it exposes a real local port through a relay running
elsewhere (``tunnel2 server``)::

    python examples/expose_port.py --server http://127.0.0.1:8000 --port 8080
"""

from __future__ import annotations

import argparse
import functools
import sys

import trio

import tunnel2


async def _demo_backend(stream: trio.SocketStream) -> None:
    """A minimal HTTP/1.1 server: answers every request with a greeting."""
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode("ascii", "replace")
            body = f"Hello from behind the tunnel! You asked for {path}\n".encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
    except trio.BrokenResourceError:
        pass


async def run_demo(port: int) -> None:
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(tunnel2.serve_tunnel_server, tunnel2.ServerConfig(port=port))
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _demo_backend, 0, host="127.0.0.1")
        )
        backend_port = listeners[0].socket.getsockname()[1]
        async with tunnel2.open_tunnel(relay.base_url, backend_port) as tunnel:
            print(f"relay:   {relay.base_url}")
            print(f"backend: http://127.0.0.1:{backend_port}")
            print(f"public:  {tunnel.public_url}", flush=True)
            print("Ctrl-C to stop.", flush=True)
            await trio.sleep_forever()


async def run_remote(server: str, port: int, session: str | None) -> None:
    async with tunnel2.open_tunnel(server, port, session_id=session) as tunnel:
        print(f"Forwarding {tunnel.public_url} -> http://127.0.0.1:{port}", flush=True)
        await trio.sleep_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="a relay URL; without it a relay runs in-process")
    parser.add_argument("--port", type=int, help="the local port to expose (with --server)")
    parser.add_argument("--session", help="ask the relay for this fixed session id")
    parser.add_argument(
        "--relay-port", type=int, default=8000, help="port of the in-process relay (demo mode)"
    )
    args = parser.parse_args()
    if args.server and args.port is None:
        parser.error("--server needs --port")
    # Ctrl-C and SIGTERM reach the run through a signal receiver, and cancel it
    # (tunnel2.until_signalled): never as a KeyboardInterrupt raised wherever the program is.
    try:
        if args.server:
            trio.run(tunnel2.until_signalled, run_remote, args.server, args.port, args.session)
        else:
            trio.run(tunnel2.until_signalled, run_demo, args.relay_port)
    except BaseException as exc:  # trio wraps what its tasks raise in exception groups
        error = _lone(exc)
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C before the signal receiver is open
            print("expose_port: stopped", file=sys.stderr)
            return 0
        if isinstance(error, (tunnel2.TunnelError, OSError)):
            print(f"expose_port: {error}", file=sys.stderr)
            return 1
        raise
    print("expose_port: stopped", file=sys.stderr)
    return 0


def _lone(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups of one (or ``exc`` itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
