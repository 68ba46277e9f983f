"""The ``tunnel2`` command line: argument parsing, logging set-up and ``trio.run``.

Layer: top. No logic of its own: every subcommand calls the library.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import trio

from tunnel2 import __version__, _config
from tunnel2._tls import server_context
from tunnel2._util import (
    compiled_modules,
    domain_name,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
    unwrap_lone_error,
)
from tunnel2.access import AccessPolicy
from tunnel2.agent import AgentConfig, websocket_connector
from tunnel2.api import handler_for, open_tunnel, serve_tunnel_server
from tunnel2.backend import check_host_header
from tunnel2.errors import HandshakeError
from tunnel2.loadtest import cli as loadtest_cli
from tunnel2.observe import AccessLogObserver, JsonFormatter, Observer, request_logger
from tunnel2.server import AGENT_PATH, ServerConfig, TunnelServer, load_tokens, parse_networks
from tunnel2.tokens import TokenError

logger = logging.getLogger("tunnel2.cli")


def _configure_logging(verbosity: int, log_format: str = "text") -> None:
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity >= 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _observers(log_format: str) -> list[Observer]:
    """The access log, if its lines would show (not under -q: no events built then), written
    straight to stderr in the format of the other lines: a logging record per request cost
    more instructions than the request itself (benchmarks/RESULTS.md)."""
    if not request_logger.isEnabledFor(logging.INFO):
        return []
    return [AccessLogObserver(sys.stderr, json=log_format == "json")]


def _address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) for ``--admin``."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:9100")
    return host, int(port)


def _inspecting(args: argparse.Namespace) -> bool:
    """``--inspect``/``--no-inspect``, on by default with ``--admin`` (as ngrok's :4040)."""
    return args.admin is not None if args.inspect is None else bool(args.inspect)  # --- inspect ---


def _is_admin_error(exc: OSError) -> bool:
    """True if ``exc`` is the admin endpoint's bind error (imported only then)."""
    from tunnel2.admin import AdminBindError

    return isinstance(exc, AdminBindError)


def _add_observe_options(parser: argparse.ArgumentParser) -> None:
    # --- observe: admin endpoint and log format ---
    parser.add_argument(
        "--admin",
        type=_address,
        metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz and /status here (e.g. 127.0.0.1:9100; "
        "it names sessions: never bind it publicly)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or one JSON object per line (default %(default)s)",
    )


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument(
        "-q", "--quiet", action="store_const", const=-1, dest="verbose", help="warnings only"
    )


# A second SIGINT or SIGTERM while draining stops at once, with this status (128 + SIGINT,
# as a shell reports a process stopped by Ctrl-C).
FORCED_EXIT: Final = 130


async def _until_terminated(fn: Callable[..., Awaitable[object]], *args: object) -> int:
    """Run ``fn(*args, stop)`` until it returns; return the exit status.

    The first SIGTERM or SIGINT (Ctrl-C) sets the ``stop`` event: ``fn`` then drains and
    returns, and the status is 0. A second one cancels it at once: :data:`FORCED_EXIT`.
    """
    with unwrap_lone_error():
        return await _until_terminated_grouped(fn, *args)


async def _until_terminated_grouped(fn: Callable[..., Awaitable[object]], *args: object) -> int:
    stop = trio.Event()
    forced = False
    async with trio.open_nursery() as nursery:

        async def watch_signals(task_status: trio.TaskStatus[None]) -> None:
            nonlocal forced
            # While the receiver is open, SIGINT raises no KeyboardInterrupt.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                async for signum in signals:
                    if stop.is_set():
                        logger.warning("%s again: stopping now", signal.Signals(signum).name)
                        forced = True
                        nursery.cancel_scope.cancel()
                        return
                    logger.info("%s: draining (again to stop at once)", signal.Signals(signum).name)
                    stop.set()

        await nursery.start(watch_signals)
        await fn(*args, stop)
        nursery.cancel_scope.cancel()
    return FORCED_EXIT if forced else 0


async def _run_server(
    config: ServerConfig,
    ssl_context: ssl.SSLContext | None,
    admin: tuple[str, int] | None,
    observers: list[Observer],
    stop: trio.Event,
) -> None:
    async with trio.open_nursery() as nursery:
        server: TunnelServer = await nursery.start(
            functools.partial(
                serve_tunnel_server,
                config,
                ssl_context=ssl_context,
                observers=observers,
                admin=admin,
            )
        )
        ws_url = server.base_url.replace("http", "ws", 1) + AGENT_PATH
        print(f"tunnel2 relay on {server.base_url} (agents connect to {ws_url})", flush=True)
        if server.admin_url is not None:
            logger.info(
                "admin endpoint (/metrics /healthz /readyz /status) on %s", server.admin_url
            )
        nursery.start_soon(_reload_tokens_on_sighup, server)
        await stop.wait()
        # New requests get 503 + Retry-After, agents GOAWAY; in flight ones finish.
        await server.drain()
        nursery.cancel_scope.cancel()


async def _reload_tokens_on_sighup(server: TunnelServer) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                server.reload_tokens()
            except (TokenError, OSError) as exc:
                logger.error("SIGHUP: tokens not reloaded, the old ones stay in force: %s", exc)


def _state_dir(args: argparse.Namespace) -> str | None:
    if args.no_state:
        return None
    if args.state_dir:
        return str(args.state_dir)
    return os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "tunnel2"
    )


def _server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        domain=args.domain,
        public_url=args.public_url,
        tokens=frozenset(args.token) if args.token else None,
        token_file=args.token_file,
        state_dir=_state_dir(args),
        request_timeout=args.request_timeout,
        max_body_size=args.max_body_size,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        **{field: getattr(args, field) for field, *_ in _FAIR_USE_OPTIONS},
        trusted_proxies=tuple(args.trusted_proxy),  # --- forwarded addresses ---
        # --- drain and heartbeat ---
        drain_timeout=args.drain_timeout,
        ping_interval=args.ping_interval,
        heartbeat_timeout=args.heartbeat_timeout,
    )


def _server(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose, args.log_format)
    config = _server_config(args)
    try:
        load_tokens(config)
    except (TokenError, OSError) as exc:
        print(f"tunnel2 server: bad tokens: {exc}", file=sys.stderr)
        return 2
    # --- tls ---
    ssl_context = None
    if args.tls_key and not args.tls_cert:
        print("tunnel2 server: --tls-key needs --tls-cert", file=sys.stderr)
        return 2
    if args.tls_cert:
        try:
            ssl_context = server_context(args.tls_cert, args.tls_key)
        except ValueError as exc:
            print(f"tunnel2 server: {exc}", file=sys.stderr)
            return 2
    try:
        return trio.run(
            _until_terminated,
            _run_server,
            config,
            ssl_context,
            args.admin,
            _observers(args.log_format),
        )
    except KeyboardInterrupt:  # before the signal handlers are in place
        return FORCED_EXIT
    except OSError as exc:
        where = "" if _is_admin_error(exc) else f"cannot listen on {args.host}:{args.port}: "
        print(f"tunnel2 server: {where}{exc}", file=sys.stderr)
        return 1


async def _run_http(
    args: argparse.Namespace, target: str, access: AccessPolicy | None, stop: trio.Event
) -> None:
    async with open_tunnel(
        args.server,
        target,
        session_id=args.session,
        token=args.token,
        max_concurrent=args.max_concurrent,
        access=access,
        ca_file=args.ca_file,
        insecure_transport=args.insecure_transport,
        backend_ca_file=args.backend_ca_file,
        backend_insecure=args.backend_insecure,
        drain_timeout=args.drain_timeout,
        observers=_observers(args.log_format),
        admin=args.admin,
        host_header=args.host_header,  # --- host header ---
        # --- inspect ---
        inspect=_inspecting(args),
        inspect_capacity=args.inspect_requests,
        inspect_body_bytes=args.inspect_body_bytes,
    ) as tunnel:
        if access is not None:  # on stderr: stdout stays the one Forwarding line
            logger.info("visitors need: %s", access.describe())
        print(f"Forwarding {tunnel.public_url} -> {target}", flush=True)
        if tunnel.admin_url is not None:
            logger.info(
                "admin endpoint (/metrics /healthz /readyz /status) on %s", tunnel.admin_url
            )
            if tunnel.inspector is not None:  # --- inspect ---
                logger.info("inspector (your traffic, replay) on %s/", tunnel.admin_url)
        await stop.wait()
        # The relay sends new requests to the session's other agents (or holds them for a
        # replacement); the ones in flight finish here.
        await tunnel.drain()


def _target_url(text: str) -> str:
    """``8080`` → ``http://127.0.0.1:8080``; ``localhost:8080`` → ``http://localhost:8080``;
    URLs as they are (``handler_for`` then checks them, ports included)."""
    if text.isdigit():
        return f"http://127.0.0.1:{text}"
    return text if "://" in text else f"http://{text}"


def _access_policy(args: argparse.Namespace) -> AccessPolicy | None:
    """The visitor policy of ``tunnel2 http`` (its secrets may come from the environment or
    the config file, so they need not show in ``ps``). Raises ValueError for a bad value."""
    basic, bearer = args.basic_auth or (), args.bearer_token
    if not (basic or bearer or args.allow_cidr or args.deny_cidr):
        return None
    return AccessPolicy.from_options(
        basic_auth=basic,
        bearer_token=bearer,
        allow_cidrs=args.allow_cidr or (),
        deny_cidrs=args.deny_cidr or (),
    )


def _agent_token(token_file: str) -> str:
    """The token in ``token_file``; raises ValueError saying what is wrong."""
    try:
        token = Path(token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read the token file {token_file}: {reason}") from None
    if not token or len(token.split()) != 1:
        raise ValueError(f"the token file {token_file} must hold one token, and nothing else")
    return token


def _http(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose, args.log_format)
    # --- config files and environment ---
    if args.target is None:
        print("tunnel2 http: no PORT_OR_URL (an argument, or target in --config)", file=sys.stderr)
        return 2
    if args.token_file is not None:
        try:
            args.token = _agent_token(args.token_file)
        except ValueError as exc:
            print(f"tunnel2 http: {exc}", file=sys.stderr)
            return 2
    target = _target_url(args.target)
    # --- tls ---
    try:  # what open_tunnel would refuse (clear text, CA files), said before anything runs
        websocket_connector(
            args.server, ca_file=args.ca_file, insecure_transport=args.insecure_transport
        )
        handler_for(
            target, backend_ca_file=args.backend_ca_file, backend_insecure=args.backend_insecure
        )
    except ValueError as exc:
        print(f"tunnel2 http: {exc}", file=sys.stderr)
        return 2
    try:
        access = _access_policy(args)
    except ValueError as exc:
        print(f"tunnel2 http: {exc}", file=sys.stderr)
        return 2
    if args.inspect and args.admin is None:  # --- inspect ---
        message = "--inspect needs --admin HOST:PORT (its page is there)"
        print(f"tunnel2 http: {message}", file=sys.stderr)
        return 2
    try:
        return trio.run(_until_terminated, _run_http, args, target, access)
    except KeyboardInterrupt:  # before the signal handlers are in place
        return FORCED_EXIT
    except HandshakeError as exc:
        print(f"tunnel2 http: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not _is_admin_error(exc):
            raise
        print(f"tunnel2 http: {exc}", file=sys.stderr)
        return 1


def _cap(text: str) -> int | None:
    """A positive count, or ``0`` for no cap (``None``)."""
    return None if text.strip() == "0" else positive_int(text)


# `tunnel2 server` options for the ServerConfig fields they are named after (README, "Fair
# use: limits for visitors and agents").
_FAIR_USE_OPTIONS: tuple[tuple[str, Callable[[str], object], str, str], ...] = (
    ("max_visitor_connections", positive_int, "N", "visitor connections at once, then 503"),
    ("max_agent_connections", positive_int, "N", "agent connections at once, then 503"),
    (
        "max_connections_per_ip",
        _cap,
        "N",
        "connections from one address that are not agents, then 429; 0: no cap, behind a "
        "reverse proxy",
    ),
    (
        "head_timeout",
        positive_float,
        "SECONDS",
        "for a request head from its first byte (a fresh connection's from accept), then 408",
    ),
    ("write_timeout", positive_float, "SECONDS", "for a write to a visitor that reads nothing"),
    ("idle_timeout", positive_float, "SECONDS", "for a keep-alive connection's next request"),
    (
        "max_sessions_per_identity",
        _cap,
        "N",
        "sessions one token identity may have at once (an open relay counts as one); 0: no cap",
    ),
)


def _cidr(text: str) -> str:
    try:
        parse_networks((text,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _host_header(text: str) -> str:
    """``--host-header``: ``preserve``, ``rewrite`` or a ``host[:port]``."""
    try:
        return check_host_header(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every ``tunnel2`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="tunnel2", description="An embeddable HTTP tunnel for Python, built on trio."
    )
    compiled = ", ".join(name.removeprefix("tunnel2.") for name in compiled_modules())
    version = f"tunnel2 {__version__}" + (f" (compiled: {compiled})" if compiled else "")
    parser.add_argument("--version", action="version", version=version)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = subparsers.add_parser("server", help="run a relay (public entry + agent endpoint)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind")
    server.add_argument("--port", type=port_number, default=8000, help="port to bind (0: any free)")
    server.add_argument(
        "--domain",
        type=domain_name,
        help="also route by Host: {session}.DOMAIN (e.g. localhost, for http://ID.localhost:PORT/)",
    )
    server.add_argument("--public-url", help="base URL to advertise (behind a proxy)")
    # --- ownership: tokens and state ---
    server.add_argument(
        "--token",
        action="append",
        metavar="[NAME=]TOKEN",
        help="accept agents with this token, each its own identity (repeatable; also "
        "TUNNEL2_TOKENS, comma-separated; a command line shows in ps: prefer --token-file, "
        "the environment or the config file)",
    )
    server.add_argument(
        "--token-file",
        metavar="FILE",
        help="tokens with identities and the session ids each may claim, one "
        "'TOKEN NAME [GLOB ...]' per line; re-read on SIGHUP (also TUNNEL2_TOKEN_FILE)",
    )
    server.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the relay keeps its secret and session owners across restarts "
        "(default $TUNNEL2_STATE_DIR, else $XDG_STATE_HOME/tunnel2 or ~/.local/state/tunnel2)",
    )
    server.add_argument(
        "--no-state", action="store_true", help="keep nothing across restarts (a fresh secret)"
    )
    server.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds before 504 (default 30)"
    )
    server.add_argument("--max-body-size", type=int, help="largest request body in bytes (413)")
    # --- fair use: limits for visitors and agents ---
    defaults = ServerConfig()
    for field, kind, metavar, text in _FAIR_USE_OPTIONS:
        server.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            default=getattr(defaults, field),
            metavar=metavar,
            help=text + " (default %(default)s)",
        )
    # --- tls ---
    server.add_argument(
        "--tls-cert", metavar="FILE", help="serve HTTPS and WSS with this PEM certificate chain"
    )
    server.add_argument(
        "--tls-key",
        metavar="FILE",
        help="the certificate's PEM private key (default: in --tls-cert)",
    )
    # --- forwarded addresses ---
    server.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        type=_cidr,
        metavar="CIDR",
        help="a proxy in front of the relay whose X-Forwarded-For is kept (repeatable)",
    )
    # --- drain and heartbeat ---
    server.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=defaults.drain_timeout,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, time for requests in flight (default %(default)s); "
        "a second signal stops at once",
    )
    server.add_argument(
        "--ping-interval",
        type=positive_float,
        default=defaults.ping_interval,
        metavar="SECONDS",
        help="ping an agent silent this long (default %(default)s)",
    )
    server.add_argument(
        "--heartbeat-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="an agent silent this long is dead, its requests get 502 (default: twice "
        "the ping interval)",
    )
    # --- end drain and heartbeat ---
    # --- observe: --admin, --log-format ---
    _add_observe_options(server)
    _add_verbosity(server)
    # --- config files and environment ---
    _config.add_config_option(server, "server")
    server.set_defaults(func=_server)

    http = subparsers.add_parser("http", help="expose a local port or URL through a relay")
    http.add_argument(
        "target",
        nargs="?",  # or `target` in the config file
        metavar="PORT_OR_URL",
        help="a port on 127.0.0.1, or an http(s)://host:port URL",
    )
    http.add_argument(
        "--server",
        default="http://127.0.0.1:8000",
        help="the relay (default $TUNNEL2_SERVER, else %(default)s)",
    )
    http.add_argument("--session", help="ask for this fixed session id")
    agent_token = http.add_mutually_exclusive_group()
    agent_token.add_argument(
        "--token",
        metavar="TOKEN",
        help="the relay's agent token (default $TUNNEL2_TOKEN; a command line shows in ps: "
        "prefer the environment, --token-file or the config file)",
    )
    http.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=64,
        help="requests answered at once (default 64)",
    )
    # --- visitor access ---
    http.add_argument(
        "--basic-auth",
        action="append",
        metavar="USER:PASS",
        help="visitors must log in as USER with PASS (repeatable; default: the lines of "
        "$TUNNEL2_BASIC_AUTH)",
    )
    http.add_argument(
        "--bearer-token",
        metavar="TOKEN",
        help="visitors must send 'Authorization: Bearer TOKEN' (default: $TUNNEL2_BEARER_TOKEN)",
    )
    http.add_argument(
        "--allow-cidr",
        action="append",
        metavar="CIDR",
        help="admit only visitors from this network (repeatable; IPv4 or IPv6)",
    )
    http.add_argument(
        "--deny-cidr",
        action="append",
        metavar="CIDR",
        help="turn away visitors from this network, even if allowed (repeatable)",
    )
    # --- end visitor access ---
    # --- tls ---
    http.add_argument(
        "--ca-file", metavar="FILE", help="trust only these CA certificates (PEM) for the relay"
    )
    http.add_argument(
        "--insecure-transport",
        action="store_true",
        help="allow an http:// relay that is not on loopback (token and traffic in clear text)",
    )
    http.add_argument(
        "--backend-ca-file",
        metavar="FILE",
        help="trust only these CA certificates (PEM) for an https:// target",
    )
    http.add_argument(
        "--backend-insecure",
        action="store_true",
        help="accept any certificate from an https:// target",
    )
    # --- drain ---
    http.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=AgentConfig().drain_timeout,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, time for requests in flight while the relay sends new "
        "ones to the session's other agents (default %(default)s); a second signal stops "
        "at once",
    )
    # --- end drain ---
    # --- host header ---
    http.add_argument(
        "--host-header",
        type=_host_header,
        metavar="preserve|rewrite|HOST[:PORT]",
        help="the Host the target gets: the public one (preserve, default for http), the "
        "target's own host:port (rewrite, for dev servers that check Host; default for "
        "https), or this value; the public Host stays in X-Forwarded-Host",
    )
    # --- end host header ---
    # --- observe: --admin, --log-format ---
    _add_observe_options(http)
    # --- inspect ---
    http.add_argument(
        "--inspect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep recent requests for the inspector page and replay at the --admin address "
        "(default: on when --admin is given)",
    )
    http.add_argument(
        "--inspect-requests",
        type=positive_int,
        default=AgentConfig().inspect_capacity,
        metavar="N",
        help="requests the inspector keeps (default %(default)s)",
    )
    http.add_argument(
        "--inspect-body-bytes",
        type=non_negative_int,
        default=AgentConfig().inspect_body_bytes,
        metavar="N",
        help="bytes of each body it keeps (default %(default)s)",
    )
    # --- end inspect ---
    _add_verbosity(http)
    # --- config files and environment ---
    agent_token.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the agent token from this file (all of it, surrounding white space "
        "ignored; e.g. a systemd or Docker credential)",
    )
    _config.add_config_option(http, "http")
    http.set_defaults(func=_http)

    loadtest_cli.add_parsers(subparsers)
    return parser


# Older and shorter names for some options' TUNNEL2_<COMMAND>_<OPTION> variables (README,
# "Configuration files and environment").
_ENV_ALIASES: Final[dict[str, dict[str, tuple[_config.EnvName, ...]]]] = {
    "server": {
        "token": (_config.EnvName("TUNNEL2_TOKENS", separator=r"[\s,]+"),),
        "token-file": (_config.EnvName("TUNNEL2_TOKEN_FILE"),),
        "state-dir": (_config.EnvName("TUNNEL2_STATE_DIR"),),
    },
    "http": {
        "server": (_config.EnvName("TUNNEL2_SERVER"),),
        "token": (_config.EnvName("TUNNEL2_TOKEN"),),
        "basic-auth": (_config.EnvName("TUNNEL2_BASIC_AUTH"),),
        "bearer-token": (_config.EnvName("TUNNEL2_BEARER_TOKEN"),),
    },
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    try:
        args, warnings = _config.parse_args(build_parser(), argv, os.environ, _ENV_ALIASES)
    except _config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for warning in warnings:
        print(warning, file=sys.stderr)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before the command's own signal handling is in place
        return FORCED_EXIT
    return status


if __name__ == "__main__":
    sys.exit(main())
