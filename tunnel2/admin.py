"""The control plane: Prometheus metrics as an observer, and a small admin ASGI app.

Layer: above server, entry and agent (it reads their state), below api. May import
prometheus-client and hypercorn; nothing on the data path imports this module (DESIGN.md:
hypercorn belongs on the control plane, never in the request path).

The admin app answers ``/metrics`` (Prometheus text format), ``/healthz`` (200 while the
process runs), ``/readyz`` (200 when it can serve: a relay listening and not draining, an
agent connected; else 503) and ``/status`` (JSON); an agent that inspects also serves the
inspector's page at ``/`` and its API under ``/api/`` (:mod:`tunnel2.inspect`). It names
sessions and identities (and shows traffic), so it binds loopback by default and must never
be reachable from the public side.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final, NoReturn, final

import prometheus_client.metrics
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tunnel2._util import unwrap_lone_error
from tunnel2.inspect import InspectorApp
from tunnel2.observe import (
    AgentJoined,
    AgentLeft,
    DrainStarted,
    Event,
    Reconnected,
    Refused,
    RequestFinished,
)

if TYPE_CHECKING:
    from tunnel2.agent import Agent
    from tunnel2.server import TunnelServer

__all__ = [
    "AdminApp",
    "AdminBindError",
    "PrometheusObserver",
    "agent_admin",
    "relay_admin",
    "serve_admin",
]

_OTHER: Final = "other"
_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

AsgiScope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
AsgiReceive = Callable[[], Awaitable[AsgiMessage]]
AsgiSend = Callable[[AsgiMessage], Awaitable[None]]


class AdminBindError(OSError):
    """The admin endpoint's address could not be bound (it names the address)."""


@final
class PrometheusObserver:
    """Counts events into its own :class:`CollectorRegistry` (never the global one).

    Args:
        registry: where the metrics live (default: a new one, :attr:`registry`).
        session_labels: how many sessions get a ``session`` label of their own on
            ``tunnel2_requests_total``; the rest count under ``session="other"``. 0 (the
            default): no per-session series at all. Session ids are unbounded, and every
            label value is a series Prometheus keeps, so keep this small.
    """

    def __init__(
        self, *, registry: CollectorRegistry | None = None, session_labels: int = 0
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._session_labels = session_labels
        self._labelled: set[str] = set()
        r = self.registry
        # Per request: plain counts, which _RequestMetrics turns into samples when scraped.
        self._requests = _RequestMetrics(session_labels > 0)
        r.register(self._requests)
        self.joins = Counter("tunnel2_agent_joins", "Agent connections welcomed", registry=r)
        self.leaves = Counter("tunnel2_agent_leaves", "Agent connections ended", registry=r)
        self.refusals = Counter(
            "tunnel2_refusals", "Agent handshakes refused, by reason", ["reason"], registry=r
        )
        self.drains = Counter("tunnel2_drains", "Drains started", registry=r)
        self.reconnects = Counter("tunnel2_reconnects", "Agent re-dials that got back", registry=r)

    def __repr__(self) -> str:
        return "<PrometheusObserver>"

    def _session(self, session_id: str) -> str:
        if session_id in self._labelled:
            return session_id
        if session_id and len(self._labelled) < self._session_labels:
            self._labelled.add(session_id)
            return session_id
        return _OTHER

    def on_event(self, event: Event) -> None:
        kind = type(event)
        if kind is RequestFinished:
            assert isinstance(event, RequestFinished)
            session = self._session(event.session_id) if self._session_labels else ""
            self._requests.observe(event, session)
        elif kind is AgentJoined:
            self.joins.inc()
        elif kind is AgentLeft:
            self.leaves.inc()
        elif kind is Refused:
            assert isinstance(event, Refused)
            self.refusals.labels(event.reason_code).inc()
        elif kind is DrainStarted:
            self.drains.inc()
        elif kind is Reconnected:
            self.reconnects.inc()


_SIDES: Final = ("relay", "agent")


@final
class _RequestMetrics(Collector):  # (an ABC up to prometheus-client 0.20, a Protocol later)
    """The per-request metrics as plain counts, made samples only when scraped (a collector:
    ``collect()``). The same series, names and values as prometheus-client's ``Counter`` and
    ``Histogram`` (``_created`` included), at a tenth of the cost per request: those take a
    lock and make a Python call per counter, and the histogram walks its buckets in Python.
    Written by the trio thread only; a scrape from another thread reads copies."""

    def __init__(self, by_session: bool) -> None:
        self._by_session = by_session
        now = time.time()
        # (side, status class, session) -> [count, created]
        self._requests: dict[tuple[str, int, str], list[float]] = {}
        # side -> per-bucket counts (the last is +Inf), sum, created
        self._buckets = {side: [0] * (len(_LATENCY_BUCKETS) + 1) for side in _SIDES}
        self._sum = dict.fromkeys(_SIDES, 0.0)
        self._request_bytes = dict.fromkeys(_SIDES, 0)
        self._response_bytes = 0
        self._created = now

    def observe(self, event: RequestFinished, session: str) -> None:
        side, status = event.side, event.status
        key = (side, status // 100, session)
        counted = self._requests.get(key)
        if counted is None:
            counted = self._requests[key] = [0, time.time()]
        counted[0] += 1
        duration = event.duration
        if duration == duration:  # a NaN goes into the sum and no bucket, as with Histogram
            self._buckets[side][bisect.bisect_left(_LATENCY_BUCKETS, duration)] += 1
        self._sum[side] += duration
        if event.request_body:
            self._request_bytes[side] += event.request_body
        if event.response_bytes:
            self._response_bytes += event.response_bytes

    def describe(self) -> list[Metric]:
        return self._families(with_samples=False)

    def collect(self) -> list[Metric]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> list[Metric]:
        created = getattr(prometheus_client.metrics, "_use_created", True)  # as the Counters
        labels = ["side", "code", "session"] if self._by_session else ["side", "code"]
        requests = CounterMetricFamily("tunnel2_requests", _REQUESTS_HELP, labels=labels)
        latency = HistogramMetricFamily(
            "tunnel2_request_duration_seconds", _LATENCY_HELP, labels=["side"]
        )
        request_bytes = CounterMetricFamily(
            "tunnel2_request_body_bytes", _REQUEST_BYTES_HELP, labels=["side"]
        )
        response_bytes = CounterMetricFamily("tunnel2_response_bytes", _RESPONSE_BYTES_HELP)
        if with_samples:
            for (side, code, session), (count, since) in list(self._requests.items()):
                values = [side, f"{code}xx" if code else "0"] + [session] * self._by_session
                requests.add_metric(values, count, created=since if created else None)
            for side in _SIDES:
                counts, running, buckets = list(self._buckets[side]), 0, []
                for bound, count in zip(_BUCKET_LABELS, counts, strict=True):
                    running += count
                    buckets.append((bound, running))
                latency.add_metric([side], buckets, self._sum[side])
                if created:
                    latency.add_sample(
                        "tunnel2_request_duration_seconds_created", {"side": side}, self._created
                    )
            for side in _SIDES:
                request_bytes.add_metric(
                    [side], self._request_bytes[side], created=self._created if created else None
                )
            response_bytes.add_metric(
                [], self._response_bytes, created=self._created if created else None
            )
        return [requests, latency, request_bytes, response_bytes]


_REQUESTS_HELP: Final = "Requests answered, by status class (2xx..5xx, 0: none)"
_LATENCY_HELP: Final = "From request head to the end of the response"
_REQUEST_BYTES_HELP: Final = "Declared request body bytes (chunked not counted)"
_RESPONSE_BYTES_HELP: Final = "Bytes written to visitors, heads included"
_BUCKET_LABELS: Final = (*(repr(float(b)) for b in _LATENCY_BUCKETS), "+Inf")  # "1.0", as le=


@final
class AdminApp:
    """A plain ASGI 3 app (no framework) with the four admin routes.

    Args:
        registry: what ``/metrics`` exposes.
        ready: whether ``/readyz`` answers 200.
        status: the ``/status`` document.
        inspector: the inspector's page and API (:mod:`tunnel2.inspect`), served at ``/``
            and under ``/api/``.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        status: Callable[[], dict[str, object]],
        *,
        inspector: InspectorApp | None = None,  # --- inspect ---
    ) -> None:
        self.registry = registry
        self._ready = ready
        self._status = status
        self._inspector = inspector

    async def __call__(self, scope: AsgiScope, receive: AsgiReceive, send: AsgiSend) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if self._inspector is not None and self._inspector.handles(path):  # --- inspect ---
            await self._inspector(scope, receive, send)
            return
        text = "text/plain; charset=utf-8"
        if scope["method"] not in ("GET", "HEAD"):
            status, kind, body = 405, text, b"405 Method Not Allowed: the admin API is read-only\n"
        elif path == "/metrics":
            status, kind, body = 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        elif path == "/healthz":
            status, kind, body = 200, text, b"ok\n"
        elif path == "/readyz":
            ready = self._ready()
            status, kind, body = (200, text, b"ready\n") if ready else (503, text, b"not ready\n")
        elif path == "/status":
            status, kind = 200, "application/json"
            body = json.dumps(self._status(), indent=2).encode() + b"\n"
        else:
            status, kind = 404, text
            body = b"404 Not Found: try /metrics, /healthz, /readyz or /status\n"
        headers = [(b"content-type", kind.encode()), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@final
class _AgentBook:
    """Which agent connections hold which session, as the events tell."""

    def __init__(self) -> None:
        self.agents: dict[str, tuple[str, str]] = {}  # agent name -> (session, identity)

    def on_event(self, event: Event) -> None:
        if type(event) is AgentJoined:
            self.agents[event.agent] = (event.session_id, event.identity)
        elif type(event) is AgentLeft:
            self.agents.pop(event.agent, None)


def relay_admin(server: TunnelServer, metrics: PrometheusObserver) -> AdminApp:
    """The admin app of a relay: adds live gauges (sessions, agents, open streams) to
    ``metrics.registry`` and an observer of its agents to ``server.observers``. Call it
    before the relay accepts agents (:func:`tunnel2.serve_tunnel_server` does)."""
    registry = metrics.registry
    Gauge("tunnel2_sessions", "Sessions routed here", registry=registry).set_function(
        lambda: len(server.routes)
    )
    Gauge("tunnel2_agents_connected", "Agent connections", registry=registry).set_function(
        lambda: len(server.uplinks)
    )
    Gauge("tunnel2_open_streams", "Requests in flight on uplinks", registry=registry).set_function(
        lambda: sum(u.open_streams for u in server.uplinks)
    )

    book = _AgentBook()
    server.observers.append(book)

    def status() -> dict[str, object]:
        streams = {str(u): u.open_streams for u in server.uplinks}
        sessions: dict[str, list[dict[str, object]]] = {}
        for name, (session_id, identity) in book.agents.items():
            sessions.setdefault(session_id, []).append(
                {"agent": name, "identity": identity, "open_streams": streams.get(name, 0)}
            )
        return {
            "role": "relay",
            "base_url": server.base_url,
            "draining": server.draining,
            "requests_in_flight": server.requests_in_flight,
            "sessions": [{"session_id": s, "agents": a} for s, a in sorted(sessions.items())],
        }

    return AdminApp(registry, lambda: not server.draining, status)


def agent_admin(agent: Agent, metrics: PrometheusObserver) -> AdminApp:
    """The admin app of an agent."""

    def connected() -> bool:
        uplink = agent.uplink
        return uplink is not None and not uplink.closed

    Gauge("tunnel2_connected", "1 while the agent is connected", registry=metrics.registry
          ).set_function(lambda: float(connected()))  # fmt: skip

    def status() -> dict[str, object]:
        uplink = agent.uplink
        return {
            "role": "agent",
            "session_id": agent.session_id,
            "public_url": agent.public_url if agent.connections else None,
            "connected": connected(),
            "connections": agent.connections,
            "reconnects": max(0, agent.connections - 1),
            "open_streams": uplink.open_streams if uplink is not None else 0,
        }

    # --- inspect ---
    inspector = InspectorApp(agent.inspector) if agent.inspector is not None else None
    return AdminApp(metrics.registry, connected, status, inspector=inspector)


async def serve_admin(
    app: AdminApp,
    host: str = "127.0.0.1",
    port: int = 9100,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``app`` with hypercorn on ``host:port`` until cancelled.

    ``task_status.started`` receives the bound base URL (``http://127.0.0.1:9100``), once
    hypercorn listens, so a bind error surfaces from ``nursery.start``.

    Raises:
        AdminBindError: ``host:port`` could not be bound.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None

    async def started(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        try:
            with unwrap_lone_error():  # hypercorn's own nursery wraps its bind error
                binds: list[str] = await nursery.start(started)
        except OSError as exc:
            error = AdminBindError(f"cannot serve the admin endpoint on {host}:{port}: {exc}")
            error.errno = exc.errno
            raise error from exc
        task_status.started(binds[0])
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
