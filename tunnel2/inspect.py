"""The inspector: a bounded ring of the agent's recent exchanges, replay, and its web page.

Layer: beside the agent (which imports it), above uplink. May import trio, attrs, frames,
transports, uplink, errors, access, backend's head helper and the internal HTTP/1.1 parser.
None of its code runs on the data path unless inspection is on (``AgentConfig.inspect``).

:class:`Inspector` wraps the agent's stream handler: each stream the handler gets is a
:class:`_RecordingStream` around the real :class:`~tunnel2.uplink.TunnelStream`, which
copies the request and response heads and the first ``body_bytes`` of each body into a
record on its way through. The ring keeps the last ``capacity`` records, so memory is bounded
by construction: ``capacity`` x (2 x ``body_bytes`` + the two heads, each at most
``MAX_HEAD_SIZE``). Heads are parsed, and credentials redacted, only when someone looks
(:meth:`Inspector.requests`), never on the data path. With inspection off there is no
wrapper at all.

A replay sends a recorded request to the same handler again, over an in-memory uplink pair
of its own (the real :class:`~tunnel2.uplink.TunnelStream` code, not the relay): the handler
cannot tell it from a visitor's request, and the answer is recorded as a new exchange
marked ``replay_of``.

:class:`InspectorApp` is the web side, mounted by the agent's admin app
(:mod:`tunnel2.admin`): the page at ``/``, ``GET /api/requests``, ``GET /api/requests/{id}``,
``GET /api/events`` (Server-Sent Events) and ``POST /api/requests/{id}/replay``. It is an
unauthenticated local control plane, so it answers only requests whose ``Host`` is an IP
address or ``localhost`` (no DNS rebinding), and a replay only when it is a same-origin
``POST`` with a JSON body (no cross-site request forgery).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import importlib.resources
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final, cast, final

import attrs
import trio

from tunnel2 import _http11 as http
from tunnel2 import frames
from tunnel2.access import CREDENTIAL_HEADER
from tunnel2.backend import _relay_head_framing
from tunnel2.errors import ErrorCode, ProtocolError, StreamReset, UplinkClosed
from tunnel2.transports import memory_transport_pair
from tunnel2.uplink import TunnelStream, open_uplink

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "REDACTED",
    "REDACTED_REQUEST_FIELDS",
    "REDACTED_RESPONSE_FIELDS",
    "Exchange",
    "Inspector",
    "InspectorApp",
]

logger = logging.getLogger(__name__)

REDACTED: Final = "[redacted]"
"""What a redacted field value shows as."""
REDACTED_REQUEST_FIELDS: Final = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", CREDENTIAL_HEADER}
)
"""Request fields whose values the page and the API never show (the tunnel's own visitor
credential, :data:`tunnel2.access.CREDENTIAL_HEADER`, is among them, though the relay
strips it before forwarding)."""
REDACTED_RESPONSE_FIELDS: Final = frozenset({b"set-cookie"})
"""Response fields whose values the page and the API never show."""

DEFAULT_CAPACITY: Final = 100
DEFAULT_BODY_BYTES: Final = 16 * 1024
REPLAY_TIMEOUT: Final = 30.0
"""Seconds the admin page's replay waits for the backend's whole answer."""

StreamHandler = Callable[[TunnelStream], Awaitable[int | None]]


@final
@attrs.frozen
class Exchange:
    """One request through the tunnel and its answer, as the inspector recorded it.

    Attributes:
        id: increasing from 1, per agent.
        replay_of: the id of the exchange this one replayed, or ``None``.
        started_at: when the request reached the agent (Unix time).
        method: e.g. ``"POST"``.
        target: the path and query the backend got.
        http_version: ``"1.1"``.
        request_headers: ``(name, value)`` as the backend got them, credentials redacted
            (:data:`REDACTED_REQUEST_FIELDS` show as :data:`REDACTED`).
        request_body: the first ``body_bytes`` of the request body.
        request_size: request body bytes the handler read (all of them once complete).
        status: the response status, ``None`` before the head (or if none came).
        reason: the reason phrase.
        response_headers: as sent back through the tunnel, ``Set-Cookie`` redacted.
        response_body: the first ``body_bytes`` of the response body (decoded framing;
            nothing after a 101: an upgraded stream records its handshake only).
        response_size: response body bytes sent back.
        response_after: seconds from the request to the response head.
        duration: seconds from the request to the end of the response; ``None`` while it
            is in flight.
        error: why the exchange failed (the backend refused, the visitor left...), or
            ``None``.
    """

    id: int
    replay_of: int | None
    started_at: float
    method: str
    target: str
    http_version: str
    request_headers: tuple[tuple[str, str], ...]
    request_body: bytes
    request_size: int
    status: int | None
    reason: str
    response_headers: tuple[tuple[str, str], ...]
    response_body: bytes
    response_size: int
    response_after: float | None
    duration: float | None
    error: str | None

    @property
    def complete(self) -> bool:
        """Whether the exchange is over (answered or failed)."""
        return self.duration is not None

    @property
    def upgraded(self) -> bool:
        """Whether the backend switched protocols (101)."""
        return self.status == 101

    @property
    def request_truncated(self) -> bool:
        """Whether the request body is longer than what was kept."""
        return self.request_size > len(self.request_body)

    @property
    def response_truncated(self) -> bool:
        """Whether the response body is longer than what was kept."""
        return self.response_size > len(self.response_body)

    def summary(self) -> dict[str, object]:
        """The fields of the live list, as JSON-ready values."""
        return {
            "id": self.id,
            "replay_of": self.replay_of,
            "started_at": self.started_at,
            "method": self.method,
            "target": self.target,
            "status": self.status,
            "reason": self.reason,
            "request_size": self.request_size,
            "response_size": self.response_size,
            "duration": self.duration,
            "error": self.error,
            "complete": self.complete,
        }

    def to_json(self) -> dict[str, object]:
        """Every field as JSON-ready values; bodies as ``{"base64", "text", "size",
        "truncated"}`` (``text`` is ``None`` unless the kept bytes are UTF-8)."""
        return {
            **self.summary(),
            "http_version": self.http_version,
            "request_headers": [list(field) for field in self.request_headers],
            "response_headers": [list(field) for field in self.response_headers],
            "request_body": _body_json(self.request_body, self.request_size),
            "response_body": _body_json(self.response_body, self.response_size),
            "response_after": self.response_after,
            "upgraded": self.upgraded,
        }


def _body_json(body: bytes, size: int) -> dict[str, object]:
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "base64": base64.b64encode(body).decode("ascii"),
        "text": text,
        "size": size,
        "truncated": size > len(body),
    }


@attrs.define(eq=False)
class _Record:
    """What the data path writes: bytes only (parsed when someone looks)."""

    id: int
    replay_of: int | None
    started_at: float
    start: float  # time.perf_counter(): real seconds, also under a mock trio clock (and cheaper)
    request_head: bytes  # as the handler got it: credentials in it, never shown
    request_body: bytearray = attrs.Factory(bytearray)
    request_size: int = 0
    request_ended: bool = False
    response_head: bytes | None = None
    response_after: float | None = None
    response_body: bytearray = attrs.Factory(bytearray)
    response_size: int = 0
    upgraded: bool = False
    duration: float | None = None
    error: str | None = None
    version: int = 0  # the inspector's change count when this record last changed


def _fields(
    headers: Iterable[tuple[bytes, bytes]], redacted: frozenset[bytes]
) -> tuple[tuple[str, str], ...]:
    return tuple(
        (name.decode("latin-1"), REDACTED if name.lower() in redacted else value.decode("latin-1"))
        for name, value in headers
    )


@final
class _RecordingStream:
    """Stands in for the :class:`TunnelStream` it wraps and copies what passes into a
    :class:`_Record`. Every public member of :class:`TunnelStream` is here (a test keeps it
    so), so a handler cannot tell the two apart."""

    __slots__ = ("_inspector", "_record", "_stream")

    def __init__(self, stream: TunnelStream, record: _Record, inspector: Inspector) -> None:
        self._stream = stream
        self._record = record
        self._inspector = inspector

    def __repr__(self) -> str:
        return f"<recording {self._stream!r}>"

    @property
    def id(self) -> int:
        return self._stream.id

    @property
    def head(self) -> bytes | None:
        return self._stream.head

    @property
    def data_ready(self) -> bool:
        return self._stream.data_ready

    @property
    def local_ended(self) -> bool:
        return self._stream.local_ended

    def cancel_on_reset(self, scope: trio.CancelScope | None) -> None:
        self._stream.cancel_on_reset(scope)

    async def receive_head(self) -> bytes:
        return await self._stream.receive_head()

    async def receive_data(self) -> bytes:
        return self._request_data(await self._stream.receive_data())

    def receive_data_nowait(self) -> bytes:
        return self._request_data(self._stream.receive_data_nowait())

    def send_head(self, head: bytes, body: bytes = b"", *, end: bool = False) -> None:
        self._stream.send_head(head, body, end=end)  # WouldBlock: nothing was sent
        record = self._record
        record.response_head = head
        record.response_after = time.perf_counter() - record.start
        record.upgraded = head.startswith(b"HTTP/1.1 101 ")
        self._inspector._changed(record)
        if body:
            self._response_data(body)

    async def send_data(self, data: bytes, *, end: bool = False) -> None:
        self._response_data(data)
        await self._stream.send_data(data, end=end)

    def send_data_nowait(self, data: bytes, *, end: bool = False) -> None:
        self._stream.send_data_nowait(data, end=end)
        self._response_data(data)

    def send_end(self) -> None:
        self._stream.send_end()

    def reset(self, code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        if not self._stream.local_ended and self._record.error is None:
            self._record.error = reason or f"reset with code {code}"
        self._stream.reset(code, reason)

    def close(self) -> None:
        self._stream.close()

    def _request_data(self, data: bytes) -> bytes:
        record = self._record
        if not data:
            record.request_ended = True
        elif not record.upgraded:
            record.request_size += len(data)
            room = self._inspector.body_bytes - len(record.request_body)
            if room > 0:
                record.request_body += data[:room]
        return data

    def _response_data(self, data: bytes) -> None:
        record = self._record
        if data and not record.upgraded:
            record.response_size += len(data)
            room = self._inspector.body_bytes - len(record.response_body)
            if room > 0:
                record.response_body += data[:room]


@final
class Inspector:
    """Records the exchanges ``handler`` answers, and replays them.

    Args:
        handler: the agent's stream handler (a :class:`~tunnel2.backend.BackendForwarder`
            or :class:`~tunnel2.asgi.AsgiHandler`).
        capacity: exchanges kept; the oldest is dropped for a new one.
        body_bytes: bytes of each body kept (the sizes count all of them).
        max_frame_size: the frame size of replay's in-memory uplinks (the agent's, so any
            head that reached it fits).

    Raises:
        ValueError: ``capacity`` is below 1 or ``body_bytes`` below 0.
    """

    def __init__(
        self,
        handler: StreamHandler,
        *,
        capacity: int = DEFAULT_CAPACITY,
        body_bytes: int = DEFAULT_BODY_BYTES,
        max_frame_size: int = frames.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"inspect capacity {capacity} must be at least 1")
        if body_bytes < 0:
            raise ValueError(f"inspect body bytes {body_bytes} must not be negative")
        self.handler = handler
        self.capacity = capacity
        self.body_bytes = body_bytes
        self._max_frame_size = max_frame_size
        self._ring: collections.deque[_Record] = collections.deque(maxlen=capacity)
        self._next_id = 1
        self._version = 0
        self._change: trio.Event | None = None  # made only when someone waits

    def __repr__(self) -> str:
        return f"<Inspector {len(self._ring)}/{self.capacity} exchanges>"

    # --- the data path -----------------------------------------------------------------

    async def handle(self, stream: TunnelStream) -> int | None:
        """The agent's handler, recording: answer ``stream`` with :attr:`handler`."""
        return await self._serve(stream, self._open(stream, None))

    def _open(self, stream: TunnelStream, replay_of: int | None) -> _Record:
        record = _Record(
            self._next_id, replay_of, time.time(), time.perf_counter(), stream.head or b""
        )
        self._next_id += 1
        self._ring.append(record)
        self._changed(record)
        return record

    async def _serve(self, stream: TunnelStream, record: _Record) -> int | None:
        recording = cast("TunnelStream", _RecordingStream(stream, record, self))
        try:
            return await self.handler(recording)
        except StreamReset as exc:
            record.error = record.error or f"the relay reset the stream ({exc.reason})"
            raise
        except UplinkClosed as exc:
            record.error = record.error or f"the uplink closed ({exc.reason})"
            raise
        except trio.Cancelled:
            record.error = record.error or "cancelled"
            raise
        except Exception as exc:
            record.error = f"the handler raised {type(exc).__name__}: {exc}"
            raise
        finally:
            if record.error is None and record.response_head is None:
                record.error = "no response"
            record.duration = time.perf_counter() - record.start
            self._changed(record)

    def _changed(self, record: _Record) -> None:
        self._version += 1
        record.version = self._version
        if self._change is not None:
            self._change.set()
            self._change = None

    # --- looking -----------------------------------------------------------------------

    def requests(self) -> list[Exchange]:
        """The exchanges kept, oldest first (newest last); in-flight ones included.

        Each is a snapshot: call again to see an exchange finish.
        """
        return [_exchange(record) for record in self._ring]

    def get(self, exchange_id: int) -> Exchange:
        """The exchange with this id.

        Raises:
            KeyError: no such exchange is kept (never was, or dropped from the ring).
        """
        return _exchange(self._record(exchange_id))

    def _record(self, exchange_id: int) -> _Record:
        ring = self._ring
        # Ids are consecutive in the ring, so the position is arithmetic.
        index = exchange_id - ring[0].id if ring else -1
        if not 0 <= index < len(ring):
            raise KeyError(f"no exchange {exchange_id} is kept (the last {self.capacity} are)")
        return ring[index]

    def summaries(self) -> list[dict[str, object]]:
        """:meth:`Exchange.summary` of every exchange kept, oldest first (no body copied)."""
        return [_exchange(record, bodies=False).summary() for record in self._ring]

    def changed_since(self, version: int) -> tuple[int, list[dict[str, object]]]:
        """The current change count and the summaries of the exchanges changed after
        ``version``."""
        changed = [_exchange(r, bodies=False).summary() for r in self._ring if r.version > version]
        return self._version, changed

    @property
    def oldest_id(self) -> int:
        """The id of the oldest exchange kept (the next one's when none is)."""
        return self._ring[0].id if self._ring else self._next_id

    async def wait_changed(self, version: int) -> None:
        """Wait until something changed after ``version`` (:meth:`changed_since`)."""
        if self._version > version:
            await trio.lowlevel.checkpoint()
            return
        if self._change is None:
            self._change = trio.Event()
        await self._change.wait()

    # --- replay ------------------------------------------------------------------------

    def why_not_replayable(self, exchange_id: int) -> str | None:
        """Why the exchange cannot be replayed, or ``None`` if it can.

        Raises:
            KeyError: no such exchange is kept.
        """
        record = self._record(exchange_id)
        if record.upgraded or b"\r\nupgrade:" in record.request_head.lower():
            return "an upgrade (WebSocket) request cannot be replayed"
        _, framing, length = _relay_head_framing(record.request_head)
        if record.request_size < length or (framing is http.CHUNKED and not record.request_ended):
            return "the handler has not read its whole request body"
        if record.request_size > len(record.request_body):
            return (
                f"its request body was {record.request_size} bytes and only the first "
                f"{len(record.request_body)} were kept (raise the inspector's body bytes)"
            )
        return None

    async def replay(self, exchange_id: int) -> Exchange:
        """Send exchange ``exchange_id``'s request to the handler again, as it came
        (credentials included), and return the new exchange (``replay_of`` set).

        It does not go through the relay: an in-memory uplink pair of its own carries it
        to :attr:`handler`. A backend that fails shows as the new exchange's ``error``
        (``status`` ``None``). Checkpoints; a cancellation stops the replay and leaves it
        recorded as cancelled. Replays emit no observer events (they are not visitors').

        Raises:
            KeyError: no such exchange is kept.
            ValueError: it cannot be replayed (:meth:`why_not_replayable` says why).
        """
        await trio.lowlevel.checkpoint()
        why = self.why_not_replayable(exchange_id)
        if why is not None:
            raise ValueError(f"exchange {exchange_id}: {why}")
        original = self._record(exchange_id)
        head, body = original.request_head, bytes(original.request_body)
        settings = frames.Welcome(
            "replay", ("http://replay.invalid/",), max_frame_size=self._max_frame_size,
            ping_interval=0,
        )  # fmt: skip
        relay_end, agent_end = memory_transport_pair()
        async with (
            open_uplink(
                relay_end, frames.FrameDecoder(), settings, role="relay", name="replay-relay"
            ) as relay,
            open_uplink(
                agent_end, frames.FrameDecoder(), settings, role="agent", name="replay"
            ) as agent,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_visit, relay.open_stream(head), body)
            stream = await agent.accept_stream()
            record = self._open(stream, exchange_id)
            with trio.CancelScope() as scope:  # as the agent's worker serves a stream
                stream.cancel_on_reset(scope)
                try:
                    await self._serve(stream, record)
                except (StreamReset, UplinkClosed):
                    pass
                except Exception:
                    logger.exception("handler failed on replay of exchange %d", exchange_id)
                    stream.reset(ErrorCode.INTERNAL_ERROR, "the agent's handler failed")
                finally:
                    stream.cancel_on_reset(None)
                    stream.close()
        return _exchange(record)


async def _visit(stream: TunnelStream, body: bytes) -> None:
    """The relay's side of a replay: send the body, read the whole answer (so the handler
    gets credit), and drop it (the recording side keeps what the inspector needs)."""

    async def send() -> None:
        with contextlib.suppress(StreamReset, UplinkClosed):
            await stream.send_data(body, end=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        try:
            await stream.receive_head()
            while await stream.receive_data():
                pass
        except (StreamReset, UplinkClosed):
            pass
        nursery.cancel_scope.cancel()
    stream.close()


def _exchange(record: _Record, *, bodies: bool = True) -> Exchange:
    """The public snapshot of ``record`` (with empty bodies unless ``bodies``: summaries)."""
    try:
        request = http.parse_request_head(record.request_head)
        method, target, version = request.method, request.target, request.http_version
        request_headers = _fields(request.headers, REDACTED_REQUEST_FIELDS)
    except ProtocolError:  # pragma: no cover - the relay writes every head canonically
        method, target, version, request_headers = b"?", b"?", b"1.1", ()
    status: int | None = None
    reason = ""
    response_headers: tuple[tuple[str, str], ...] = ()
    if record.response_head is not None:
        response = http.parse_response_head(record.response_head)
        status, reason = response.status, response.reason.decode("latin-1")
        response_headers = _fields(response.headers, REDACTED_RESPONSE_FIELDS)
    return Exchange(
        id=record.id,
        replay_of=record.replay_of,
        started_at=record.started_at,
        method=method.decode("ascii", "replace"),
        target=target.decode("ascii", "replace"),
        http_version=version.decode("ascii"),
        request_headers=request_headers,
        request_body=bytes(record.request_body) if bodies else b"",
        request_size=record.request_size,
        status=status,
        reason=reason,
        response_headers=response_headers,
        response_body=bytes(record.response_body) if bodies else b"",
        response_size=record.response_size,
        response_after=record.response_after,
        duration=record.duration,
        error=record.error,
    )


# --- the web side ------------------------------------------------------------------------

AsgiScope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
AsgiReceive = Callable[[], Awaitable[AsgiMessage]]
AsgiSend = Callable[[AsgiMessage], Awaitable[None]]

_REQUEST_PATH_RE: Final = re.compile(r"/api/requests/([0-9]{1,18})(/replay)?")
_KEEPALIVE: Final = 15.0  # seconds between SSE comments on a quiet list
_PUSH_INTERVAL: Final = 0.1  # least seconds between two SSE pushes (coalesces bursts)
_TEXT: Final = b"text/plain; charset=utf-8"
_JSON: Final = b"application/json"
_CSP: Final = b"default-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'"


def _header(scope: AsgiScope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _local_host(host: bytes | None) -> bool:
    """Whether a ``Host`` names this machine by an IP address or ``localhost``: a name
    that could resolve anywhere (DNS rebinding) is refused."""
    if host is None:
        return False
    name = host.decode("latin-1").lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    else:
        name = name.rpartition(":")[0] if ":" in name else name
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _cross_site(scope: AsgiScope) -> str | None:
    """Why a state-changing request looks cross-site, or ``None`` if it does not."""
    site = _header(scope, b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return f"Sec-Fetch-Site is {site.decode('latin-1')}"
    origin = _header(scope, b"origin")
    if origin is not None:
        host = _header(scope, b"host") or b""
        if origin not in (b"http://" + host, b"https://" + host):
            return f"Origin {origin.decode('latin-1')} is not this page's"
    kind = (_header(scope, b"content-type") or b"").partition(b";")[0].strip().lower()
    if kind != _JSON:
        return "the request must have Content-Type: application/json"
    return None


@final
class InspectorApp:
    """The inspector's routes as a plain ASGI 3 app (mounted by :class:`tunnel2.admin.
    AdminApp`; :meth:`handles` says which paths are its own).

    Args:
        inspector: what it shows and replays.
        replay_timeout: seconds a replay may take before the page hears it timed out.
    """

    def __init__(self, inspector: Inspector, *, replay_timeout: float = REPLAY_TIMEOUT) -> None:
        self.inspector = inspector
        self.replay_timeout = replay_timeout

    def __repr__(self) -> str:
        return f"<InspectorApp {self.inspector!r}>"

    @staticmethod
    def handles(path: str) -> bool:
        """Whether ``path`` is one of the inspector's."""
        return path in ("/", "/inspector.js") or path.startswith("/api/")

    async def __call__(self, scope: AsgiScope, receive: AsgiReceive, send: AsgiSend) -> None:
        path, method = scope["path"], scope["method"]
        if not _local_host(_header(scope, b"host")):
            await _answer(
                send, 403, _TEXT, b"403 Forbidden: the inspector answers only requests to an "
                b"IP address or localhost (its Host header names something else)\n",
            )  # fmt: skip
            return
        match = _REQUEST_PATH_RE.fullmatch(path)
        if match is not None and match.group(2):
            if method != "POST":
                await _answer(send, 405, _TEXT, b"405 Method Not Allowed: replay is a POST\n")
                return
            await self._replay(scope, receive, send, int(match.group(1)))
            return
        if method not in ("GET", "HEAD"):
            await _answer(send, 405, _TEXT, b"405 Method Not Allowed: only replay is a POST\n")
        elif path in ("/", "/inspector.js"):
            name = path.strip("/") or "inspector.html"
            kind = b"text/html; charset=utf-8" if name.endswith("html") else b"text/javascript"
            page = importlib.resources.files("tunnel2").joinpath(name).read_bytes()
            await _answer(send, 200, kind, page)
        elif path == "/api/requests":
            listing = self.inspector.summaries()
            await _json(send, 200, {"capacity": self.inspector.capacity, "requests": listing})
        elif path == "/api/events":
            await self._events(receive, send)
        elif match is not None:
            try:
                exchange = self.inspector.get(int(match.group(1)))
            except KeyError as exc:
                await _json(send, 404, {"error": exc.args[0]})
                return
            why = self.inspector.why_not_replayable(exchange.id)
            await _json(send, 200, {**exchange.to_json(), "not_replayable": why})
        else:
            await _answer(send, 404, _TEXT, b"404 Not Found: try /, /api/requests\n")

    async def _replay(
        self, scope: AsgiScope, receive: AsgiReceive, send: AsgiSend, exchange_id: int
    ) -> None:
        why = _cross_site(scope)
        if why is not None:
            # A web page the developer has open tried it (or a tool without the JSON type).
            logger.warning("inspector refused a replay of exchange %d: %s", exchange_id, why)
            await _json(send, 403, {"error": f"replay refused: {why} (cross-site request?)"})
            return
        inspector = self.inspector
        try:
            not_replayable = inspector.why_not_replayable(exchange_id)
        except KeyError as exc:
            await _json(send, 404, {"error": exc.args[0]})
            return
        if not_replayable is not None:
            await _json(send, 409, {"error": f"exchange {exchange_id}: {not_replayable}"})
            return
        exchange = None
        with trio.move_on_after(self.replay_timeout):
            exchange = await inspector.replay(exchange_id)
        if exchange is None:
            message = f"the backend did not answer the replay within {self.replay_timeout}s"
            await _json(send, 504, {"error": message})
            return
        if exchange.error is not None and exchange.status is None:
            await _json(send, 502, {"error": exchange.error, "exchange": exchange.to_json()})
        else:
            await _json(send, 200, {"exchange": exchange.to_json()})

    async def _events(self, receive: AsgiReceive, send: AsgiSend) -> None:
        """Server-Sent Events: every exchange at first, then each one that changed, with
        the oldest id kept (the page drops the ones before it)."""
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        inspector = self.inspector

        async def push() -> None:
            version = -1
            while True:
                version, changed = inspector.changed_since(version)
                data = {"oldest": inspector.oldest_id, "requests": changed}
                message = b"data: %s\n\n" % json.dumps(data).encode()
                await send({"type": "http.response.body", "body": message, "more_body": True})
                await trio.sleep(_PUSH_INTERVAL)
                while True:
                    with trio.move_on_after(_KEEPALIVE):
                        await inspector.wait_changed(version)
                        break
                    idle = {"type": "http.response.body", "body": b": idle\n\n", "more_body": True}
                    await send(idle)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(push)
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()


async def _answer(send: AsgiSend, status: int, kind: bytes, body: bytes) -> None:
    headers = [
        (b"content-type", kind),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        # Visitors' bytes are shown on the page: nothing but its own script may run.
        (b"content-security-policy", _CSP),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: AsgiSend, status: int, document: dict[str, object]) -> None:
    await _answer(send, status, _JSON, json.dumps(document).encode() + b"\n")
