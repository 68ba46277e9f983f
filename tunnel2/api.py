"""The entry points users call: run a relay, open a tunnel.

Layer: top of the library (below cli and testing). Thin wiring of server, entry and agent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, NoReturn

import trio

from tunnel2._sockets import FastSocketStream, serve_socket, take_socket
from tunnel2._tls import TlsStream, answer_plain_http, client_context, server_context
from tunnel2._util import require_async_library, unwrap_lone_error
from tunnel2.agent import Agent, AgentConfig, StreamHandler, websocket_connector
from tunnel2.asgi import AsgiApp, AsgiHandler, AsgiLoop
from tunnel2.backend import BackendForwarder, check_host_header
from tunnel2.entry import ProxyEntry
from tunnel2.server import ServerConfig, TunnelServer

if TYPE_CHECKING:
    from collections.abc import Iterable

    from tunnel2.access import AccessPolicy
    from tunnel2.admin import PrometheusObserver
    from tunnel2.observe import Observer
    from tunnel2.sessions import SessionStore

logger = logging.getLogger(__name__)

__all__ = [
    "handler_for",
    "open_tunnel",
    "open_tunnel_server",
    "serve_tunnel_server",
]


async def serve_tunnel_server(
    config: ServerConfig | None = None,
    *,
    store: SessionStore | None = None,
    ssl_context: ssl.SSLContext | None = None,
    observers: Iterable[Observer] = (),
    admin: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[TunnelServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a relay: the public HTTP entry and the agents' WebSocket endpoint on one port.

    Binds ``config.host:config.port`` (port 0 picks one), then calls
    ``task_status.started(server)`` with the :class:`TunnelServer`, whose ``base_url`` holds
    the bound port, so bind errors surface from ``nursery.start``. Runs until cancelled;
    every connection task lives in this function's nursery.

    With TLS (``ssl_context``, or one built from ``config.tls_cert``/``config.tls_key``) the
    port serves HTTPS and WSS, ``base_url`` and the sessions' public URLs say ``https``, and a
    connection that starts with plain HTTP is answered with a 308 redirect to its https URL
    (or 400). The TLS handshake (or that answer) must complete within
    ``config.handshake_timeout``; the connection counts towards ``max_connections`` from the
    start.

    Args:
        config: the relay's settings.
        store: where session claims are decided (default: in memory, see
            :class:`~tunnel2.server.TunnelServer`).
        ssl_context: the server's TLS settings (injected; takes precedence over
            ``config.tls_cert``).
        observers: told of every request, agent, refusal and drain (:mod:`tunnel2.observe`).
        admin: ``(host, port)`` to serve the admin endpoint on (``/metrics``, ``/healthz``,
            ``/readyz``, ``/status``; :mod:`tunnel2.admin`); keep it off public addresses.
            Its URL is in ``server.admin_url``. Needs prometheus-client and hypercorn.
        task_status: for ``nursery.start``.

    Raises:
        OSError: the address (or the admin address) could not be bound.
        ValueError: a TLS file cannot be loaded, or ``config.tls_key`` is set without
            ``config.tls_cert``.
        ExceptionGroup: an unexpected error in a connection task (a bug).
    """
    require_async_library("trio", "tunnel2.serve_tunnel_server", "tunnel2.aio.open_tunnel_server")
    config = config or ServerConfig()
    if ssl_context is None and config.tls_cert is not None:
        ssl_context = server_context(config.tls_cert, config.tls_key)
    elif config.tls_key is not None and config.tls_cert is None:
        raise ValueError("tls_key needs tls_cert")
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    port = listeners[0].socket.getsockname()[1]
    host = config.host if ":" not in config.host else f"[{config.host}]"
    scheme = "http" if ssl_context is None else "https"
    metrics = _metrics_observer() if admin is not None else None
    server = TunnelServer(
        config,
        base_url=config.public_url or f"{scheme}://{host}:{port}",
        port=port,
        store=store,
        observers=[*observers, *([metrics] if metrics is not None else [])],
    )
    if server.open_relay:
        logger.warning(
            "open relay on %s: no tokens are configured, so ANY agent may connect and expose "
            "a tunnel here; set tokens (ServerConfig.tokens / token_file) before you bind "
            "anything but loopback",
            server.base_url,
        )
    entry = ProxyEntry(server)
    handler: Callable[[FastSocketStream], Awaitable[None]] = entry.handle_connection
    if ssl_context is not None:
        context = ssl_context
        plain_http = functools.partial(
            answer_plain_http, base_url=server.base_url, max_head_size=config.max_head_size
        )

        async def handler(stream: FastSocketStream) -> None:
            try:
                tls = TlsStream(
                    stream,
                    context,
                    server_side=True,
                    plain_http=plain_http,
                    handshake_timeout=config.handshake_timeout,
                )
            except BaseException:
                stream.close()  # handle_connection closes it from here on
                raise
            await entry.handle_connection(tls)

    try:
        async with trio.open_nursery() as nursery:
            if admin is not None and metrics is not None:
                from tunnel2.admin import relay_admin, serve_admin

                app = relay_admin(server, metrics)
                server.admin_url = await nursery.start(serve_admin, app, *admin)
            for listener in listeners:
                nursery.start_soon(serve_socket, take_socket(listener.socket), handler, nursery)
            nursery.start_soon(entry.run_timeouts)
            task_status.started(server)
            await trio.sleep_forever()
    finally:
        server.mark_stopped()
    raise AssertionError("unreachable")  # pragma: no cover


@asynccontextmanager
async def open_tunnel_server(
    config: ServerConfig | None = None, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[TunnelServer]:
    """Run a relay for the duration of the block (TLS as in :func:`serve_tunnel_server`).

    On exit the relay drains: agents get GOAWAY and in-flight requests get
    ``config.drain_timeout`` seconds, then everything is cancelled.

    Raises:
        RuntimeError: called from asyncio (use :func:`tunnel2.aio.open_tunnel_server`).
    """
    require_async_library("trio", "tunnel2.open_tunnel_server", "tunnel2.aio.open_tunnel_server")
    async with trio.open_nursery() as nursery:
        server: TunnelServer = await nursery.start(
            functools.partial(serve_tunnel_server, config, ssl_context=ssl_context)
        )
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(server.config.drain_timeout + 1):
                    await server.drain()
            nursery.cancel_scope.cancel()


def _serving(handler: StreamHandler) -> AbstractAsyncContextManager[object]:
    """What keeps ``handler`` ready to serve: an ASGI app's lifespan (and loop), entered
    before the agent connects and left after it is gone; nothing for a backend."""
    return handler if isinstance(handler, AsgiHandler) else contextlib.nullcontext()


def _metrics_observer() -> PrometheusObserver:
    # Imported on use: prometheus-client and hypercorn stay out of `import tunnel2`.
    from tunnel2.admin import PrometheusObserver

    return PrometheusObserver()


def handler_for(
    target: int | str | AsgiApp | AsgiHandler,
    *,
    backend_ca_file: str | None = None,
    backend_insecure: bool = False,
    backend_ssl_context: ssl.SSLContext | None = None,
    host_header: str | None = None,
    asgi_loop: AsgiLoop = "asyncio",
) -> StreamHandler:
    """The stream handler for a tunnel target.

    Args:
        target: a port on 127.0.0.1, an ``http(s)://host:port`` URL, or an ASGI 3 app.
        backend_ca_file: for an ``https`` target, trust only the CA certificates in this PEM
            file (default: the system's store).
        backend_insecure: for an ``https`` target, accept any certificate.
        backend_ssl_context: for an ``https`` target, these TLS settings instead.
        host_header: the Host a port or URL target is sent: ``"preserve"`` (the public
            one), ``"rewrite"`` (the target's ``host:port``) or a literal ``host[:port]``;
            ``None``: ``preserve`` for http, ``rewrite`` for https (see
            :class:`~tunnel2.backend.BackendForwarder`).
        asgi_loop: for an ASGI app, where its code runs (:class:`~tunnel2.asgi.AsgiHandler`);
            an :class:`~tunnel2.asgi.AsgiHandler` given as ``target`` is used as it is.

    Raises:
        ValueError: a URL that is not ``http(s)://host[:port]``, a ``backend_ca_file``
            that cannot be loaded, or a bad ``host_header`` (or one given with an ASGI app).
    """
    if host_header is not None:
        check_host_header(host_header)
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        port = int(target)
        if not 1 <= port <= 65535:
            raise ValueError(f"target port {port} is out of range 1-65535")
        return BackendForwarder("127.0.0.1", port, host_header=host_header)
    if isinstance(target, str):
        parts = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target {target!r} must be a port or an http(s)://host:port URL")
        try:
            parts.port  # noqa: B018 - raises for a port out of range
        except ValueError:
            raise ValueError(f"target {target!r}: the port is out of range 1-65535") from None
        if parts.scheme == "http":
            return BackendForwarder(parts.hostname, parts.port or 80, host_header=host_header)
        context = backend_ssl_context or client_context(
            backend_ca_file, verify=not backend_insecure
        )
        return BackendForwarder(
            parts.hostname, parts.port or 443, ssl_context=context, host_header=host_header
        )
    if host_header not in (None, "preserve"):
        raise ValueError(
            f"host_header={host_header!r} applies to a port or URL target, not an ASGI app"
        )
    if isinstance(target, AsgiHandler):
        return target
    return AsgiHandler(target, loop=asgi_loop)


@asynccontextmanager
async def open_tunnel(
    server_url: str,
    target: int | str | AsgiApp,
    *,
    session_id: str | None = None,
    token: str | None = None,
    max_concurrent: int = 64,
    max_queued: int = 1024,
    connect_timeout: float = 10.0,
    access: AccessPolicy | None = None,
    ca_file: str | None = None,
    insecure_transport: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    backend_ca_file: str | None = None,
    backend_insecure: bool = False,
    drain_timeout: float = 10.0,
    observers: Iterable[Observer] = (),
    admin: tuple[str, int] | None = None,
    host_header: str | None = None,
    asgi_loop: AsgiLoop = "asyncio",
    # --- inspect ---
    inspect: bool = False,
    inspect_capacity: int = 100,
    inspect_body_bytes: int = 16 * 1024,
) -> AsyncIterator[Agent]:
    """Expose ``target`` through the relay at ``server_url`` for the duration of the block.

    Yields the connected :class:`Agent`; read ``.public_url`` and ``.session_id``. If the
    connection drops, the agent re-dials in the background and gets its session back. On
    exit the agent drains (:meth:`Agent.drain`): the relay sends new requests to the
    session's other agents, or holds them briefly for a replacement, and requests in flight
    get ``drain_timeout`` seconds; then its tasks are cancelled. A block left by a
    cancellation closes at once.

    Args:
        server_url: the relay, e.g. ``https://relay.example`` or ``http://127.0.0.1:8000``.
        target: a port on 127.0.0.1, an ``http(s)://host:port`` URL, or an ASGI 3 app.
        session_id: a fixed session id to ask for (otherwise the relay picks one).
        token: the relay's agent token, if it requires one.
        max_concurrent: requests answered at once.
        max_queued: requests waiting beyond that before the relay answers 503.
        connect_timeout: seconds for the first connection and handshake.
        access: who may visit the tunnel, e.g.
            ``AccessPolicy.from_options(basic_auth=["alice:s3cret"])``; the relay turns
            everyone else away before a request reaches this agent. ``None``: anyone with
            the URL.
        connect_timeout: seconds for each step of the first connection and handshake.
        ca_file: trust only the CA certificates in this PEM file for an ``https`` relay
            (default: the system's store).
        insecure_transport: allow an ``http``/``ws`` relay that is not on loopback (the
            token and traffic then cross the network in clear text).
        ssl_context: TLS settings for the relay instead of ``ca_file``.
        backend_ca_file: for an ``https`` target, trust only these CA certificates.
        backend_insecure: for an ``https`` target, accept any certificate.
        drain_timeout: seconds requests in flight get on exit.
        observers: told of every request and reconnection (:mod:`tunnel2.observe`).
        admin: ``(host, port)`` to serve the agent's admin endpoint on (see
            :func:`serve_tunnel_server`); its URL is in ``agent.admin_url``.
        host_header: the Host the target is sent (as ngrok's ``--host-header``):
            ``"preserve"`` the public one (the default for http targets), ``"rewrite"`` the
            target's own ``host:port`` (for dev servers that check Host: Vite, Django's
            ``ALLOWED_HOSTS``, webpack; the default for https targets), or a literal
            ``host[:port]``. The public Host stays in X-Forwarded-Host.
        asgi_loop: for an ASGI app, where its code runs: ``"asyncio"`` (a loop in a thread
            the tunnel owns; the default, for FastAPI/Starlette/Django apps that use
            asyncio), ``"trio"`` (the tunnel's own tasks), or a running asyncio loop of
            another thread (see :class:`~tunnel2.asgi.AsgiHandler`). The app's lifespan
            startup runs before this block is entered, its shutdown after it is left.
        inspect: keep recent exchanges for ``agent.requests()``, ``agent.replay(id)`` and
            the inspector page at the admin URL (:mod:`tunnel2.inspect`).
        inspect_capacity: exchanges kept (the oldest goes first).
        inspect_body_bytes: bytes of each request and response body kept.

    Raises:
        ValueError: a bad relay URL, target or CA file, or a clear-text relay that is not
            on loopback without ``insecure_transport`` (raised before anything is dialled).
        HandshakeRefused: the relay refused the agent (bad token, session held).
        HandshakeError: the relay could not be reached, or its certificate was not trusted.
        AppStartupError: the ASGI app's lifespan startup failed.
        RuntimeError: called from asyncio (use :func:`tunnel2.aio.open_tunnel`).
    """
    require_async_library("trio", "tunnel2.open_tunnel", "tunnel2.aio.open_tunnel")
    config = AgentConfig(
        token=token,
        session_id=session_id,
        max_concurrent=max_concurrent,
        max_queued=max_queued,
        connect_timeout=connect_timeout,
        access=access,
        ca_file=ca_file,
        insecure_transport=insecure_transport,
        drain_timeout=drain_timeout,
        host_header=host_header,
        inspect=inspect,
        inspect_capacity=inspect_capacity,
        inspect_body_bytes=inspect_body_bytes,
    )
    connector = websocket_connector(
        server_url,
        connect_timeout=config.connect_timeout,
        ca_file=config.ca_file,
        insecure_transport=config.insecure_transport,
        ssl_context=ssl_context,
    )
    handler = handler_for(
        target,
        backend_ca_file=backend_ca_file,
        backend_insecure=backend_insecure,
        host_header=config.host_header,
        asgi_loop=asgi_loop,
    )
    metrics = _metrics_observer() if admin is not None else None
    agent = Agent(
        connector,
        handler,
        config,
        observers=[*observers, *([metrics] if metrics is not None else [])],
    )
    try:
        # trio wraps what the agent's task raised; a lone error comes out as itself.
        with unwrap_lone_error():
            async with _serving(handler), trio.open_nursery() as nursery:
                if admin is not None and metrics is not None:
                    from tunnel2.admin import agent_admin, serve_admin

                    app = agent_admin(agent, metrics)
                    agent.admin_url = await nursery.start(serve_admin, app, *admin)
                await nursery.start(agent.serve)
                try:
                    yield agent
                    await agent.drain()
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        if isinstance(handler, BackendForwarder):
            with trio.CancelScope(shield=True):
                await handler.aclose()
