"""The entry points users call: run a relay, open a tunnel.

Layer: top of the library (below cli and testing). Thin wiring of server, entry and agent.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NoReturn

import trio

from tunnel2._util import require_async_library, unwrap_lone_error
from tunnel2.agent import (
    Agent,
    AgentConfig,
    AsgiApp,
    AsgiHandler,
    BackendForwarder,
    StreamHandler,
    websocket_connector,
)
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
    observers: Iterable[Observer] = (),
    admin: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[TunnelServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a relay: the public HTTP entry and the agents' WebSocket endpoint on one port.

    Binds ``config.host:config.port`` (port 0 picks one), then calls
    ``task_status.started(server)`` with the :class:`TunnelServer`, whose ``base_url`` holds
    the bound port, so bind errors surface from ``nursery.start``. Runs until cancelled;
    every connection task lives in this function's nursery.

    Args:
        config: the relay's settings.
        store: where session claims are decided (default: in memory, see
            :class:`~tunnel2.server.TunnelServer`).
        observers: told of every request, agent, refusal and drain (:mod:`tunnel2.observe`).
        admin: ``(host, port)`` to serve the admin endpoint on (``/metrics``, ``/healthz``,
            ``/readyz``, ``/status``; :mod:`tunnel2.admin`); keep it off public addresses.
            Its URL is in ``server.admin_url``. Needs prometheus-client and hypercorn.
        task_status: for ``nursery.start``.

    Raises:
        OSError: the address (or the admin address) could not be bound.
        ExceptionGroup: an unexpected error in a connection task (a bug).
    """
    require_async_library("trio", "tunnel2.serve_tunnel_server", "tunnel2.aio.open_tunnel_server")
    config = config or ServerConfig()
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    port = listeners[0].socket.getsockname()[1]
    host = config.host if ":" not in config.host else f"[{config.host}]"
    metrics = _metrics_observer() if admin is not None else None
    server = TunnelServer(
        config,
        base_url=config.public_url or f"http://{host}:{port}",
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
    try:
        async with trio.open_nursery() as nursery:
            if admin is not None and metrics is not None:
                from tunnel2.admin import relay_admin, serve_admin

                app = relay_admin(server, metrics)
                server.admin_url = await nursery.start(serve_admin, app, *admin)
            await nursery.start(trio.serve_listeners, entry.handle_connection, listeners)
            nursery.start_soon(entry.run_timeouts)
            task_status.started(server)
            await trio.sleep_forever()
    finally:
        server.mark_stopped()
    raise AssertionError("unreachable")  # pragma: no cover


@asynccontextmanager
async def open_tunnel_server(config: ServerConfig | None = None) -> AsyncIterator[TunnelServer]:
    """Run a relay for the duration of the block.

    On exit the relay drains: agents get GOAWAY and in-flight requests get
    ``config.drain_timeout`` seconds, then everything is cancelled.

    Raises:
        RuntimeError: called from asyncio (use :func:`tunnel2.aio.open_tunnel_server`).
    """
    require_async_library("trio", "tunnel2.open_tunnel_server", "tunnel2.aio.open_tunnel_server")
    async with trio.open_nursery() as nursery:
        server: TunnelServer = await nursery.start(serve_tunnel_server, config)
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(server.config.drain_timeout + 1):
                    await server.drain()
            nursery.cancel_scope.cancel()


def _metrics_observer() -> PrometheusObserver:
    # Imported on use: prometheus-client and hypercorn stay out of `import tunnel2`.
    from tunnel2.admin import PrometheusObserver

    return PrometheusObserver()


def handler_for(target: int | str | AsgiApp) -> StreamHandler:
    """The stream handler for a tunnel target.

    Args:
        target: a port on 127.0.0.1, an ``http://host:port`` URL, or an ASGI 3 app.

    Raises:
        ValueError: a URL that is not ``http://host[:port]``.
    """
    if isinstance(target, int):
        return BackendForwarder("127.0.0.1", target)
    if isinstance(target, str):
        if target.isdigit():
            return BackendForwarder("127.0.0.1", int(target))
        parts = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target {target!r} must be a port or an http://host:port URL")
        return BackendForwarder(parts.hostname, parts.port or 80)
    return AsgiHandler(target)


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
    observers: Iterable[Observer] = (),
    admin: tuple[str, int] | None = None,
) -> AsyncIterator[Agent]:
    """Expose ``target`` through the relay at ``server_url`` for the duration of the block.

    Yields the connected :class:`Agent`; read ``.public_url`` and ``.session_id``. If the
    connection drops, the agent re-dials in the background and gets its session back. On
    exit the agent's tasks are cancelled and its connections closed.

    Args:
        server_url: the relay, e.g. ``http://127.0.0.1:8000``.
        target: a port on 127.0.0.1, an ``http://host:port`` URL, or an ASGI 3 app.
        session_id: a fixed session id to ask for (otherwise the relay picks one).
        token: the relay's agent token, if it requires one.
        max_concurrent: requests answered at once.
        max_queued: requests waiting beyond that before the relay answers 503.
        connect_timeout: seconds for the first connection and handshake.
        access: who may visit the tunnel, e.g.
            ``AccessPolicy.from_options(basic_auth=["alice:s3cret"])``; the relay turns
            everyone else away before a request reaches this agent. ``None``: anyone with
            the URL.
        observers: told of every request and reconnection (:mod:`tunnel2.observe`).
        admin: ``(host, port)`` to serve the agent's admin endpoint on (see
            :func:`serve_tunnel_server`); its URL is in ``agent.admin_url``.

    Raises:
        HandshakeRefused: the relay refused the agent (bad token, session held).
        HandshakeError: the relay could not be reached.
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
    )
    handler = handler_for(target)
    metrics = _metrics_observer() if admin is not None else None
    agent = Agent(
        websocket_connector(server_url, connect_timeout=connect_timeout),
        handler,
        config,
        observers=[*observers, *([metrics] if metrics is not None else [])],
    )
    try:
        # trio wraps what the agent's task raised; a lone error comes out as itself.
        with unwrap_lone_error():
            async with trio.open_nursery() as nursery:
                if admin is not None and metrics is not None:
                    from tunnel2.admin import agent_admin, serve_admin

                    app = agent_admin(agent, metrics)
                    agent.admin_url = await nursery.start(serve_admin, app, *admin)
                await nursery.start(agent.serve)
                try:
                    yield agent
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        if isinstance(handler, BackendForwarder):
            with trio.CancelScope(shield=True):
                await handler.aclose()
