"""The asyncio front door: ``async with tunnel2.aio.open_tunnel(...)`` from asyncio code.

Layer: beside api, over :mod:`tunnel2.sync`. For FastAPI/Starlette lifespans, aiohttp
startup hooks, Jupyter's top-level ``await`` and any running asyncio loop::

    async with tunnel2.aio.open_tunnel("http://127.0.0.1:8000", 8080) as tunnel:
        print(tunnel.public_url)

The bridge: the tunnel runs on trio in a thread the block owns (:class:`~tunnel2.sync.
TrioThread`), and asyncio awaits its :class:`concurrent.futures.Future` objects with
``asyncio.wrap_future``, which completes them on the loop with
``loop.call_soon_threadsafe``. It was chosen over trio's guest mode by measurement (README,
"Embed it in any Python app"): the data path never touches the asyncio loop, so a loop
that blocks does not stall the tunnel, and no per-request cost is added.

Invariant: leaving the block (normally, by an exception, or because the task was
cancelled) leaves the trio block in the thread and waits for the thread to end, so the
relay sees the agent go before the block is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, Unpack, final

from tunnel2 import api
from tunnel2._util import require_async_library
from tunnel2.sync import AgentView, RelayView, TrioThread, TunnelOptions, _snapshot

if TYPE_CHECKING:
    from tunnel2.agent import Agent
    from tunnel2.asgi import AsgiApp
    from tunnel2.inspect import Exchange
    from tunnel2.server import ServerConfig, TunnelServer

__all__ = [
    "Relay",
    "Tunnel",
    "call_in_trio_thread",
    "open_tunnel",
    "open_tunnel_server",
    "run_in_trio_thread",
]

T = TypeVar("T")


@final
class Tunnel(AgentView):
    """The open tunnel an ``async with open_tunnel(...)`` block gets."""

    def __init__(self, agent: Agent, run: TrioThread[Agent]) -> None:
        self._value = agent
        self._run = run

    def __repr__(self) -> str:
        return f"<tunnel2.aio.Tunnel {self.public_url}>"

    # --- inspect ---

    async def requests(self) -> list[Exchange]:
        """The recent exchanges, oldest first (:meth:`tunnel2.Agent.requests`), read on
        the tunnel's thread.

        Raises:
            RuntimeError: inspection is off (``open_tunnel(..., inspect=True)``).
        """
        return await self._call(_snapshot, self._value)

    async def replay(self, exchange_id: int) -> Exchange:
        """Replay exchange ``exchange_id`` (:meth:`tunnel2.Agent.replay`); returns the new
        exchange. Cancelling it cancels the replay.

        Raises:
            RuntimeError, KeyError, ValueError: as :meth:`tunnel2.Agent.replay`.
        """
        return await self._call(self._value.replay, exchange_id)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        return await call_in_trio_thread(self._run, fn, *args)


@final
class Relay(RelayView):
    """The listening relay an ``async with open_tunnel_server(...)`` block gets."""

    def __init__(self, server: TunnelServer) -> None:
        self._value = server

    def __repr__(self) -> str:
        return f"<tunnel2.aio.Relay {self.base_url}>"


@asynccontextmanager
async def run_in_trio_thread(
    open_block: Callable[[], AbstractAsyncContextManager[T]], name: str
) -> AsyncIterator[TrioThread[T]]:
    """Hold a trio async context manager open in a thread for the duration of the block.

    The building block of this module (and of :mod:`tunnel2.testing` under asyncio):
    yields the :class:`~tunnel2.sync.TrioThread` once its ``ready`` future resolved; use
    its ``submit`` to run trio calls from asyncio.

    Raises:
        Exception: what entering ``open_block()`` raised, as itself.
    """
    run = TrioThread(open_block, name)
    run.start()
    try:
        await asyncio.wrap_future(run.ready)
    except BaseException:  # the handshake failed, or the caller was cancelled during it
        run.stop()
        with contextlib.suppress(BaseException):
            await _ended(run)
        raise
    try:
        yield run
    finally:
        run.stop()
        await _ended(run)


async def call_in_trio_thread(
    run: TrioThread[Any], fn: Callable[..., Awaitable[T]], *args: object
) -> T:
    """``await fn(*args)`` in ``run``'s trio thread, awaited on asyncio; cancelling the
    caller cancels the call (the other half of :func:`run_in_trio_thread`).

    Raises:
        Exception: what the call raised, as itself.
    """
    future, cancel = run.submit(fn, *args)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        cancel()
        raise


async def _ended(run: TrioThread[T]) -> None:
    # Shielded: a cancelled caller still waits for the thread, so nothing outlives it;
    # a second cancellation leaves the thread to finish on its own (it was told to stop).
    await asyncio.shield(asyncio.wrap_future(run.done))


@asynccontextmanager
async def open_tunnel(
    server_url: str, target: int | str | AsgiApp, **options: Unpack[TunnelOptions]
) -> AsyncIterator[Tunnel]:
    """Expose ``target`` through the relay at ``server_url`` for the duration of the block.

    The asyncio twin of :func:`tunnel2.open_tunnel`, with the same arguments
    (:class:`~tunnel2.sync.TunnelOptions`) and errors. Does not block the loop: the
    handshake and all traffic run on trio in a thread the block owns. Cancelling the task
    (or leaving the block) closes the tunnel; the block is left once the agent is gone
    from the relay. The code of an ASGI app given as ``target`` runs on the caller's own
    loop (``asgi_loop`` unset or ``"asyncio"``; ``"trio"`` keeps it on the tunnel's trio
    thread); its lifespan startup runs before the block is entered.

    Raises:
        HandshakeRefused: the relay refused the agent.
        HandshakeError: the relay could not be reached.
        RuntimeError: not called from asyncio (from trio use :func:`tunnel2.open_tunnel`).
    """
    require_async_library("asyncio", "tunnel2.aio.open_tunnel", "tunnel2.open_tunnel")
    if options.get("asgi_loop", "asyncio") == "asyncio":
        options["asgi_loop"] = asyncio.get_running_loop()
    async with run_in_trio_thread(
        lambda: api.open_tunnel(server_url, target, **options), "tunnel2-aio-tunnel"
    ) as run:
        yield Tunnel(run.ready.result(), run)


@asynccontextmanager
async def open_tunnel_server(config: ServerConfig | None = None) -> AsyncIterator[Relay]:
    """Run a relay for the duration of the block (the twin of
    :func:`tunnel2.open_tunnel_server`; it drains the same way on exit).

    Raises:
        OSError: the address could not be bound.
        RuntimeError: not called from asyncio.
    """
    require_async_library("asyncio", "tunnel2.aio.open_tunnel_server", "tunnel2.open_tunnel_server")
    async with run_in_trio_thread(
        lambda: api.open_tunnel_server(config), "tunnel2-aio-relay"
    ) as run:
        yield Relay(run.ready.result())
