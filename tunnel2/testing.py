"""Test a tunnel with no sockets: relay, entry and agent wired over in-memory transports.

Layer: top (beside api). Shipped for users and registered as a pytest plugin, which gives
the ``memory_tunnel`` fixture::

    async def test_my_app(memory_tunnel):
        async with memory_tunnel(my_asgi_app) as tunnel:
            response = await tunnel.request("GET", "/hello")
            assert response.status == 200

Everything runs in the block's own nursery; leaving the block cancels it. Only the fixture
needs pytest; :func:`open_memory_tunnel` works in any trio program.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import final

import attrs
import h11
import trio
import trio.testing

from tunnel2.agent import Agent, AgentConfig, AsgiApp, BackendForwarder, Connector
from tunnel2.api import handler_for
from tunnel2.entry import ProxyEntry
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.transports import FrameTransport, memory_transport_pair

__all__ = [
    "MemoryTunnel",
    "MemoryTunnelFactory",
    "Response",
    "memory_tunnel",
    "open_memory_tunnel",
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
) -> AsyncIterator[MemoryTunnel]:
    """Run a relay, entry and agent over in-memory transports for the block.

    Args:
        target: what the agent forwards to: an ASGI app (no sockets at all), or a port /
            URL of a real backend.
        config: the relay's settings.
        agent_config: the agent's settings.
    """
    server = TunnelServer(config or ServerConfig(), base_url=MEMORY_BASE_URL)
    entry = ProxyEntry(server)
    handler = handler_for(target)
    async with trio.open_nursery() as nursery:
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


MemoryTunnelFactory = Callable[..., AbstractAsyncContextManager[MemoryTunnel]]


try:
    import pytest
except ImportError:  # pragma: no cover - open_memory_tunnel works without pytest
    pass
else:

    @pytest.fixture
    def memory_tunnel() -> MemoryTunnelFactory:
        """pytest fixture: :func:`open_memory_tunnel`, for ``async with memory_tunnel(app)``."""
        return open_memory_tunnel
