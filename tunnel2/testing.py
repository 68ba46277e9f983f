"""Test a tunnel with no sockets: relay, entry and agent wired over in-memory transports.

Layer: top (beside api). Shipped for users and registered as a pytest plugin, which gives
the ``memory_tunnel`` fixture::

    async def test_my_app(memory_tunnel):
        async with memory_tunnel(my_asgi_app) as tunnel:
            response = await tunnel.request("GET", "/hello")
            assert response.status == 200

Everything runs in the block's own nursery; leaving the block cancels it. Only the fixture
needs pytest; :func:`open_memory_tunnel` works in any trio program.

The fixture works under every async test runner with no configuration: it asks sniffio
which library runs the test, and under trio (pytest-trio, anyio's trio backend) it is
:func:`open_memory_tunnel` itself; under asyncio (pytest-asyncio, anyio's asyncio backend)
the same memory tunnel runs on trio in a thread the block owns (:mod:`tunnel2.aio`'s
bridge) and ``request`` is awaited on asyncio. Plain ``def`` tests use
:func:`sync_memory_tunnel`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol, final

import attrs
import h11
import sniffio
import trio
import trio.testing

from tunnel2 import aio
from tunnel2.agent import Agent, AgentConfig, Connector
from tunnel2.api import _serving, handler_for
from tunnel2.backend import BackendForwarder
from tunnel2.entry import ProxyEntry
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.sync import EXIT_TIMEOUT, ThreadHandle, TrioThread
from tunnel2.transports import FrameTransport, memory_transport_pair

if TYPE_CHECKING:
    from tunnel2.asgi import AsgiApp, AsgiLoop

__all__ = [
    "AioMemoryTunnel",
    "MemoryTunnel",
    "MemoryTunnelFactory",
    "Response",
    "SyncMemoryTunnel",
    "TunnelClient",
    "memory_tunnel",
    "open_memory_tunnel",
    "open_memory_tunnel_here",
    "sync_memory_tunnel",
]

MEMORY_BASE_URL = "http://relay.test"


@final
@attrs.frozen
class Response:
    """A complete response read by :meth:`MemoryTunnel.request`."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        key = name.lower().encode()
        for n, v in self.headers:
            if n == key:
                return v.decode("latin-1")
        return None

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8", "replace")


@final
@attrs.define
class MemoryTunnel:
    """A relay, its entry and one connected agent, all in memory.

    Attributes:
        server: the relay's agent side (sessions, uplinks).
        entry: the relay's public HTTP side.
        agent: the connected agent.
    """

    server: TunnelServer
    entry: ProxyEntry
    agent: Agent
    _nursery: trio.Nursery

    @property
    def public_url(self) -> str:
        """The session's public URL (on the fake host ``relay.test``)."""
        return self.agent.public_url

    @property
    def path_prefix(self) -> str:
        """The path prefix of the session on the entry (``/session/{id}``)."""
        return f"/session/{self.agent.session_id}"

    def open_client_stream(self) -> trio.abc.HalfCloseableStream:
        """A new client connection to the entry, as a raw stream (for hand-written HTTP)."""
        client, server_side = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self.entry.handle_connection, server_side)
        return client

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        raw_path: bool = False,
    ) -> Response:
        """Send one request through the tunnel on a new connection and read the response.

        Args:
            method: the HTTP method.
            path: the path the backend should see; the session prefix is added unless
                ``raw_path`` is true.
            headers: extra request headers (``Host: relay.test`` unless one is given).
            body: the request body (sent with Content-Length).
            raw_path: send ``path`` to the entry as it is.
        """
        target = path if raw_path else self.path_prefix + path
        stream = self.open_client_stream()
        conn = h11.Connection(h11.CLIENT)
        all_headers = list(headers)
        if not any(name.lower() == "host" for name, _ in all_headers):
            all_headers.insert(0, ("Host", "relay.test"))
        if body or method in ("POST", "PUT", "PATCH"):
            all_headers.append(("Content-Length", str(len(body))))
        out = conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        try:
            await stream.send_all(out)
            status = 0
            response_headers: list[tuple[bytes, bytes]] = []
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = list(event.headers)
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            return Response(status, response_headers, b"".join(chunks))
        finally:
            await stream.aclose()


def memory_connector(server: TunnelServer, nursery: trio.Nursery) -> Connector:
    """A connector whose connections are in-memory pairs served by ``server``."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[FrameTransport]:
        ours, theirs = memory_transport_pair()
        nursery.start_soon(server.handle_agent, theirs)
        try:
            yield ours
        finally:
            await trio.aclose_forcefully(ours)

    return connect


@asynccontextmanager
async def open_memory_tunnel(
    target: int | str | AsgiApp,
    *,
    config: ServerConfig | None = None,
    agent_config: AgentConfig | None = None,
    asgi_loop: AsgiLoop = "asyncio",
) -> AsyncIterator[MemoryTunnel]:
    """Run a relay, entry and agent over in-memory transports for the block.

    Args:
        target: what the agent forwards to: an ASGI app (no sockets at all), or a port /
            URL of a real backend.
        config: the relay's settings.
        agent_config: the agent's settings.
        asgi_loop: where an ASGI app's code runs (as :func:`tunnel2.open_tunnel`'s); its
            lifespan startup runs before the block is entered.

    Raises:
        AppStartupError: the ASGI app's lifespan startup failed.
    """
    server = TunnelServer(config or ServerConfig(), base_url=MEMORY_BASE_URL)
    entry = ProxyEntry(server)
    handler = handler_for(target, asgi_loop=asgi_loop)
    async with _serving(handler), trio.open_nursery() as nursery:
        nursery.start_soon(entry.run_timeouts)
        agent = Agent(memory_connector(server, nursery), handler, agent_config)
        await nursery.start(agent.serve)
        try:
            yield MemoryTunnel(server, entry, agent, nursery)
        finally:
            nursery.cancel_scope.cancel()
            if isinstance(handler, BackendForwarder):
                with trio.CancelScope(shield=True):
                    await handler.aclose()


class TunnelClient(Protocol):
    """What every memory tunnel offers, whichever loop drives it."""

    @property
    def public_url(self) -> str:
        """The session's public URL (on the fake host ``relay.test``)."""
        ...

    @property
    def path_prefix(self) -> str:
        """The path prefix of the session on the entry (``/session/{id}``)."""
        ...

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        raw_path: bool = False,
    ) -> Response:
        """Send one request through the tunnel (see :meth:`MemoryTunnel.request`)."""
        ...


def _request_call(
    tunnel: MemoryTunnel,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    raw_path: bool,
) -> Callable[[], Awaitable[Response]]:
    return functools.partial(
        tunnel.request, method, path, headers=list(headers), body=body, raw_path=raw_path
    )


class _ThreadedMemoryTunnel:
    """The plain facts of a :class:`MemoryTunnel` that runs in another thread."""

    _value: MemoryTunnel

    @property
    def public_url(self) -> str:
        """The session's public URL (on the fake host ``relay.test``)."""
        return self._value.public_url

    @property
    def path_prefix(self) -> str:
        """The path prefix of the session on the entry (``/session/{id}``)."""
        return self._value.path_prefix


@final
class AioMemoryTunnel(_ThreadedMemoryTunnel):
    """A :class:`MemoryTunnel` on trio in a thread, driven from asyncio."""

    def __init__(self, run: TrioThread[MemoryTunnel]) -> None:
        self._run = run
        self._value = run.ready.result()

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        raw_path: bool = False,
    ) -> Response:
        """:meth:`MemoryTunnel.request`, awaited on asyncio; cancelling it cancels it."""
        call = _request_call(self._value, method, path, headers, body, raw_path)
        return await aio.call_in_trio_thread(self._run, call)


@final
class SyncMemoryTunnel(ThreadHandle[MemoryTunnel], _ThreadedMemoryTunnel):
    """A :class:`MemoryTunnel` on trio in a thread, for plain ``def`` tests.

    Made by :func:`sync_memory_tunnel`; ``close()`` (or the end of the ``with`` block)
    stops it.
    """

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        raw_path: bool = False,
        timeout: float = 30.0,
    ) -> Response:
        """:meth:`MemoryTunnel.request`, blocking this thread for at most ``timeout`` s.

        Raises:
            TimeoutError: no complete response within ``timeout`` (the request is
                cancelled).
        """
        future, cancel = self._run.submit(
            _request_call(self._value, method, path, headers, body, raw_path)
        )
        try:
            return future.result(timeout)
        except TimeoutError:
            cancel()
            raise


def sync_memory_tunnel(
    target: int | str | AsgiApp,
    *,
    config: ServerConfig | None = None,
    agent_config: AgentConfig | None = None,
    asgi_loop: AsgiLoop = "asyncio",
) -> SyncMemoryTunnel:
    """:func:`open_memory_tunnel` for synchronous code: ``with sync_memory_tunnel(app) as t``.

    ``target`` is an ASGI app (its code on ``asgi_loop``, as :func:`open_memory_tunnel`'s)
    or a port / URL of a real backend (a Flask or Django dev server in a thread, for
    instance).
    """
    return SyncMemoryTunnel(
        lambda: open_memory_tunnel(
            target, config=config, agent_config=agent_config, asgi_loop=asgi_loop
        ),
        "tunnel2-memory",
        EXIT_TIMEOUT,
    )


@asynccontextmanager
async def open_memory_tunnel_here(
    target: int | str | AsgiApp,
    *,
    config: ServerConfig | None = None,
    agent_config: AgentConfig | None = None,
    asgi_loop: AsgiLoop = "asyncio",
) -> AsyncIterator[TunnelClient]:
    """:func:`open_memory_tunnel` on whatever async library runs the caller.

    Under trio it is :func:`open_memory_tunnel`; under asyncio the tunnel runs on trio in
    a thread the block owns and yields an :class:`AioMemoryTunnel`, and an ASGI app's
    code runs on the caller's own loop (unless ``asgi_loop`` says otherwise). What the
    ``memory_tunnel`` fixture returns.

    Raises:
        RuntimeError: another async library (sniffio names it).
    """
    library = sniffio.current_async_library()
    if library == "trio":
        async with open_memory_tunnel(
            target, config=config, agent_config=agent_config, asgi_loop=asgi_loop
        ) as t:
            yield t
    elif library == "asyncio":
        loop = asyncio.get_running_loop() if asgi_loop == "asyncio" else asgi_loop
        async with aio.run_in_trio_thread(
            lambda: open_memory_tunnel(
                target, config=config, agent_config=agent_config, asgi_loop=loop
            ),
            "tunnel2-memory",
        ) as run:
            yield AioMemoryTunnel(run)
    else:
        raise RuntimeError(f"tunnel2.testing supports trio and asyncio, not {library}")


MemoryTunnelFactory = Callable[..., AbstractAsyncContextManager[TunnelClient]]


try:
    import pytest
except ImportError:  # pragma: no cover - open_memory_tunnel works without pytest
    pass
else:

    @pytest.fixture
    def memory_tunnel() -> MemoryTunnelFactory:
        """pytest fixture: :func:`open_memory_tunnel_here`, for ``async with memory_tunnel(app)``
        under any runner (pytest-trio, anyio, pytest-asyncio)."""
        return open_memory_tunnel_here
