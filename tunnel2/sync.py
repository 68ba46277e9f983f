"""The synchronous front door: a tunnel or a relay on trio in a background thread it owns.

Layer: beside api (imports api, agent, server; nothing imports it but ``tunnel2`` itself,
:mod:`tunnel2.aio` and :mod:`tunnel2.testing`). For scripts, the REPL, threads, Flask and
Django::

    with tunnel2.connect(8080, server="http://127.0.0.1:8000") as tunnel:
        print(tunnel.public_url)
        ...                      # the tunnel serves while this thread does anything

Invariant: each handle owns one thread running one ``trio.run``, and every task of that run
lives inside the async context manager the handle holds open (``open_tunnel`` /
``open_tunnel_server``), so closing the handle is leaving that block: the same drain and
cleanup as the trio API. Nothing crosses the thread boundary but plain values, the trio
token (whose ``run_sync_soon`` is thread-safe) and :class:`concurrent.futures.Future`
objects, which asyncio can await (:mod:`tunnel2.aio` builds on this).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypedDict, TypeVar, Unpack, final

import trio

from tunnel2._util import unwrap_lone_error
from tunnel2.agent import Agent
from tunnel2.api import open_tunnel, open_tunnel_server
from tunnel2.server import ServerConfig, TunnelServer

if TYPE_CHECKING:
    from tunnel2.asgi import AsgiApp, AsgiLoop
    from tunnel2.inspect import Exchange

logger = logging.getLogger(__name__)

__all__ = [
    "AgentView",
    "Relay",
    "RelayView",
    "ThreadHandle",
    "TrioThread",
    "Tunnel",
    "TunnelOptions",
    "connect",
    "start_relay",
]

T = TypeVar("T")
R = TypeVar("R")

#: Seconds :func:`atexit` gives each handle still open at interpreter exit.
EXIT_TIMEOUT: float = 5.0

_open_runs: weakref.WeakSet[TrioThread[Any]] = weakref.WeakSet()


@final
class TrioThread(Generic[T]):
    """Holds an async context manager open in ``trio.run`` on a daemon thread.

    ``ready`` resolves to the value the block yields (or the exception entering it
    raised); ``done`` resolves when the run has ended (to the exception leaving the block
    raised, if any). Both are :class:`concurrent.futures.Future`, so a thread waits with
    ``.result()`` and asyncio with ``asyncio.wrap_future``. The building block of
    :class:`ThreadHandle` (:func:`connect`, :func:`start_relay`), :mod:`tunnel2.aio` and
    the thread-backed memory tunnels of :mod:`tunnel2.testing`.

    The thread is a daemon (so a forgotten run cannot keep the interpreter alive) and is
    joined by its owner; runs still open at exit are stopped and joined by an
    :mod:`atexit` hook, within ``EXIT_TIMEOUT`` seconds each.
    """

    def __init__(self, open_block: Callable[[], AbstractAsyncContextManager[T]], name: str) -> None:
        self.ready: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._open_block = open_block
        self._token: trio.lowlevel.TrioToken | None = None
        self._token_set = threading.Event()
        self._stop = False
        self._stop_event: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._calls: trio.Nursery | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def __repr__(self) -> str:
        state = "RUNNING" if self._thread.is_alive() else "STOPPED"
        return f"<TrioThread {self._thread.name} {state}>"

    def start(self) -> None:
        """Start the thread; the block is entered there (watch :attr:`ready`)."""
        _open_runs.add(self)
        self._thread.start()

    def stop(self) -> None:
        """Ask the run to leave the block (or to give up entering it). Never blocks."""
        self._stop = True
        if self._thread.ident is None:  # not started: it will see _stop when it starts
            return
        self._token_set.wait()  # set at once by a started run
        if self._token is None:  # the run already ended
            return
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._stop_in_trio)

    def join(self, timeout: float | None) -> bool:
        """Wait for the thread to end; ``False`` if it is still running after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def submit(
        self, fn: Callable[..., Awaitable[R]], *args: object
    ) -> tuple[concurrent.futures.Future[R], Callable[[], None]]:
        """Run ``await fn(*args)`` in the run's nursery for calls.

        Returns:
            A future for its result, and a thread-safe function that cancels the call.

        Raises:
            RuntimeError: the block is not open (before :attr:`ready`, or after it ended).
        """
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        scope = trio.CancelScope()

        async def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                with scope:
                    result = await fn(*args)
            except trio.Cancelled:  # the run is ending: the caller hears, trio unwinds
                future.set_exception(concurrent.futures.CancelledError())
                raise
            except BaseException as exc:
                future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                if scope.cancelled_caught:
                    future.set_exception(concurrent.futures.CancelledError())
                else:
                    future.set_result(result)

        def cancel() -> None:
            future.cancel()
            if self._token is not None:
                with suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(scope.cancel)

        calls, token = self._calls, self._token
        if calls is None or token is None:
            raise RuntimeError("the background trio run is not open")
        try:
            token.run_sync_soon(calls.start_soon, call)
        except trio.RunFinishedError:
            raise RuntimeError("the background trio run has ended") from None
        return future, cancel

    def _stop_in_trio(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        elif self._scope is not None:
            self._scope.cancel()

    def _main(self) -> None:
        try:
            with unwrap_lone_error():  # so callers catch OSError, HandshakeRefused...
                trio.run(self._run)
        except BaseException as exc:  # reported through the futures, never lost
            if not self.ready.done():
                self.ready.set_exception(exc)
            self.done.set_exception(exc)
        else:
            if not self.ready.done():
                self.ready.set_exception(RuntimeError("stopped before the tunnel was open"))
            self.done.set_result(None)
        finally:
            self._token = None
            self._token_set.set()
            _open_runs.discard(self)

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._token_set.set()
        with trio.CancelScope() as self._scope:
            if self._stop:
                self._scope.cancel()
            async with self._open_block() as value, trio.open_nursery() as self._calls:
                stop = self._stop_event = trio.Event()
                if self._stop:
                    stop.set()
                self.ready.set_result(value)
                await stop.wait()
                self._calls.cancel_scope.cancel()
                self._calls = None


class ThreadHandle(Generic[T]):
    """A :class:`TrioThread` started and entered at construction: what :class:`Tunnel`,
    :class:`Relay` and :class:`tunnel2.testing.SyncMemoryTunnel` share (close, ``with``).

    Raises (from the constructor):
        TimeoutError: the block was not entered within ``timeout`` seconds.
        Exception: what entering the block raised, as itself.
    """

    def __init__(
        self, open_block: Callable[[], AbstractAsyncContextManager[T]], name: str, timeout: float
    ) -> None:
        self._run = TrioThread(open_block, name)
        self._run.start()
        try:
            self._value = self._run.ready.result(timeout)
        except concurrent.futures.TimeoutError:
            self._run.stop()
            self._run.join(EXIT_TIMEOUT)
            raise TimeoutError(f"{name} did not start within {timeout}s") from None
        except BaseException:  # the run's own error (it has ended), or KeyboardInterrupt here
            self._run.stop()
            self._run.join(EXIT_TIMEOUT)
            raise
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called or the background run ended."""
        return self._closed or self._run.done.done()

    def close(self, timeout: float | None = None) -> None:
        """Leave the block (drain, then cancel) and join the thread. Idempotent.

        Args:
            timeout: seconds to wait for the thread; ``None`` waits as long as the drain
                takes (bounded by the relay's ``drain_timeout``).

        Raises:
            TimeoutError: the thread was still running after ``timeout``.
            Exception: what the background run raised after it started (a final refusal
                on re-dial, a bug), once.
        """
        first = not self._closed
        self._closed = True
        self._run.stop()
        if not self._run.join(timeout):
            raise TimeoutError(f"{self._run!r} still running after {timeout}s")
        if first:
            self._run.done.result(0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AgentView:
    """Plain facts about a connected agent, safe to read from any thread."""

    _value: Agent

    @property
    def public_url(self) -> str:
        """The session's preferred public URL."""
        return self._value.public_url

    @property
    def public_urls(self) -> tuple[str, ...]:
        """Every public URL of the session, preferred first."""
        return self._value.public_urls

    @property
    def session_id(self) -> str:
        """The session id the relay assigned (or granted)."""
        session_id = self._value.session_id
        assert session_id is not None  # set by the handshake the opener waited for
        return session_id


class RelayView:
    """Plain facts about a listening relay, safe to read from any thread."""

    _value: TunnelServer

    @property
    def base_url(self) -> str:
        """The relay's base URL, with the bound port (agents dial it; visitors use it)."""
        return self._value.base_url

    @property
    def port(self) -> int:
        """The bound port."""
        return self._value.port


@final
class Tunnel(ThreadHandle[Agent], AgentView):
    """A tunnel served from a background thread; made by :func:`connect`.

    The agent lives in the thread and is not shared: read the plain attributes here.
    """

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else "OPEN"
        return f"<tunnel2.sync.Tunnel {self.public_url} {state}>"

    # --- inspect ---

    def requests(self, timeout: float | None = 5.0) -> list[Exchange]:
        """The recent exchanges, oldest first (:meth:`tunnel2.Agent.requests`), read on
        the tunnel's thread.

        Raises:
            RuntimeError: inspection is off (``connect(..., inspect=True)``).
        """
        return self._call(_snapshot, self._value, timeout=timeout)

    def replay(self, exchange_id: int, timeout: float | None = 60.0) -> Exchange:
        """Replay exchange ``exchange_id`` (:meth:`tunnel2.Agent.replay`), blocking this
        thread for at most ``timeout`` seconds; returns the new exchange.

        Raises:
            TimeoutError: no answer within ``timeout`` (the replay is cancelled).
            RuntimeError, KeyError, ValueError: as :meth:`tunnel2.Agent.replay`.
        """
        return self._call(self._value.replay, exchange_id, timeout=timeout)

    def _call(self, fn: Callable[..., Awaitable[R]], *args: object, timeout: float | None) -> R:
        future, cancel = self._run.submit(fn, *args)
        try:
            return future.result(timeout)
        except TimeoutError:
            cancel()
            raise


async def _snapshot(agent: Agent) -> list[Exchange]:
    """``agent.requests()`` as a call on the agent's own thread (the ring changes there)."""
    await trio.lowlevel.checkpoint()
    return agent.requests()


@final
class Relay(ThreadHandle[TunnelServer], RelayView):
    """A relay served from a background thread; made by :func:`start_relay`."""

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else "OPEN"
        return f"<tunnel2.sync.Relay {self.base_url} {state}>"


class TunnelOptions(TypedDict, total=False):
    """The options of :func:`tunnel2.open_tunnel`, which :func:`connect` and
    :func:`tunnel2.aio.open_tunnel` pass on unchanged (see it for their meaning)."""

    session_id: str | None
    token: str | None
    max_concurrent: int
    max_queued: int
    connect_timeout: float
    host_header: str | None
    asgi_loop: AsgiLoop
    # --- inspect ---
    inspect: bool
    inspect_capacity: int
    inspect_body_bytes: int


def connect(
    target: int | str | AsgiApp, *, server: str, **options: Unpack[TunnelOptions]
) -> Tunnel:
    """Expose ``target`` through the relay at ``server`` from a background thread.

    Blocks until the relay has welcomed the agent, then returns; the tunnel serves (and
    re-dials) in its own thread until :meth:`Tunnel.close` or the end of a ``with`` block.
    Handles left open are closed at interpreter exit (at most ``EXIT_TIMEOUT`` seconds
    each). The options (:class:`TunnelOptions`) are :func:`tunnel2.open_tunnel`'s: the
    code of an ASGI app given as ``target`` runs on an asyncio loop in a thread of its own
    (``asgi_loop="trio"``: on the tunnel's trio thread), and its lifespan startup has run
    when this returns.

    Raises:
        HandshakeRefused: the relay refused the agent (``.reason`` says why).
        HandshakeError: the relay could not be reached.
        HandshakeTimeout: no answer within ``connect_timeout``.
        AppStartupError: the ASGI app's lifespan startup failed.
    """
    timeout = options.get("connect_timeout", 10.0) + EXIT_TIMEOUT
    return Tunnel(lambda: open_tunnel(server, target, **options), "tunnel2-tunnel", timeout)


def start_relay(config: ServerConfig | None = None) -> Relay:
    """Run a relay from a background thread until :meth:`Relay.close`.

    Returns once it listens (``config.port = 0`` picks a free port: read
    :attr:`Relay.base_url`). Closing drains like :func:`tunnel2.open_tunnel_server`.

    Raises:
        OSError: the address could not be bound.
    """
    return Relay(lambda: open_tunnel_server(config), "tunnel2-relay", EXIT_TIMEOUT)


@atexit.register
def _close_open_runs() -> None:
    # Daemon threads would just stop mid-run at exit; leave their blocks properly instead,
    # each within a bound so that exit never hangs.
    runs = list(_open_runs)
    for run in runs:
        run.stop()
    for run in runs:
        if not run.join(EXIT_TIMEOUT):
            logger.warning("%r did not stop within %ss at exit", run, EXIT_TIMEOUT)
