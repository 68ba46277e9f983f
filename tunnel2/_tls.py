"""TLS over the bare-socket streams: contexts, a stream that keeps its abilities, and the
answer a TLS port gives to plain HTTP.

Layer: bottom (beside :mod:`tunnel2._sockets`). May import the standard library, trio,
:mod:`tunnel2._sockets`, :mod:`tunnel2._http11` and :mod:`tunnel2.errors`.

:class:`TlsStream` is ``trio.SSLStream`` over a :class:`~tunnel2._sockets.FastSocketStream`,
wrapped so that what the socket can do and TLS allows is still there (STYLE.md §10): the peer
address, noticing a peer that hung up (a TLS close_notify may sit unread before the end, so the
socket is asked whether its peer shut down rather than peeked for an empty read). It cannot
half-close (TLS 1.2 has no half-close) and has no ``send_nowait`` (encrypting goes through
trio's SSL state machine), so callers that check those abilities take the ordinary path.
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
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=ca_file)
    except OSError as exc:
        raise ValueError(
            f"cannot load the CA certificates in {ca_file}: {_os_reason(exc)}"
        ) from exc


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):  # e.g. KEY_VALUES_MISMATCH; none for a non-PEM file
        return exc.reason.lower().replace("_", " ") if exc.reason else "not valid PEM"
    return exc.strerror or str(exc)


def _failure_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed, in words (trio hides the ssl error as the cause)."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    if cause is not None:
        return str(cause) or type(cause).__name__
    return str(exc) or "the peer closed the connection during the TLS handshake"


@final
class TlsStream(trio.abc.Stream):
    """A TLS connection over a :class:`FastSocketStream` that it owns.

    Implements :class:`~tunnel2._sockets.HasPeerAddress` and
    :class:`~tunnel2._sockets.CanTellPeerClosed`. Trailing data after the peer's last record
    without a close_notify reads as the end of the stream (``https_compatible``): every
    protocol carried here frames its own messages.

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
        self._ssl = trio.SSLStream(
            transport,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            https_compatible=True,
        )
        self._name = server_hostname or transport.getpeername()
        self._plain_http = plain_http
        self._handshake_timeout = handshake_timeout
        self._handshaken = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<TlsStream {self._name} over {self.transport!r}>"

    def getpeername(self) -> str:
        """The peer's address, or ``"unknown"``."""
        return self.transport.getpeername()

    def peer_closed(self) -> bool:
        """True if the peer shut down its side of the connection (no wait, nothing read)."""
        return self._closed or peer_hung_up(self.transport.socket)

    async def do_handshake(self) -> None:
        """Run the TLS handshake now, within ``handshake_timeout`` (otherwise the first send
        or receive runs it); returns at once if it is done.

        Raises:
            trio.BrokenResourceError: the handshake failed (the message says why, e.g.
                ``certificate verify failed: unable to get local issuer certificate``), took
                too long, or the peer spoke plain HTTP (answered by ``plain_http``).
        """
        if self._handshaken:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(self._handshake_timeout) as scope:
            if self._plain_http is not None:
                answer, self._plain_http = self._plain_http, None
                first = await self.transport.peek(1)
                if first and first[0] != _TLS_HANDSHAKE_RECORD:
                    await answer(self.transport)
                    raise trio.BrokenResourceError("plain HTTP on a TLS port (answered)")
            try:
                await self._ssl.do_handshake()
            except trio.BrokenResourceError as exc:
                raise trio.BrokenResourceError(
                    f"TLS handshake with {self._name} failed: {_failure_reason(exc)}"
                ) from exc
            self._handshaken = True
        if scope.cancelled_caught:
            raise trio.BrokenResourceError(
                f"no TLS handshake from {self._name} within {self._handshake_timeout:g}s"
            )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._handshaken:
            await self.do_handshake()
        await self._ssl.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._ssl.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._handshaken:
            await self.do_handshake()
        data = await self._ssl.receive_some(max_bytes)
        return data if isinstance(data, bytes) else bytes(data)  # (it is bytes: SSLObject.read)

    def close(self) -> None:
        """Close the connection now, without a close_notify (a pooled one found dead)."""
        self._closed = True
        self.transport.close()

    async def aclose(self) -> None:
        self._closed = True
        await self._ssl.aclose()


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


def _plain_answer(status: bytes, message: str, location: str | None = None) -> bytes:
    body = f"{message}\n".encode()
    return b"".join(
        [
            b"HTTP/1.1 %s\r\n" % status,
            b"Location: %s\r\n" % location.encode() if location else b"",
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body),
            body,
        ]
    )


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
        answer = _plain_answer(b"400 Bad Request", "this port speaks https: use https://")
    else:
        host = request.get(b"host")
        netloc = (
            host.decode()
            if host and _HOST_RE.fullmatch(host)
            else urllib.parse.urlsplit(base_url).netloc
        )
        target = request.target.decode() if request.target.startswith(b"/") else "/"
        location = f"https://{netloc}{target}"
        answer = _plain_answer(
            b"308 Permanent Redirect", f"this port speaks https: use {location}", location
        )
    await stream.send_all(answer)
