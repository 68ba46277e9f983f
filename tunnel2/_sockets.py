"""A bare-socket trio Stream for the hot HTTP and uplink sockets.

Layer: bottom (beside frames). May import the standard library and trio.

``trio.SocketStream`` yields to the scheduler on every successful ``send``/``recv`` (a
cancel-shielded checkpoint, ~3 µs) and guards against concurrent use; on the data path that
is a third of the CPU per request (DESIGN.md, performance model: +13-17 % from bare sockets).
:class:`FastSocketStream` tries the non-blocking system call first and only waits for
readiness when it would block, so a call that does not block does not yield.

Contract differences from trio's streams, on purpose: a send or receive that does not block
is not a checkpoint (so it cannot be cancelled either); :meth:`aclose` is. Callers on the hot
path always reach a blocking wait per request, so no task can starve the others. Errors keep
trio's meanings (``ClosedResourceError``: we closed it; ``BrokenResourceError``: the peer
went away).

What a stream can do beyond :class:`trio.abc.Stream` is said by small Protocols
(:class:`HasPeerAddress`, :class:`CanTellPeerClosed`, :class:`CanSendNowait`; half-closing is
trio's :class:`trio.abc.HalfCloseableStream`), so callers check the ability, not the class,
and a wrapped stream (TLS, :mod:`tunnel2._tls`) keeps what it can forward (STYLE.md §10).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, Protocol, TypeGuard, final, runtime_checkable

import trio

__all__ = [
    "CanSendNowait",
    "CanTellPeerClosed",
    "FastSocketStream",
    "HasPeerAddress",
    "can_send_nowait",
    "can_tell_peer_closed",
    "connect_tcp",
    "has_peer_address",
    "peer_hung_up",
    "serve_socket",
    "take_socket",
]

logger = logging.getLogger(__name__)

_RECEIVE_SIZE: Final = 65536
_read: Final = os.read
_write: Final = os.write
# accept(2) errors after which accepting goes on: the connection was lost before we took it
# (retried at once, as trio's SocketListener does) or the system is short of descriptors or
# memory (retried after _ACCEPT_PAUSE seconds, as trio.serve_listeners does).
_ACCEPT_RETRY: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
)  # fmt: skip
_ACCEPT_CAPACITY: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_PAUSE: Final = 0.1
_ACCEPT_BATCH: Final = 16  # connections taken from the backlog between two yields


@runtime_checkable
class HasPeerAddress(Protocol):
    """A stream that knows the address of its peer (X-Forwarded-For)."""

    def getpeername(self) -> str:
        """The peer's address, or ``"unknown"``."""
        ...

    def peer_address(self) -> tuple[str, int]:
        """The peer's address and port, or ``("unknown", 0)``."""
        ...


@runtime_checkable
class CanTellPeerClosed(Protocol):
    """A stream that can tell, without waiting, that its peer hung up."""

    def peer_closed(self) -> bool:
        """True if the peer is gone (a peek; nothing is consumed)."""
        ...


@runtime_checkable
class CanSendNowait(Protocol):
    """A stream that can send without waiting (the uplink's fast path).

    :meth:`send_nowait` takes all of ``data`` at once; what the transport did not take yet
    is kept (:attr:`send_pending`) and goes out first with the next ``send_all``, and an
    empty ``send_all(b"")`` just flushes it. Never call it while a ``send_all`` is running.
    """

    def send_nowait(self, data: bytes) -> None:
        """Send ``data`` without waiting, keeping what the transport does not take now."""
        ...

    @property
    def send_pending(self) -> bool:
        """True if bytes taken by :meth:`send_nowait` still wait for the next ``send_all``."""
        ...


def _cached_check(ability: type) -> Callable[[object], bool]:
    """``isinstance(obj, ability)`` remembered per class: a runtime Protocol check costs
    ~12 µs on Python 3.11 (it walks the attributes each time), too much per connection."""
    known: dict[type, bool] = {}

    def check(obj: object) -> bool:
        cls = type(obj)
        result = known.get(cls)
        if result is None:
            result = known[cls] = isinstance(obj, ability)
        return result

    return check


_has_peer_address: Final = _cached_check(HasPeerAddress)
_can_tell_peer_closed: Final = _cached_check(CanTellPeerClosed)
_can_send_nowait: Final = _cached_check(CanSendNowait)


def has_peer_address(stream: object) -> TypeGuard[HasPeerAddress]:
    """``isinstance(stream, HasPeerAddress)``, fast."""
    return _has_peer_address(stream)


def can_tell_peer_closed(stream: object) -> TypeGuard[CanTellPeerClosed]:
    """``isinstance(stream, CanTellPeerClosed)``, fast."""
    return _can_tell_peer_closed(stream)


def can_send_nowait(stream: object) -> TypeGuard[CanSendNowait]:
    """``isinstance(stream, CanSendNowait)``, fast."""
    return _can_send_nowait(stream)


def peer_hung_up(sock: socket.socket) -> bool:
    """True if the peer of ``sock`` shut down its sending side, even with unread bytes left.

    For streams that wrap the socket (TLS), where unread bytes (a close_notify alert) may sit
    before the end of the stream. Uses ``POLLRDHUP`` where the system has it (Linux); elsewhere
    only an end with nothing unread before it is seen.
    """
    rdhup = getattr(select, "POLLRDHUP", 0)
    if rdhup:
        poller = select.poll()
        poller.register(sock, rdhup)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def take_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The stdlib socket of trio's ``sock``, which is left detached (never to be used again)."""
    return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())


@final
class FastSocketStream(trio.abc.HalfCloseableStream):
    """A trio stream over a non-blocking stdlib socket that it owns."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # No Nagle: we batch writes ourselves (DESIGN.md: Nagle + delayed ACK = 40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        # Data moves with os.read/os.write on the descriptor (Linux: read(2) and write(2) on
        # a socket are recv and send without flags): their arguments are parsed by Argument
        # Clinic, where socket.recv/send parse a format string (~500 instructions a call, ~3
        # calls a request on each side). The socket owns the descriptor and closes it.
        self._fd = sock.fileno()
        self._closed = False
        # Whether the last read would have blocked, and a poller for this socket, made then.
        # A read that raises BlockingIOError costs ~7,000 instructions (the exception from
        # errno: its message, its object, the unwinding); a zero-timeout poll of one socket
        # ~1,000. A socket whose reads wait for the peer turn by turn (the uplink: the next
        # message comes after the one just read was answered) is probed before it is read;
        # one that finds its bytes there (a client's next request) is read at once.
        self._poller: select.poll | None = None
        self._expect_wait = False
        self._unsent = b""  # what send_nowait could not send yet; goes out first
        # True while _unsent holds bytes: a plain attribute, read per message on the data
        # path (the uplink, the relay's client writes) where a property costs a call.
        self.send_pending = False

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> FastSocketStream:
        """Take over the socket of a ``trio.SocketStream`` (which must not be used again)."""
        return cls(take_socket(stream.socket))

    def __repr__(self) -> str:
        return f"<FastSocketStream fd={self.socket.fileno()}>"

    def getpeername(self) -> str:
        """The peer's address, or ``"unknown"``."""
        return self.peer_address()[0]

    def peer_address(self) -> tuple[str, int]:
        """The peer's address and port, or ``("unknown", 0)``."""
        try:
            name = self.socket.getpeername()
        except OSError:
            return "unknown", 0
        if not isinstance(name, tuple):  # AF_UNIX: a path
            return "unknown", 0
        return str(name[0]), int(name[1])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
            self.send_pending = False
        fd = self._fd
        try:
            try:
                sent = _write(fd, data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            view = memoryview(data)
            while sent < len(view):
                try:
                    sent += _write(fd, view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    self._check_open_after_wait()
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed") from None
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    def send_nowait(self, data: bytes) -> None:
        """Send ``data`` without waiting; what the socket does not take now is kept and goes
        out first with the next :meth:`send_all` (see :class:`CanSendNowait`).

        Raises:
            trio.BrokenResourceError: the peer went away.
            trio.ClosedResourceError: this side closed the stream.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._unsent:
            self._unsent += data
            return
        try:
            sent = _write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc
        if sent < len(data):
            self._unsent = data[sent:]
            self.send_pending = True

    def peer_closed(self) -> bool:
        """True if the peer closed its side and nothing unread is left (a peek, no wait)."""
        if self._closed:
            return True
        try:
            return self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    async def peek(self, max_bytes: int) -> bytes:
        """Wait for bytes and return up to ``max_bytes`` of them without consuming them
        (``b""`` once the peer closed). Always a checkpoint (it is not on the data path)."""
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        while True:
            await trio.lowlevel.wait_readable(self.socket)
            with contextlib.suppress(BlockingIOError):
                try:
                    return self.socket.recv(max_bytes, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except ConnectionError as exc:
                    raise trio.BrokenResourceError(f"receive failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        fd = self._fd
        size = max_bytes or _RECEIVE_SIZE
        if self._expect_wait:
            assert self._poller is not None
            if self._poller.poll(0):
                self._expect_wait = False  # the bytes are there: read as soon as asked again
            elif size > 0:
                await trio.lowlevel.wait_readable(fd)
                self._check_open_after_wait()
        while True:
            try:
                return _read(fd, size)
            except BlockingIOError:
                if self._poller is None:
                    self._poller = select.poll()
                    self._poller.register(fd, select.POLLIN)
                self._expect_wait = True
                await trio.lowlevel.wait_readable(fd)
                self._check_open_after_wait()
            except OSError as exc:
                if size < 1:
                    raise ValueError(f"max_bytes must be at least 1, not {max_bytes}") from None
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed") from None
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc

    def _check_open_after_wait(self) -> None:
        # Woken, then closed by another task in the same batch (notify_closing found no
        # waiter): the descriptor may already be another connection's, so it must not be
        # read or written again.
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(f"shutdown failed: {exc}") from exc
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close the socket now (what :meth:`aclose` does, without the checkpoint)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


async def serve_socket(
    sock: socket.socket,
    handler: Callable[[FastSocketStream], Awaitable[object]],
    nursery: trio.Nursery,
) -> NoReturn:
    """Accept connections on the listening ``sock`` (which it owns and closes) until
    cancelled, and start ``handler(stream)`` in ``nursery`` for each; the handler closes it.

    What ``trio.serve_listeners`` does, without its per-connection ``trio.SocketStream``
    (built, then taken over by :class:`FastSocketStream`), its wrapper task frame and its
    second close (a cancel scope and a checkpoint per connection): the accepted socket goes
    straight into a :class:`FastSocketStream`. It yields after at most ``_ACCEPT_BATCH``
    connections, so a flood of them cannot starve the connections already open.
    """
    sock.setblocking(False)
    try:
        while True:
            for _ in range(_ACCEPT_BATCH):
                try:
                    conn, _address = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_RETRY:
                        continue
                    if exc.errno not in _ACCEPT_CAPACITY:
                        raise
                    logger.error("accept failed, retrying in %gs", _ACCEPT_PAUSE, exc_info=True)
                    await trio.sleep(_ACCEPT_PAUSE)
                    break
                nursery.start_soon(handler, FastSocketStream(conn))
            else:
                await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def connect_tcp(host: str, port: int) -> FastSocketStream:
    """Open a TCP connection to a numeric or resolvable ``host``.

    Raises:
        OSError: the connection was refused or the name did not resolve.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _name, address in infos:
        sock = socket.socket(family, type_, proto)
        stream = FastSocketStream(sock)
        try:
            err = sock.connect_ex(address)
            if err == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            return stream
        except OSError as exc:
            last = exc
            await trio.aclose_forcefully(stream)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    raise last or OSError(f"no address for {host}:{port}")
