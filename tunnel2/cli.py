"""The ``tunnel2`` command line: argument parsing, logging set-up and ``trio.run``.

Layer: top. No logic of its own: every subcommand calls the library.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from tunnel2._util import unwrap_lone_error
from tunnel2.api import open_tunnel, serve_tunnel_server
from tunnel2.errors import HandshakeError
from tunnel2.loadtest import cli as loadtest_cli
from tunnel2.server import AGENT_PATH, ServerConfig, TunnelServer, parse_networks

logger = logging.getLogger("tunnel2.cli")


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity >= 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument(
        "-q", "--quiet", action="store_const", const=-1, dest="verbose", help="warnings only"
    )


async def _until_terminated(fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run ``fn(*args)`` until it returns or SIGTERM arrives (a clean stop, like Ctrl-C)."""
    with unwrap_lone_error():
        await _until_terminated_grouped(fn, *args)


async def _until_terminated_grouped(fn: Callable[..., Awaitable[object]], *args: object) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

        nursery.start_soon(watch_sigterm)
        await fn(*args)
        nursery.cancel_scope.cancel()


async def _run_server(config: ServerConfig) -> None:
    async with trio.open_nursery() as nursery:
        server: TunnelServer = await nursery.start(serve_tunnel_server, config)
        ws_url = server.base_url.replace("http", "ws", 1) + AGENT_PATH
        print(f"tunnel2 relay on {server.base_url} (agents connect to {ws_url})", flush=True)


def _server(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        domain=args.domain,
        public_url=args.public_url,
        tokens=frozenset(args.token) if args.token else None,
        request_timeout=args.request_timeout,
        max_body_size=args.max_body_size,
        trusted_proxies=tuple(args.trusted_proxy),  # --- forwarded addresses ---
    )
    try:
        trio.run(_until_terminated, _run_server, config)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"tunnel2 server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_http(args: argparse.Namespace) -> None:
    target = args.target if "://" in args.target else f"http://127.0.0.1:{args.target}"
    async with open_tunnel(
        args.server,
        target,
        session_id=args.session,
        token=args.token,
        max_concurrent=args.max_concurrent,
    ) as tunnel:
        print(f"Forwarding {tunnel.public_url} -> {target}", flush=True)
        await trio.sleep_forever()


def _http(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose)
    if not args.target.isdigit() and "://" not in args.target:
        print(f"tunnel2 http: {args.target!r} is neither a port nor a URL", file=sys.stderr)
        return 2
    try:
        trio.run(_until_terminated, _run_http, args)
    except KeyboardInterrupt:
        pass
    except HandshakeError as exc:
        print(f"tunnel2 http: {exc}", file=sys.stderr)
        return 1
    return 0


def _cidr(text: str) -> str:
    try:
        parse_networks((text,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every ``tunnel2`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="tunnel2", description="An embeddable HTTP tunnel for Python, built on trio."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = subparsers.add_parser("server", help="run a relay (public entry + agent endpoint)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind")
    server.add_argument("--port", type=int, default=8000, help="port to bind (0: any free)")
    server.add_argument("--domain", help="also route by Host: {session}.DOMAIN")
    server.add_argument("--public-url", help="base URL to advertise (behind a proxy)")
    server.add_argument(
        "--token", action="append", help="accept only agents with this token (repeatable)"
    )
    server.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds before 504 (default 30)"
    )
    server.add_argument("--max-body-size", type=int, help="largest request body in bytes (413)")
    # --- forwarded addresses ---
    server.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        type=_cidr,
        metavar="CIDR",
        help="a proxy in front of the relay whose X-Forwarded-For is kept (repeatable)",
    )
    _add_verbosity(server)
    server.set_defaults(func=_server)

    http = subparsers.add_parser("http", help="expose a local port or URL through a relay")
    http.add_argument("target", help="a port on 127.0.0.1, or an http://host:port URL")
    http.add_argument(
        "--server", default="http://127.0.0.1:8000", help="the relay (default %(default)s)"
    )
    http.add_argument("--session", help="ask for this fixed session id")
    http.add_argument("--token", help="the relay's agent token")
    http.add_argument(
        "--max-concurrent", type=int, default=64, help="requests answered at once (default 64)"
    )
    _add_verbosity(http)
    http.set_defaults(func=_http)

    loadtest_cli.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
