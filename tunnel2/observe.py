"""Events out, not hooks in (STYLE.md §10): what the relay and the agent tell observers.

Layer: beside errors, below server, entry and agent; imports only the stdlib and attrs.

The relay and the agent hold a list of :class:`Observer` objects and build an event only when
that list is not empty (``if self._observers:``), so a relay nobody watches allocates nothing
for observation on its hot path. Observers are called synchronously, in the emitting task:
they must not block. One that raises is logged once, with its traceback, and removed, so a
broken observer costs neither a request nor a log line per request.

What events expose is chosen so that logs and metrics can be handed around: a request's path
without its query string (queries carry tokens and signed URLs), never header values
(``Authorization``, ``Cookie``), never a token; an agent's identity is the *name* of its token.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Final, Literal, Protocol, TextIO, final

import attrs

__all__ = [
    "AccessLogObserver",
    "AgentJoined",
    "AgentLeft",
    "DrainStarted",
    "Event",
    "JsonFormatter",
    "Observer",
    "Reconnected",
    "Refused",
    "RequestFinished",
    "RequestStarted",
    "emit",
    "event_fields",
]

logger = logging.getLogger(__name__)
# One line per request; not "tunnel2.access", which is the visitor access-policy module.
request_logger: Final = logging.getLogger("tunnel2.requests")

Side = Literal["relay", "agent"]


@final
@attrs.frozen
class RequestStarted:
    """A request arrived: at the relay (from a visitor) or at the agent (from the relay).

    Attributes:
        side: who saw it.
        session_id: its session ("" at the relay when the URL names none).
        method: the request method.
        path: the backend's path, without the query string (it may carry secrets).
        request_body: the declared body length; ``None`` for a chunked body.
    """

    side: Side
    session_id: str
    method: str
    path: str
    request_body: int | None


@final
@attrs.frozen
class RequestFinished:
    """A request is done (its response sent, or given up).

    Attributes:
        side, session_id, method, path, request_body: as in :class:`RequestStarted`.
        status: the status answered; 0 if no answer went out (the visitor left, a write
            timed out, the stream was reset); 504 for the relay's request timeout.
        response_bytes: bytes written to the visitor, head included (relay side);
            ``None`` where not counted (agent side).
        duration: seconds from the request head to the end of the response.
    """

    side: Side
    session_id: str
    method: str
    path: str
    request_body: int | None
    status: int
    response_bytes: int | None
    duration: float


@final
@attrs.frozen
class AgentJoined:
    """An agent connection was welcomed (relay side).

    Attributes:
        session_id: the session it holds.
        agent: the connection's short name (``agent-7``).
        identity: the name of its token ("" on an open relay).
        agents: agent connections of the session now.
    """

    session_id: str
    agent: str
    identity: str
    agents: int


@final
@attrs.frozen
class AgentLeft:
    """An agent connection ended (relay side).

    Attributes:
        session_id, agent, identity: as in :class:`AgentJoined`.
        reason: why its uplink closed.
    """

    session_id: str
    agent: str
    identity: str
    reason: str


@final
@attrs.frozen
class DrainStarted:
    """The relay began to drain (GOAWAY to every agent, new agents refused).

    Attributes:
        agents: agent connections at that moment.
        in_flight: requests in flight at that moment.
    """

    agents: int
    in_flight: int


@final
@attrs.frozen
class Refused:
    """The relay refused an agent's handshake.

    Attributes:
        agent: the connection's short name.
        code: the REFUSE code (:class:`tunnel2.errors.ErrorCode`).
        reason_code: its name, e.g. ``UNAUTHORIZED`` (a bounded set: fit for a label).
        reason: the message sent to the agent.
    """

    agent: str
    code: int
    reason_code: str
    reason: str


@final
@attrs.frozen
class Reconnected:
    """The agent re-dialled and got its session back (agent side).

    Attributes:
        session_id: the session.
        public_url: its preferred public URL.
        connections: successful handshakes so far, this one included.
    """

    session_id: str
    public_url: str
    connections: int


Event = (
    RequestStarted
    | RequestFinished
    | AgentJoined
    | AgentLeft
    | DrainStarted
    | Refused
    | Reconnected
)


class Observer(Protocol):
    """Receives the events of a relay or an agent."""

    def on_event(self, event: Event) -> None:
        """Take one event. Called in the emitting task: must not block or await."""


def emit(observers: list[Observer], event: Event) -> None:
    """Hand ``event`` to every observer; one that raises is logged once and removed."""
    for observer in tuple(observers):
        try:
            observer.on_event(event)
        except Exception:
            logger.exception("observer %r raised on %s; it is removed", observer, type(event))
            observers.remove(observer)


def event_fields(event: Event) -> dict[str, object]:
    """The event as a flat dict: ``{"event": "RequestFinished", "status": 200, ...}``."""
    kind = type(event)
    names = _FIELD_NAMES.get(kind)
    if names is None:  # once per class: attrs.asdict() costs ~20,000 instructions a call
        names = _FIELD_NAMES[kind] = tuple(field.name for field in attrs.fields(kind))
    fields: dict[str, object] = {"event": kind.__name__}
    for name in names:
        fields[name] = getattr(event, name)  # every field is a scalar: nothing to copy
    return fields


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


@final
class AccessLogObserver:
    """One line per finished request: ``side session METHOD /path -> status (N ms)``.

    By default each line is an INFO record of the ``tunnel2.requests`` logger, which carries
    the event's fields in ``record.event`` (:class:`JsonFormatter` writes them out). Given a
    text ``stream`` (the CLI passes ``sys.stderr``), the observer writes each line there
    itself, as the CLI's logging would have (``2026-12-01 13:09:18,977 INFO
    tunnel2.requests: ...``; with ``json=True`` as :class:`JsonFormatter` does): no
    ``LogRecord``, no handler, no caller lookup, about an eighth of the cost
    (benchmarks/RESULTS.md); the logger's level and handlers then play no part.
    """

    def __init__(self, stream: TextIO | None = None, *, json: bool = False) -> None:
        self._stream = stream
        self._json = json
        self._stamp = (math.nan, "")  # (second, its strftime): one strftime a second

    def __repr__(self) -> str:
        return (
            "<AccessLogObserver>"
            if self._stream is None
            else f"<AccessLogObserver {self._stream!r}>"
        )

    def on_event(self, event: Event) -> None:
        if type(event) is not RequestFinished:
            return
        stream = self._stream
        if stream is None:
            if request_logger.isEnabledFor(logging.INFO):
                request_logger.info(
                    "%s %s %s %s -> %d (%.1f ms)",
                    event.side,
                    event.session_id[:8] or "-",
                    event.method,
                    event.path,
                    event.status,
                    event.duration * 1000,
                    extra={"event": event_fields(event)},
                )
            return
        message = (
            f"{event.side} {event.session_id[:8] or '-'} {event.method} {event.path}"
            f" -> {int(event.status)} ({event.duration * 1000:.1f} ms)"
        )
        created, msecs = _now_and_msecs()
        second = math.floor(created)  # the second localtime()/gmtime() format
        cached_second, stamp = self._stamp
        if second != cached_second:  # JSON in UTC, text in local time, as the formatters
            stamp = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
                if self._json
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
            )
            self._stamp = (second, stamp)  # one store: an observer may serve two threads
        if self._json:
            stamp = f"{stamp}.{msecs:03d}Z"
            line = _json_line(stamp, "INFO", request_logger.name, message, event_fields(event))
        else:
            line = f"{stamp},{msecs:03d} INFO tunnel2.requests: {message}"
        stream.write(line + "\n")


def _now_and_msecs() -> tuple[float, int]:
    """The time and its milliseconds, as ``logging.LogRecord`` takes them."""
    if sys.version_info >= (3, 13):  # from time_ns(), rounding to the second kept
        ns = time.time_ns()
        created = ns / 1e9
        msecs = (ns % 1_000_000_000) // 1_000_000
        if msecs == 999 and int(created) != ns // 1_000_000_000:
            msecs = 0
        return created, msecs
    created = time.time()
    return created, int((created - int(created)) * 1000)


def _json_line(stamp: str, level: str, name: str, message: str, fields: dict[str, object]) -> str:
    """The JSON object of one log line (:class:`JsonFormatter` and the access log's stream)."""
    line: dict[str, object] = {
        "time": stamp,
        "level": level,
        "logger": name,
        "message": message,
    }
    if fields:
        line.update(fields)
    return _JSON.encode(line)


_JSON: Final = json.JSONEncoder(default=str)  # json.dumps(default=) builds one per call


@final
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an event's fields.

    Only what the record's message and event hold is written: the library logs no tokens,
    bodies or header values above DEBUG (STYLE.md §7), and events carry none.
    """

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        fields: dict[str, object] = dict(event) if isinstance(event, dict) else {}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return _json_line(
            f"{stamp}.{int(record.msecs):03d}Z",
            record.levelname,
            record.name,
            record.getMessage(),
            fields,
        )
