"""Tests for the load generator, :mod:`tunnel2.loadtest.loadgen`.

The schedule is checked exactly under ``autojump_clock`` with memory sockets (a connector that
serves each connection with the real backend, or with a misbehaving fake). A few tests use real
sockets and the real clock for the failure kinds a kernel produces (refused, timed out); they
assert counts, never timings.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from trio.abc import HalfCloseableStream

from tunnel2.loadtest.backend import Backend, BackendConfig, serve_backend
from tunnel2.loadtest.loadgen import Connector, LoadConfig, Progress, run_load, run_profile
from tunnel2.loadtest.profiles import Stage
from tunnel2.loadtest.report import Thresholds

Handler = Callable[[HalfCloseableStream], Awaitable[None]]

NO_THRESHOLDS = Thresholds(None, None, None)


def memory_connector(nursery: trio.Nursery, handler: Handler | dict[int, Handler]) -> Connector:
    """A connector whose connections are served by ``handler`` (chosen by port if a dict)."""

    async def connect(host: str, port: int) -> HalfCloseableStream:
        await trio.lowlevel.checkpoint()
        client, server = trio.testing.memory_stream_pair()
        chosen = handler[port] if isinstance(handler, dict) else handler
        nursery.start_soon(chosen, server)
        return client

    return connect


@pytest.fixture
def backend() -> Backend:
    return Backend(BackendConfig(), "memory", 0)


def config(path: str = "/loadtest/ping", **kwargs: object) -> LoadConfig:
    options: dict[str, object] = {"thresholds": NO_THRESHOLDS, "connections": 4}
    options.update(kwargs)
    return LoadConfig(f"http://backend.test{path}", **options)  # type: ignore[arg-type]


async def read_request(sock: HalfCloseableStream) -> bytes:
    """Read one request head (no body) from ``sock``; ``b""`` at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await sock.receive_some(65536)
        if not data:
            return b""
        buf += data
    return buf


def answering(*answers: bytes, close: bool = True) -> Handler:
    """A fake server that reads a request and sends each answer in turn, then closes."""

    async def handler(sock: HalfCloseableStream) -> None:
        try:
            for answer in answers:
                if not await read_request(sock):
                    return
                await sock.send_all(answer)
            if not close:
                await trio.sleep_forever()
        except trio.BrokenResourceError:
            pass
        finally:
            await sock.aclose()

    return handler


async def test_schedule_is_kept_exactly(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    stages = (Stage(10, 2), Stage(20, 1))
    with trio.fail_after(60):
        run = await run_profile(
            config(stages=stages), connector=memory_connector(nursery, backend.serve_connection)
        )
    first, second = run.stages
    assert (first.sent, second.sent) == (20, 20)
    assert (first.succeeded, second.succeeded) == (20, 20)
    assert first.actual_rps == pytest.approx(10)
    assert second.actual_rps == pytest.approx(20)
    assert first.throughput_rps == pytest.approx(10)
    assert run.overall.target_rps == pytest.approx(40 / 3)
    assert [p.sent for p in run.timeline] == [10, 10, 20]
    assert [p.stage for p in run.timeline] == [0, 0, 1]
    assert run.overall.latency is not None
    assert run.overall.latency.max_ms == 0  # memory sockets, fake clock: answers take no time
    assert run.duration_s == pytest.approx(2 + 19 / 20)
    assert run.generator.lag_max_ms == 0
    assert run.overall.statuses == {"200": 40}


async def test_latency_counts_from_the_scheduled_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    # One connection, 100 ms answers, a slot every 50 ms: request k starts at k * 100 ms and
    # ends at (k + 1) * 100 ms, so its latency is 100 + 50 k ms, not the 100 ms a closed-loop
    # generator would report.
    with trio.fail_after(60):
        run = await run_profile(
            config("/loadtest/delay/100", stages=(Stage(20, 1),), connections=1),
            connector=memory_connector(nursery, backend.serve_connection),
        )
    latency = run.overall.latency
    assert latency is not None
    assert run.overall.succeeded == 20
    assert latency.mean_ms == pytest.approx(100 + 50 * 9.5)
    assert latency.p50_ms == pytest.approx(100 + 50 * 9)
    assert latency.max_ms == pytest.approx(100 + 50 * 19)
    assert latency.p99_ms == pytest.approx(latency.max_ms)
    assert run.overall.actual_rps < 20  # the pool, not the schedule, held it back
    assert run.generator.lag_max_ms == pytest.approx(50 * 19)


async def test_timeouts_free_the_connection(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    with trio.fail_after(60):
        run = await run_profile(
            config("/loadtest/delay/1000", stages=(Stage(10, 1),), connections=1, timeout=1.5),
            connector=memory_connector(nursery, backend.serve_connection),
        )
    overall = run.overall
    assert (overall.sent, overall.succeeded, overall.timeouts) == (10, 1, 9)
    assert overall.failures["timeout"] == 9
    assert overall.success_rate == pytest.approx(0.1)
    assert overall.latency is not None
    assert overall.latency.count == 1


async def test_connect_failures(autojump_clock: trio.testing.MockClock) -> None:
    async def refuse(host: str, port: int) -> HalfCloseableStream:
        await trio.lowlevel.checkpoint()
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with trio.fail_after(60):
        run = await run_profile(config(stages=(Stage(10, 1),)), connector=refuse)
    assert run.overall.failures["connect"] == 10
    assert run.overall.succeeded == 0
    assert run.overall.latency is None


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        (answering(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"), "http_5xx"),
        (answering(b"HTTP/1.1 404 No\r\nContent-Length: 2\r\n\r\nno"), "http_4xx"),
        (answering(b"HELLO\r\n\r\n"), "protocol"),
        (answering(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), "protocol"),
        (answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), "protocol"),
        (answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), "connection"),
        (answering(b"HTTP/1.1 200 OK\r\nContent-Le"), "connection"),
        (answering(), "connection"),  # closes without answering a fresh connection
    ],
)
async def test_failure_classification(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, handler: Handler, kind: str
) -> None:
    with trio.fail_after(60):
        run = await run_profile(
            config(stages=(Stage(10, 1),)), connector=memory_connector(nursery, handler)
        )
    assert run.overall.failures[kind] == 10
    assert run.overall.failed == 10
    assert sum(run.overall.failures.values()) == 10


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ],
)
async def test_answer_framings_succeed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, answer: bytes
) -> None:
    # Each connection answers twice then closes; the generator reconnects as needed.
    with trio.fail_after(60):
        run = await run_profile(
            config(stages=(Stage(10, 1),), connections=1),
            connector=memory_connector(nursery, answering(answer, answer)),
        )
    assert run.overall.succeeded == 10


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\nbody until close", id="body-until-close"),
        # The server answers one request per connection and then closes without a word, as a
        # server whose idle timeout fired would: the request goes again on a fresh connection.
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="stale-retried-once"),
    ],
)
async def test_one_answer_per_connection_succeeds(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, answer: bytes
) -> None:
    with trio.fail_after(60):
        run = await run_profile(
            config(stages=(Stage(10, 1),), connections=1),
            connector=memory_connector(nursery, answering(answer)),
        )
    assert run.overall.succeeded == 10


async def test_request_bytes(autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    received: list[bytes] = []

    async def capture(sock: HalfCloseableStream) -> None:
        buf = b""
        while len(received) < 1:
            buf += await sock.receive_some(65536)
            if buf.endswith(b"payload"):
                received.append(buf)
                await sock.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep_forever()

    cfg = LoadConfig(
        "http://example.test:8080/a/b?c=d",
        stages=(Stage(1, 1),),
        method="POST",
        body=b"payload",
        headers=(("X-One", "1"), ("User-Agent", "mine")),
        connections=1,
        thresholds=NO_THRESHOLDS,
    )
    with trio.fail_after(60):
        run = await run_profile(cfg, connector=memory_connector(nursery, capture))
        nursery.cancel_scope.cancel()
    assert run.overall.succeeded == 1
    assert received == [
        b"POST /a/b?c=d HTTP/1.1\r\nHost: example.test:8080\r\nX-One: 1\r\nUser-Agent: mine\r\n"
        b"Content-Length: 7\r\n\r\npayload"
    ]


async def test_thresholds_are_applied(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    connector = memory_connector(nursery, backend.serve_connection)
    with trio.fail_after(60):
        slow = await run_load(
            config("/loadtest/delay/100", stages=(Stage(5, 1),), thresholds=Thresholds()),
            connector=connector,
        )
        failing = await run_load(
            config("/loadtest/status/500", stages=(Stage(5, 1),), thresholds=Thresholds()),
            connector=connector,
        )
        fine = await run_load(
            config(stages=(Stage(5, 1),), thresholds=Thresholds()), connector=connector
        )
    assert [b.name for b in slow.breaches] == ["max-p99-ms", "max-mean-ms"]
    assert [b.name for b in failing.breaches] == ["min-success"]
    assert not slow.passed
    assert not failing.passed
    assert fine.passed
    assert fine.breaches == ()


async def test_compare_runs_both_urls(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    progress: list[Progress] = []
    cfg = LoadConfig(
        "http://tunnel.test:1/loadtest/delay/10",
        stages=(Stage(10, 2),),
        compare_url="http://direct.test:2/loadtest/ping",
        thresholds=NO_THRESHOLDS,
    )
    connector = memory_connector(
        nursery, {1: backend.serve_connection, 2: backend.serve_connection}
    )
    with trio.fail_after(60):
        report = await run_load(cfg, connector=connector, on_progress=progress.append)
    assert report.compare is not None
    assert report.run.url == cfg.url
    assert report.compare.url == cfg.compare_url
    rows = {(r.scope, r.metric): r for r in report.comparison}
    p99 = rows["overall", "p99_ms"]
    assert p99.measured == pytest.approx(10)
    assert p99.baseline == 0
    assert p99.difference == pytest.approx(10)
    assert p99.ratio is None  # the baseline is 0 under the fake clock
    assert rows["overall", "success_rate"].ratio == 1
    # Progress came from both runs, once a second.
    assert {p.url for p in progress} == {cfg.url, cfg.compare_url}
    assert all(p.errors == 0 and p.target_rps == 10 for p in progress)


async def test_progress_reports_the_current_stage(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    progress: list[Progress] = []
    with trio.fail_after(60):
        await run_profile(
            config(stages=(Stage(10, 2), Stage(30, 2))),
            connector=memory_connector(nursery, backend.serve_connection),
            on_progress=progress.append,
        )
    # One report per second of the schedule; the run ends 30 ms before the fourth.
    assert [p.elapsed for p in progress] == [1, 2, 3]
    assert [p.stage for p in progress] == [0, 0, 1]
    assert [p.actual_rps for p in progress] == [10, 10, 30]
    assert [p.sent // 10 for p in progress] == [1, 2, 5]  # the slot at the tick may be in
    assert all(p.stages == 2 for p in progress)


async def test_watch_pid_samples_the_process(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    with trio.fail_after(60):
        run = await run_profile(
            config(stages=(Stage(10, 3),), watch_pids=(os.getpid(), 2**22 + 12345)),
            connector=memory_connector(nursery, backend.serve_connection),
        )
    (usage,) = run.processes  # the pid that does not exist is left out
    assert usage.pid == os.getpid()
    assert usage.rss_max_bytes > 0
    assert usage.threads_max >= 1
    assert len(usage.samples) >= 3
    assert run.generator.cpu_seconds >= 0


async def test_cancellation_closes_every_connection(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, backend: Backend
) -> None:
    with trio.fail_after(60):
        with trio.move_on_after(1.5):
            await run_profile(
                config("/loadtest/delay/500", stages=(Stage(10, 10),)),
                connector=memory_connector(nursery, backend.serve_connection),
            )
        await trio.sleep(1)  # the backend notices when its delay ends
    assert backend.statistics().connections == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "https://x/"}, "only http://"),
        ({"url": "http:///path"}, "no host"),
        ({"url": "http://x:99999/"}, "bad URL"),
        ({"compare_url": "ftp://x/"}, "only http://"),
        ({"headers": (("Bad Name", "v"),)}, "invalid header name"),
        ({"headers": (("X", "a\r\nb"),)}, "CR, LF"),
        ({"headers": (("X", "caf\u00e9"),)}, "non-ASCII"),
        ({"url": "http://x/caf\u00e9"}, "percent-encode"),
        ({"url": "http://x/a b"}, "percent-encode"),
        ({"method": "get"}, "upper case"),
        ({"method": "G T"}, "invalid method"),
        ({"connections": 0}, "at least 1"),
        ({"timeout": 0}, "positive"),
        ({"stages": ()}, "at least one stage"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    options: dict[str, object] = {"url": "http://x/"}
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        LoadConfig(**options)  # type: ignore[arg-type]


# --- real sockets, real clock -----------------------------------------------------------------


async def test_real_backend_answers(nursery: trio.Nursery) -> None:
    backend: Backend = await nursery.start(serve_backend, "127.0.0.1", 0)
    cfg = LoadConfig(
        f"{backend.url}/loadtest/echo",
        method="POST",
        body=b"x" * 1000,
        stages=(Stage(40, 0.5),),
        connections=4,
        thresholds=Thresholds(max_p99_ms=None, min_success=1.0, max_mean_ms=None),
    )
    with trio.fail_after(20):
        report = await run_load(cfg)
    assert report.passed
    assert report.run.overall.succeeded == 20


async def test_real_refused_timeout_and_5xx(nursery: trio.Nursery) -> None:
    backend: Backend = await nursery.start(serve_backend, "127.0.0.1", 0)
    # A bound socket that does not listen: connecting to it is refused.
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    stages = (Stage(20, 0.5),)
    cases = [
        (f"http://127.0.0.1:{refused_port}/", 5.0, "connect"),
        (f"{backend.url}/loadtest/delay/5000", 0.2, "timeout"),
        (f"{backend.url}/loadtest/status/502", 5.0, "http_5xx"),
    ]
    with closed, trio.fail_after(30):
        for url, timeout, kind in cases:
            run = await run_profile(
                LoadConfig(url, stages=stages, timeout=timeout, thresholds=NO_THRESHOLDS)
            )
            assert run.overall.failures[kind] == 10, (url, run.overall.failures)
            assert run.overall.succeeded == 0


async def test_unresolvable_host_raises() -> None:
    with trio.fail_after(20), pytest.raises(OSError, match="cannot resolve"):
        await run_load(LoadConfig("http://no-such-host.invalid/", stages=(Stage(1, 1),)))
