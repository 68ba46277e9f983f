"""The control plane (tunnel2.admin): Prometheus metrics, /healthz, /readyz, /status.

In memory (the admin ASGI app called directly) and over real sockets on 127.0.0.1 port 0
(hypercorn serving it beside a relay and an agent). Bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import h11
import prometheus_client.metrics
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from test_observe import app, observed_tunnel

import tunnel2
from tunnel2 import admin
from tunnel2.admin import AdminApp, PrometheusObserver, agent_admin, relay_admin
from tunnel2.observe import RequestFinished, Side
from tunnel2.server import ServerConfig


async def call(asgi: AdminApp, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One request to an ASGI app, in-process."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await asgi({"type": "http", "method": method, "path": path}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_metrics_after_known_traffic_in_memory() -> None:
    relay_metrics, agent_metrics = PrometheusObserver(), PrometheusObserver()
    with trio.fail_after(10):
        async with observed_tunnel([relay_metrics], [agent_metrics]) as tunnel:
            relay_app = relay_admin(tunnel.server, relay_metrics)
            for _ in range(3):
                assert (await tunnel.request("GET", "/")).status == 200
            assert (await tunnel.request("POST", "/missing", body=b"abc")).status == 404
            status, text = await call(relay_app, "/metrics")
            agent_app = agent_admin(tunnel.agent, agent_metrics)
            agent_status, agent_text = await call(agent_app, "/metrics")
    assert (status, agent_status) == (200, 200)
    got = samples(text.decode())
    assert got["tunnel2_requests_total", (("code", "2xx"), ("side", "relay"))] == 3
    assert got["tunnel2_requests_total", (("code", "4xx"), ("side", "relay"))] == 1
    assert got["tunnel2_request_duration_seconds_count", (("side", "relay"),)] == 4
    assert got["tunnel2_request_body_bytes_total", (("side", "relay"),)] == 3
    assert got["tunnel2_response_bytes_total", ()] > 0
    assert got["tunnel2_sessions", ()] == 1
    assert got["tunnel2_agents_connected", ()] == 1
    assert got["tunnel2_open_streams", ()] == 0
    on_agent = samples(agent_text.decode())
    assert on_agent["tunnel2_requests_total", (("code", "2xx"), ("side", "agent"))] == 3
    assert on_agent["tunnel2_requests_total", (("code", "4xx"), ("side", "agent"))] == 1
    assert on_agent["tunnel2_connected", ()] == 1


async def test_session_labels_are_capped() -> None:
    metrics = PrometheusObserver(session_labels=1)
    with trio.fail_after(10):
        async with observed_tunnel([metrics], []) as tunnel:
            await tunnel.request("GET", "/")
            await tunnel.request("GET", "/session/other-one/", raw_path=True)  # 404, no agent
    got = samples((await call(AdminApp(metrics.registry, bool, dict), "/metrics"))[1].decode())
    session = tunnel.agent.session_id
    assert session is not None
    assert got["tunnel2_requests_total", (("code", "2xx"), ("session", session), ("side", "relay"))]
    assert got["tunnel2_requests_total", (("code", "4xx"), ("session", "other"), ("side", "relay"))]


async def test_health_ready_status_and_drain_in_memory() -> None:
    metrics = PrometheusObserver()
    with trio.fail_after(10):
        async with observed_tunnel([metrics], []) as tunnel:
            admin = relay_admin(tunnel.server, metrics)
            assert await call(admin, "/healthz") == (200, b"ok\n")
            assert (await call(admin, "/readyz"))[0] == 200
            status, body = await call(admin, "/status")
            assert status == 200
            doc = json.loads(body)
            assert doc["draining"] is False
            # relay_admin was made after the agent joined: it knows it from later events only.
            assert doc["sessions"] == []
            assert (await call(admin, "/nope"))[0] == 404
            assert (await call(admin, "/metrics", method="POST"))[0] == 405
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tunnel.server.drain)
                await trio.testing.wait_all_tasks_blocked()
                assert await call(admin, "/readyz") == (503, b"not ready\n")
                doc = json.loads((await call(admin, "/status"))[1])
                assert doc["draining"] is True
            got = samples((await call(admin, "/metrics"))[1].decode())
            assert got["tunnel2_drains_total", ()] == 1


# --- real sockets: hypercorn serves the admin app beside the relay and the agent -----------


async def get(
    url: str, path: str, method: str = "GET", body: bytes = b"", content_type: str | None = None
) -> tuple[int, bytes]:
    """GET (or ``method``) ``url + path`` with h11 on a real socket."""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    headers = [("Host", host), ("Content-Length", str(len(body)))]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    stream = await trio.open_tcp_stream(host, int(port))
    conn = h11.Connection(h11.CLIENT)
    async with stream:
        request = h11.Request(method=method, target=path, headers=headers)
        out = conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        status, received = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, received


async def test_admin_over_real_sockets() -> None:
    admin = ("127.0.0.1", 0)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: tunnel2.serve_tunnel_server(
                    ServerConfig(port=0), admin=admin, task_status=task_status
                )
            )
            assert server.admin_url is not None
            assert server.admin_url.startswith("http://127.0.0.1:")
            assert (await get(server.admin_url, "/readyz"))[0] == 200
            async with tunnel2.open_tunnel(
                server.base_url, app, admin=admin, asgi_loop="trio"
            ) as agent:
                assert agent.admin_url is not None
                for path in ("/", "/", "/", "/missing"):
                    status, _ = await get(server.base_url, f"/session/{agent.session_id}{path}")
                    assert status == (404 if path == "/missing" else 200)
                status, text = await get(server.admin_url, "/metrics")
                assert status == 200
                got = samples(text.decode())
                assert got["tunnel2_requests_total", (("code", "2xx"), ("side", "relay"))] == 3
                assert got["tunnel2_requests_total", (("code", "4xx"), ("side", "relay"))] == 1
                assert got["tunnel2_agent_joins_total", ()] == 1
                doc = json.loads((await get(server.admin_url, "/status"))[1])
                assert [s["session_id"] for s in doc["sessions"]] == [agent.session_id]
                assert doc["sessions"][0]["agents"][0]["identity"] == ""
                assert await get(agent.admin_url, "/healthz") == (200, b"ok\n")
                assert (await get(agent.admin_url, "/readyz"))[0] == 200
                agent_doc = json.loads((await get(agent.admin_url, "/status"))[1])
                assert agent_doc["session_id"] == agent.session_id
                assert agent_doc["connected"] is True
                assert agent_doc["public_url"] == agent.public_url
                on_agent = samples((await get(agent.admin_url, "/metrics"))[1].decode())
                assert on_agent["tunnel2_requests_total", (("code", "2xx"), ("side", "agent"))] == 3
            nursery.cancel_scope.cancel()


class _Reference:
    """prometheus-client's own Counter and Histogram, fed as PrometheusObserver once did."""

    def __init__(self, session_labels: int) -> None:
        self.registry = registry = CollectorRegistry()
        self.session_labels = session_labels
        labels = ["side", "code"] + (["session"] if session_labels else [])
        self.requests = Counter("tunnel2_requests", admin._REQUESTS_HELP, labels, registry=registry)
        self.latency = Histogram(
            "tunnel2_request_duration_seconds", admin._LATENCY_HELP, ["side"],
            buckets=admin._LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.body = Counter(
            "tunnel2_request_body_bytes", admin._REQUEST_BYTES_HELP, ["side"], registry=registry
        )
        self.out = Counter("tunnel2_response_bytes", admin._RESPONSE_BYTES_HELP, registry=registry)
        for side in ("relay", "agent"):
            self.latency.labels(side)
            self.body.labels(side)
        self.labelled: list[str] = []

    def on_event(self, event: RequestFinished) -> None:
        session = "other"
        if event.session_id in self.labelled or len(self.labelled) < self.session_labels:
            if event.session_id not in self.labelled:
                self.labelled.append(event.session_id)
            session = event.session_id
        code = f"{event.status // 100}xx" if event.status else "0"
        self.requests.labels(event.side, code, *[session][: bool(self.session_labels)]).inc()
        self.latency.labels(event.side).observe(event.duration)
        if event.request_body:
            self.body.labels(event.side).inc(event.request_body)
        if event.response_bytes:
            self.out.inc(event.response_bytes)


@pytest.mark.parametrize("created", [True, False], ids=["created", "no-created"])
@pytest.mark.parametrize("session_labels", [0, 2])
def test_request_metrics_are_what_prometheus_clients_own_types_expose(
    session_labels: int, created: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-request series are plain counts made samples at scrape time: the same lines,
    values and order as a Counter and a Histogram fed the same events, ``_created``
    timestamps included (a series is created when the Counter would create it), a duration
    on a bucket's bound, +Inf and NaN included, and no ``_created`` lines when
    prometheus-client is told to leave them out."""
    clock = [1_700_000_000.25]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", created)
    bounds = admin._LATENCY_BUCKETS
    cases: list[tuple[Side, int, float, int | None, int | None]] = [
        ("relay", 200, 0.0012, 0, 150),
        ("agent", 404, 0.3, None, None),
        ("relay", 0, bounds[2], 3, None),
        ("relay", 502, 0.0, None, 10),
        ("agent", 200, 20.0, 7, None),
        ("relay", 101, bounds[-1], 0, 5),
        ("agent", 200, 1e-9, 0, None),
        ("relay", 200, math.inf, 0, None),
        ("agent", 503, math.nan, 0, None),
    ]
    events = [
        RequestFinished(side, f"s{i % 3}", "GET", "/", body, status, sent, duration)
        for i, (side, status, duration, body, sent) in enumerate(cases)
    ]
    ours = PrometheusObserver(session_labels=session_labels)
    reference = _Reference(session_labels)
    for i, event in enumerate(events):
        clock[0] = 1_700_000_100.5 + 7 * i
        ours.on_event(event)
        reference.on_event(event)
    clock[0] = 1_700_009_999.0
    names = {
        "tunnel2_requests",
        "tunnel2_request_duration_seconds",
        "tunnel2_request_body_bytes",
        "tunnel2_response_bytes",
    }
    for generate in (generate_latest, openmetrics.generate_latest):
        expected = generate(reference.registry).decode().splitlines()
        got = generate(ours.registry).decode().splitlines()
        assert [line for line in got if any(name in line for name in names)] == [
            line for line in expected if line != "# EOF"
        ]
        assert any("_created" in line for line in got) is created
    scraped = samples(generate_latest(ours.registry).decode())
    assert scraped["tunnel2_request_duration_seconds_count", (("side", "relay"),)] == 5
    # The NaN is in the agent's sum and in none of its buckets.
    assert scraped["tunnel2_request_duration_seconds_count", (("side", "agent"),)] == 3
