"""TLS over the bare-socket streams: contexts, a stream that keeps its abilities, and the
answer a TLS port gives to plain HTTP.

Layer: bottom (beside :mod:`tunnel2._sockets`). May import the standard library, trio,
:mod:`tunnel2._sockets`, :mod:`tunnel2._http11` and :mod:`tunnel2.errors`.

:class:`TlsStream` is TLS over a :class:`~tunnel2._sockets.FastSocketStream` that keeps
what the socket can do and TLS allows (STYLE.md §10): the peer address, noticing a peer that
hung up (a TLS close_notify may sit unread before the end, so the socket is asked whether its
peer shut down rather than peeked for an empty read), and the fast send path
(``send_nowait``). It cannot half-close (TLS 1.2 has none), so callers that check for
:class:`trio.abc.HalfCloseableStream` take the ordinary path. It drives an
:class:`ssl.SSLObject` itself rather than wrapping ``trio.SSLStream``, whose general machinery
(a retry loop, locks and a checkpoint per call) cost more than the encryption, and which
cannot send without waiting.
"""

from __future__ import annotations

import contextlib
import math
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Final, final

import trio

from tunnel2 import _http11 as http
from tunnel2._sockets import FastSocketStream, peer_hung_up
from tunnel2.errors import ProtocolError

__all__ = [
    "SocketOrTls",
    "TlsStream",
    "answer_plain_http",
    "client_context",
    "server_context",
    "wrap_client",
]

_TLS_HANDSHAKE_RECORD: Final = 0x16  # the first byte of every TLS ClientHello
_RECEIVE_SIZE: Final = 65536
_HOST_RE: Final = re.compile(rb"[A-Za-z0-9.\-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")

PlainHttpHandler = Callable[[FastSocketStream], Awaitable[None]]


def server_context(cert_file: str, key_file: str | None = None) -> ssl.SSLContext:
    """A server context with the certificate chain in ``cert_file`` (PEM) and its key.

    Args:
        cert_file: the certificate, then any intermediates.
        key_file: the private key; ``None`` if it is in ``cert_file``.

    Raises:
        ValueError: a file cannot be read, holds no valid certificate or key, or they do
            not match; the message names the file and the reason.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except OSError as exc:  # ssl.SSLError is one too
        files = cert_file if key_file is None else f"{cert_file} / {key_file}"
        raise ValueError(f"cannot load the TLS certificate {files}: {_os_reason(exc)}") from exc
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_RENEGOTIATION  # (TlsStream writes never wait for a read)
    return context


def client_context(ca_file: str | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A client context that verifies the peer's certificate and host name.

    Args:
        ca_file: trust only the CA certificates in this PEM file; ``None`` trusts the
            system's store.
        verify: ``False`` accepts any certificate (``--backend-insecure``).

    Raises:
        ValueError: ``ca_file`` cannot be read or holds no valid certificate.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file if verify else None)
    except OSError as exc:
        raise ValueError(
            f"cannot load the CA certificates in {ca_file}: {_os_reason(exc)}"
        ) from exc
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_RENEGOTIATION  # (TlsStream writes never wait for a read)
    return context


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):  # e.g. KEY_VALUES_MISMATCH; none for a non-PEM file
        return exc.reason.lower().replace("_", " ") if exc.reason else "not valid PEM"
    return exc.strerror or str(exc)


def _failure_reason(exc: ssl.SSLError) -> str:
    """Why a TLS handshake failed, in words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return "the peer closed the connection during the TLS handshake"
    return (exc.reason or str(exc)).lower().replace("_", " ")


@final
class TlsStream(trio.abc.Stream):
    """A TLS connection over a :class:`FastSocketStream` that it owns, driven by an
    :class:`ssl.SSLObject` over memory buffers in the caller's task.

    Implements :class:`~tunnel2._sockets.HasPeerAddress`,
    :class:`~tunnel2._sockets.CanTellPeerClosed` and :class:`~tunnel2._sockets.CanSendNowait`;
    like the socket under it, a send or receive that does not block is not a checkpoint.
    One task may send and one receive at a time (``trio.BusyResourceError`` otherwise).
    Ciphertext leaves in the order it was made: it is taken from the outgoing buffer and
    written to the socket only under the send lock (a receive can produce some: a TLS 1.3
    key update answer). The end of the stream without a close_notify reads as the end
    (``https_compatible`` in trio's terms): every protocol carried here frames its own
    messages. Closing sends no close_notify.

    Args:
        transport: the TCP connection.
        context: the TLS settings.
        server_side: accept (True) or initiate (False) the handshake.
        server_hostname: the name the client checks the certificate for and sends as SNI.
        plain_http: server side only: if the peer's first byte is not a TLS handshake, this
            is awaited with the transport (to answer in plain HTTP), and the handshake fails.
        handshake_timeout: seconds the handshake (and a plain-HTTP answer) may take when the
            first send or receive runs it; a relay's bound on clients that connect and stay
            silent, whatever the caller waits for.
    """

    def __init__(
        self,
        transport: FastSocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        plain_http: PlainHttpHandler | None = None,
        handshake_timeout: float = math.inf,
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._name = server_hostname or transport.getpeername()
        self._plain_http = plain_http
        self._handshake_timeout = handshake_timeout
        self._handshaken = False
        self._handshake_lock = trio.Lock()
        self._send_lock = trio.Lock()  # held while ciphertext is taken and written
        self._unsent = b""  # ciphertext made while another task held the send lock
        self._sending = False
        self._receiving = False
        self._broken: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<TlsStream {self._name} over {self.transport!r}>"

    def getpeername(self) -> str:
        """The peer's address, or ``"unknown"``."""
        return self.transport.getpeername()

    def peer_address(self) -> tuple[str, int]:
        """The peer's address and port, or ``("unknown", 0)``."""
        return self.transport.peer_address()

    def peer_closed(self) -> bool:
        """True if the peer shut down its side of the connection (no wait, nothing read)."""
        return self._closed or peer_hung_up(self.transport.socket)

    @property
    def send_pending(self) -> bool:
        """True if bytes taken by :meth:`send_nowait` wait for the next :meth:`send_all`."""
        return bool(self._unsent) or self.transport.send_pending

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    def _fail(self, message: str) -> trio.BrokenResourceError:
        self._broken = message
        return trio.BrokenResourceError(message)

    async def _write_out(self) -> None:
        """Write the ciphertext made so far; the caller holds the send lock."""
        data = self._unsent + self._outgoing.read()
        self._unsent = b""
        if not data and not self.transport.send_pending:
            return
        try:
            await self.transport.send_all(data)
        except BaseException as exc:  # a cancelled or failed write leaves a stream broken
            if not self._closed:
                self._broken = f"send failed: {exc}"
            raise

    async def _write_locked(self) -> None:
        """:meth:`_write_out` under the send lock, taken without a yield if it is free."""
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            await self._write_out()
        finally:
            lock.release()

    async def _read_more(self) -> None:
        """Move what the socket has into the incoming buffer (waiting for it)."""
        data = await self.transport.receive_some(_RECEIVE_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        """Run the TLS handshake now, within ``handshake_timeout`` (otherwise the first send
        or receive runs it); returns at once if it is done.

        Raises:
            trio.BrokenResourceError: the handshake failed (the message says why, e.g.
                ``certificate verify failed: unable to get local issuer certificate``), took
                too long, or the peer spoke plain HTTP (answered by ``plain_http``).
        """
        async with self._handshake_lock:
            if self._handshaken:
                return
            self._check()
            with trio.move_on_after(self._handshake_timeout) as scope:
                await self._handshake()
            if scope.cancelled_caught:
                raise self._fail(
                    f"no TLS handshake from {self._name} within {self._handshake_timeout:g}s"
                )

    async def _handshake(self) -> None:
        if self._plain_http is not None:
            answer, self._plain_http = self._plain_http, None
            first = await self.transport.peek(1)
            if first and first[0] != _TLS_HANDSHAKE_RECORD:
                await answer(self.transport)
                raise self._fail("plain HTTP on a TLS port (answered)")
        while True:
            try:
                self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                raise self._fail(
                    f"TLS handshake with {self._name} failed: {_failure_reason(exc)}"
                ) from exc
            await self._write_locked()
            if done:
                self._handshaken = True
                return
            await self._read_more()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._handshaken:
            await self.do_handshake()
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            if data:
                try:
                    self._tls.write(data)
                except ssl.SSLError as exc:
                    raise self._fail(f"TLS write failed: {exc}") from exc
            await self._write_locked()
        finally:
            self._sending = False

    def send_nowait(self, data: bytes) -> None:
        """Encrypt and send ``data`` without waiting; what the socket does not take now goes
        out first with the next :meth:`send_all` (see :class:`~tunnel2._sockets.CanSendNowait`).

        Raises:
            trio.BrokenResourceError: the connection broke (or never completed a handshake).
            trio.ClosedResourceError: this side closed the stream.
        """
        self._check()
        if not self._handshaken:
            raise trio.BrokenResourceError("send_nowait before the TLS handshake")
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise self._fail(f"TLS write failed: {exc}") from exc
        if self._send_lock.locked():  # a receive is writing a reply: queue behind it
            self._unsent += self._outgoing.read()
        else:
            self.transport.send_nowait(self._unsent + self._outgoing.read())
            self._unsent = b""

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._handshaken:
            await self.do_handshake()
        self._check()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            size = max_bytes or _RECEIVE_SIZE
            while True:
                try:
                    data: bytes | None = self._read_records(size)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._outgoing.read()  # (an alert for a peer that is gone)
                    return b""  # close_notify, or the end without one
                except ssl.SSLError as exc:
                    raise self._fail(f"TLS read failed: {exc}") from exc
                if self._outgoing.pending:  # e.g. the answer to a TLS 1.3 key update
                    await self._write_locked()
                if data is not None:
                    return data
                await self._read_more()
        finally:
            self._receiving = False

    def _read_records(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext: every whole record the incoming buffer holds
        (one read returns one record, 16 KiB at most), not just the first."""
        tls = self._tls
        data = tls.read(size)
        if len(data) >= size or not self._incoming.pending:
            return data
        chunks = [data]
        total = len(data)
        while total < size and self._incoming.pending:
            try:
                more = tls.read(size - total)
            except ssl.SSLError:  # a partial record, or the end: the next call sees it
                break
            if not more:
                break
            chunks.append(more)
            total += len(more)
        return b"".join(chunks)

    def close(self) -> None:
        """Close the connection now (a pooled one found dead)."""
        self._closed = True
        self.transport.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


# A client connection: plain TCP, or TLS over it (relay or https backend).
SocketOrTls = FastSocketStream | TlsStream


async def wrap_client(
    transport: FastSocketStream, context: ssl.SSLContext, server_hostname: str
) -> TlsStream:
    """Run the client side of a TLS handshake on ``transport``; on failure it is closed.

    Takes no timeout: callers use :func:`trio.fail_after`.

    Raises:
        trio.BrokenResourceError: the handshake failed; the message says why.
    """
    stream = TlsStream(transport, context, server_side=False, server_hostname=server_hostname)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def answer_plain_http(
    stream: trio.abc.Stream, *, base_url: str, max_head_size: int = http.MAX_HEAD_SIZE
) -> None:
    """Answer a plain-HTTP request that reached a TLS port: 308 to the same URL with
    ``https``, or 400 if the request cannot be read.

    The target host is the request's Host (the name the client used, same port), or the
    netloc of ``base_url`` without one. Takes no timeout (the caller's deadline applies) and
    leaves ``stream`` open.
    """
    buf = bytearray()
    end = -1
    while end < 0 and len(buf) <= max_head_size:
        data = await stream.receive_some(_RECEIVE_SIZE)
        if not data:
            return
        buf += data
        end = http.find_head_end(buf)
    request = None
    if end >= 0:
        with contextlib.suppress(ProtocolError):
            request = http.parse_request_head(bytes(buf[:end]), max_size=max_head_size)
    if request is None:
        answer = http.plain_response(
            400, "this port speaks https: use https://", close=True, error=False
        )
    else:
        host = request.get(b"host")
        netloc = (
            host.decode()
            if host and _HOST_RE.fullmatch(host)
            else urllib.parse.urlsplit(base_url).netloc
        )
        target = request.target.decode() if request.target.startswith(b"/") else "/"
        location = f"https://{netloc}{target}"
        answer = http.plain_response(
            308,
            f"this port speaks https: use {location}",
            close=True,
            headers=b"Location: %s\r\n" % location.encode(),
            error=False,
        )
    await stream.send_all(answer)
