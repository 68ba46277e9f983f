"""``tunnel2 loadtest``: the staged, open-loop load generator.

Layer: load-test kit. Imports trio, attrs, :mod:`tunnel2._http11`, :mod:`tunnel2.errors`, the
stream layer :mod:`tunnel2._sockets` and the other :mod:`tunnel2.loadtest` modules.

How it keeps the schedule (open loop, after wrk2): one scheduler task sleeps until each request's
slot (``stage start + k / rate``) and puts the slot on a queue; a fixed pool of connection tasks
(``connections``), each owning one keep-alive connection on a bare socket
(:class:`~tunnel2._sockets.FastSocketStream`), takes slots off the queue and sends. A slow answer
therefore never delays the schedule: the slot waits in the queue for a free connection and its
latency, measured from the *scheduled* time, shows the wait. Every connection is free again by the
deadline (slot + timeout) of the request it carries, so the queue holds at most about ``rate x
timeout`` slots however stalled the target is; a slot whose deadline has passed before a connection
takes it (only possible when the generator itself falls behind) is counted as a timeout unsent.

Latency therefore includes the generator's own start lag (slot to send), which the report gives
separately: trio's timers wake up to 1 ms late (epoll's resolution), about 0.5 ms on average,
the same for every URL, so it cancels out of ``--compare`` differences.

Only trio's clock is read (``trio.current_time`` / ``trio.sleep_until``), so a test that runs
under ``MockClock`` (``autojump_clock``) with :func:`trio.testing.memory_stream_pair`
connections checks the schedule exactly. CPU use is read from the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re
import socket as _stdlib_socket
import time
from collections.abc import Awaitable, Callable
from typing import Final, final
from urllib.parse import urlsplit

import attrs
import trio

from tunnel2._http11 import (
    LENGTH,
    MAX_HEAD_SIZE,
    NONE,
    UNTIL_CLOSE,
    find_head_end,
    make_body_reader,
    parse_response_head,
    response_framing,
    take,
)
from tunnel2._sockets import connect_tcp
from tunnel2.errors import RemoteProtocolError
from tunnel2.loadtest.procstats import ProcReading, cpu_percent, own_cpu_seconds, read_process
from tunnel2.loadtest.profiles import PROFILES, Stage
from tunnel2.loadtest.report import (
    FailureKind,
    GeneratorUsage,
    LoadReport,
    ProcessSample,
    ProcessUsage,
    RunReport,
    Thresholds,
    build_report,
)
from tunnel2.loadtest.stats import Recorder, percentile

__all__ = ["Connector", "LoadConfig", "Progress", "run_load", "run_profile", "tcp_connector"]

logger = logging.getLogger(__name__)

_RECV_SIZE: Final = 65536
_TOKEN_RE: Final = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})

_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError)  # the connection is gone

Connector = Callable[[str, int], Awaitable[trio.abc.HalfCloseableStream]]
"""``await connector(host, port)`` returns a connected stream; raises :class:`OSError`."""


@final
@attrs.frozen
class LoadConfig:
    """What to send, how fast and what counts as passing.

    Attributes:
        url: the ``http://`` URL to load (its path and query are requested).
        stages: the load profile (default: ``smoke``).
        profile: the profile's name, for the report.
        method: the request method.
        body: the request body; sent with Content-Length when non-empty or the method is
            POST, PUT or PATCH.
        headers: extra ``(name, value)`` request headers (a ``Host`` given here replaces the
            URL's).
        timeout: seconds from a request's scheduled time to its complete answer.
        connections: size of the connection pool (the most requests in flight).
        compare_url: run the same profile against this URL after ``url`` (a direct backend)
            and compare the two.
        watch_pids: processes whose CPU %, RSS and threads are sampled during the run.
        thresholds: pass/fail levels for the run against ``url``.
        sample_interval: seconds between resource samples.
    """

    url: str
    stages: tuple[Stage, ...] = PROFILES["smoke"]
    profile: str = "smoke"
    method: str = "GET"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    connections: int = 100
    compare_url: str | None = None
    watch_pids: tuple[int, ...] = ()
    thresholds: Thresholds = attrs.field(factory=Thresholds)
    sample_interval: float = 1.0

    def __attrs_post_init__(self) -> None:
        _split_url(self.url)
        if self.compare_url is not None:
            _split_url(self.compare_url)
        for name, text in self.headers:
            if not _TOKEN_RE.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if any(c in text for c in "\r\n\0") or not text.isascii():
                raise ValueError(f"header {name!r} value contains CR, LF, NUL or non-ASCII")
        if not self.stages:
            raise ValueError("a load profile needs at least one stage")
        if not _TOKEN_RE.fullmatch(self.method):
            raise ValueError(f"invalid method {self.method!r}")
        if self.method != self.method.upper():
            raise ValueError(f"method must be upper case, got {self.method!r}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if self.connections < 1:
            raise ValueError(f"connections must be at least 1, got {self.connections}")
        if not self.sample_interval > 0:
            raise ValueError(f"sample_interval must be positive, got {self.sample_interval}")


@final
@attrs.frozen
class Progress:
    """A once-a-second snapshot for the live progress line.

    Attributes:
        url: the URL being loaded.
        elapsed: seconds since the first scheduled request.
        stage: index of the current stage (0-based); ``stages`` is their number.
        target_rps: the current stage's rate.
        actual_rps: requests put on the wire in the last full second.
        sent: requests with an outcome so far; ``errors`` of them failed.
        in_flight: requests on the wire without an outcome yet.
        p99_ms: p99 latency of the answers in the last full second, or ``None``.
        cpu_percent: the generator's own CPU use since the previous snapshot.
    """

    url: str
    elapsed: float
    stage: int
    stages: int
    target_rps: float
    actual_rps: int
    sent: int
    errors: int
    in_flight: int
    p99_ms: float | None
    cpu_percent: float


@attrs.frozen
class _Target:
    host: str
    port: int
    request: bytes
    method: bytes


def _split_url(url: str) -> tuple[str, int, str, str]:
    """Return ``(host, port, host_header, target)``; raise ValueError for unusable URLs."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    try:
        host, port = parts.hostname, parts.port or 80
    except ValueError as exc:
        raise ValueError(f"bad URL {url!r}: {exc}") from None
    if not host:
        raise ValueError(f"URL {url!r} has no host")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if any(c <= " " or c >= "\x7f" for c in target):
        raise ValueError(
            f"URL {url!r} has whitespace, control or non-ASCII characters in its path "
            "(percent-encode them)"
        )
    return host, port, parts.netloc, target


def _build_target(config: LoadConfig, url: str) -> _Target:
    host, port, host_header, target = _split_url(url)
    names = {name.lower() for name, _ in config.headers}
    lines = [f"{config.method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host_header}")
    if "user-agent" not in names:
        lines.append("User-Agent: tunnel2-loadtest")
    lines += [f"{name}: {value}" for name, value in config.headers]
    if (config.body or config.method in _BODY_METHODS) and "content-length" not in names:
        lines.append(f"Content-Length: {len(config.body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + config.body
    return _Target(host, port, request, config.method.encode())


def tcp_connector() -> Connector:
    """Return the default connector: TCP with TCP_NODELAY, each address resolved once."""
    resolved: dict[tuple[str, int], str] = {}

    async def connect(host: str, port: int) -> trio.abc.HalfCloseableStream:
        key = (host, port)
        if key not in resolved:
            infos = await trio.socket.getaddrinfo(host, port, type=_stdlib_socket.SOCK_STREAM)
            resolved[key] = str(infos[0][4][0])  # numeric: not resolved again
        return await connect_tcp(resolved[key], port)

    return connect


class _Failed(Exception):
    def __init__(self, kind: FailureKind) -> None:
        super().__init__(kind.value)
        self.kind = kind


class _Stale(Exception):
    """The connection closed before any byte of the answer: retry once if it was reused."""


@final
class _Connection:
    """One pool slot: a keep-alive connection, opened on demand, reopened after a failure."""

    def __init__(self, connector: Connector, target: _Target) -> None:
        self._connector = connector
        self._target = target
        self._sock: trio.abc.HalfCloseableStream | None = None
        self._reused = False
        self._buf = bytearray()

    async def aclose(self) -> None:
        """Close the connection now; never waits, and is not a cancellation point (so a loop
        closing every connection on the way out of a cancelled run reaches them all)."""
        sock, self._sock = self._sock, None
        self._buf.clear()
        if sock is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(sock)

    async def _connect(self) -> trio.abc.HalfCloseableStream:
        try:
            sock = await self._connector(self._target.host, self._target.port)
        except OSError as exc:
            logger.debug("connect to %s:%d failed: %s", self._target.host, self._target.port, exc)
            raise _Failed(FailureKind.CONNECT) from exc
        self._sock = sock
        self._reused = False
        return sock

    async def warm_up(self) -> None:
        """Open the connection ahead of the schedule; failures are left to the first request."""
        if self._sock is None:
            with contextlib.suppress(_Failed):
                await self._connect()

    async def request(self) -> int:
        """Send the request and read the whole answer; return its status.

        Raises:
            _Failed: connect, connection or protocol failure (the connection is closed).
        """
        for attempt in (0, 1):
            sock = self._sock if self._sock is not None else await self._connect()
            reused = self._reused
            try:
                try:
                    await sock.send_all(self._target.request)
                except _GONE as exc:
                    raise _Stale from exc  # no answer started: as safe to retry as EOF
                return await self._read_answer(sock)
            except _Stale:
                await self.aclose()
                if not reused or attempt:
                    raise _Failed(FailureKind.CONNECTION) from None
            except _GONE as exc:
                await self.aclose()
                raise _Failed(FailureKind.CONNECTION) from exc
            except RemoteProtocolError as exc:
                await self.aclose()
                logger.debug("protocol error: %s", exc)
                raise _Failed(FailureKind.PROTOCOL) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_answer(self, sock: trio.abc.HalfCloseableStream) -> int:
        buf = self._buf
        got_bytes = False
        while True:
            end = find_head_end(buf)
            while end < 0:
                if len(buf) > MAX_HEAD_SIZE:
                    raise RemoteProtocolError(f"response head over {MAX_HEAD_SIZE} bytes")
                try:
                    data = await sock.receive_some(_RECV_SIZE)
                except _GONE as exc:
                    if got_bytes:
                        raise
                    raise _Stale from exc
                if not data:
                    if got_bytes:
                        raise _Failed(FailureKind.CONNECTION)
                    raise _Stale
                got_bytes = True
                start = max(0, len(buf) - 3)
                buf += data
                end = find_head_end(buf, start)
            head_bytes = take(buf, end)
            head = parse_response_head(head_bytes)
            if head.status >= 200 or head.status == 101:
                break  # else an interim 1xx answer (100 Continue): the final one follows
        framing, length = response_framing(head, self._target.method)
        if framing is LENGTH and len(buf) >= length:
            del buf[:length]  # the common case: the whole body came with the head
        elif framing is not NONE:
            reader = make_body_reader(framing, length)
            while True:
                reader.read(buf)
                if reader.done:
                    break
                data = await sock.receive_some(_RECV_SIZE)
                if not data:
                    if framing is not UNTIL_CLOSE:
                        raise _Failed(FailureKind.CONNECTION)
                    reader.feed_eof()
                    break
                buf += data
        if not head.keep_alive or framing is UNTIL_CLOSE or buf or head.status == 101:
            await self.aclose()  # bytes after the answer would be unsolicited: start afresh
        else:
            self._reused = True
        return head.status


@final
class _Run:
    """One profile against one URL: scheduler, connection pool, samplers and the recorder."""

    def __init__(
        self,
        config: LoadConfig,
        url: str,
        connector: Connector,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.config = config
        self.url = url
        self.target = _build_target(config, url)
        self.connector = connector
        self.on_progress = on_progress
        self.samples: dict[int, list[ProcessSample]] = {pid: [] for pid in config.watch_pids}
        self.readings: dict[int, tuple[ProcReading, ProcReading]] = {}

    async def run(self) -> RunReport:
        config = self.config
        connections = [_Connection(self.connector, self.target) for _ in range(config.connections)]
        with trio.move_on_after(config.timeout):
            async with trio.open_nursery() as nursery:
                for connection in connections:
                    nursery.start_soon(connection.warm_up)
        max_rate = max(stage.rate for stage in config.stages)
        queue_size = math.ceil(max_rate * config.timeout) + config.connections + 16
        send_channel, receive_channel = trio.open_memory_channel[tuple[int, float]](queue_size)
        started_at = time.time()
        cpu0, wall0 = own_cpu_seconds(), time.monotonic()
        t0 = trio.current_time()
        recorder = Recorder(config.stages, t0)
        try:
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as workers:
                    workers.start_soon(self._scheduler, send_channel, recorder)
                    for connection in connections:
                        workers.start_soon(
                            self._worker, connection, receive_channel.clone(), recorder
                        )
                    receive_channel.close()
                    if self.on_progress is not None:
                        nursery.start_soon(self._progress_task, recorder)
                    if config.watch_pids:
                        nursery.start_soon(self._sample_task, t0)
                nursery.cancel_scope.cancel()
        finally:
            for connection in connections:
                await connection.aclose()
        cpu, wall = own_cpu_seconds() - cpu0, time.monotonic() - wall0
        lags = sorted(recorder.lags) or [0.0]
        self._sample_once(trio.current_time() - t0)
        stages, overall = recorder.summaries()
        return RunReport(
            url=self.url,
            method=config.method,
            profile=config.profile,
            connections=config.connections,
            timeout_s=config.timeout,
            started_at=started_at,
            duration_s=recorder.end - t0,
            stages=stages,
            overall=overall,
            timeline=recorder.timeline(),
            processes=self._process_usage(),
            generator=GeneratorUsage(
                cpu_seconds=cpu,
                wall_seconds=wall,
                cpu_percent=cpu / wall * 100 if wall > 0 else 0.0,
                cpu_us_per_request=cpu / overall.sent * 1e6 if overall.sent else 0.0,
                lag_p50_ms=percentile(lags, 50) * 1000,
                lag_p99_ms=percentile(lags, 99) * 1000,
                lag_max_ms=lags[-1] * 1000,
            ),
        )

    async def _scheduler(
        self, send_channel: trio.MemorySendChannel[tuple[int, float]], recorder: Recorder
    ) -> None:
        async with send_channel:
            offset = 0.0
            for index, stage in enumerate(self.config.stages):
                start = recorder.t0 + offset
                count = stage.requests
                interval = 1.0 / stage.rate
                k = 0
                while k < count:
                    await trio.sleep_until(start + k * interval)
                    now = trio.current_time()
                    # Everything due by now goes out at once: a late wake-up must not slow
                    # the schedule down.
                    while k < count and (slot := start + k * interval) <= now:
                        try:
                            send_channel.send_nowait((index, slot))
                        except trio.WouldBlock:
                            recorder.on_failure(index, now, FailureKind.TIMEOUT, on_wire=False)
                        k += 1
                offset += stage.duration

    async def _worker(
        self,
        connection: _Connection,
        receive_channel: trio.MemoryReceiveChannel[tuple[int, float]],
        recorder: Recorder,
    ) -> None:
        timeout = self.config.timeout
        async with receive_channel:
            async for stage, scheduled in receive_channel:
                deadline = scheduled + timeout
                now = trio.current_time()
                if now >= deadline:
                    recorder.on_failure(stage, now, FailureKind.TIMEOUT, on_wire=False)
                    continue
                recorder.on_wire(stage, scheduled, now)
                failure: FailureKind | None = FailureKind.TIMEOUT
                status = 0
                with trio.CancelScope(deadline=deadline):
                    try:
                        status = await connection.request()
                        failure = None
                    except _Failed as exc:
                        failure = exc.kind
                now = trio.current_time()
                if failure is None:
                    recorder.on_answer(stage, scheduled, now, status)
                else:
                    if failure is FailureKind.TIMEOUT:
                        await connection.aclose()  # an answer may still be on its way
                    recorder.on_failure(stage, now, failure, on_wire=True)

    async def _progress_task(self, recorder: Recorder) -> None:
        assert self.on_progress is not None
        cpu, wall = own_cpu_seconds(), time.monotonic()
        second = 0
        while True:
            # Report on each second of the schedule once it is over.
            await trio.sleep_until(recorder.t0 + second + 1)
            stage = recorder.stage_at(recorder.t0 + second + 0.5)
            sent, p99 = recorder.second_figures(second)
            cpu1, wall1 = own_cpu_seconds(), time.monotonic()
            self.on_progress(
                Progress(
                    url=self.url,
                    elapsed=second + 1,
                    stage=stage,
                    stages=len(self.config.stages),
                    target_rps=self.config.stages[stage].rate,
                    actual_rps=sent,
                    sent=recorder.issued,
                    errors=recorder.failed,
                    in_flight=recorder.in_flight,
                    p99_ms=p99,
                    cpu_percent=(cpu1 - cpu) / (wall1 - wall) * 100 if wall1 > wall else 0.0,
                )
            )
            cpu, wall = cpu1, wall1
            second += 1

    def _sample_once(self, second: float) -> None:
        for pid in self.config.watch_pids:
            reading = read_process(pid)
            if reading is None:
                continue
            first, previous = self.readings.get(pid, (reading, reading))
            if reading is not previous:
                self.samples[pid].append(
                    ProcessSample(
                        second=round(second, 3),
                        cpu_percent=cpu_percent(previous, reading),
                        rss_bytes=reading.rss_bytes,
                        threads=reading.threads,
                    )
                )
            self.readings[pid] = (first, reading)

    async def _sample_task(self, t0: float) -> None:
        while True:
            self._sample_once(trio.current_time() - t0)
            await trio.sleep(self.config.sample_interval)

    def _process_usage(self) -> tuple[ProcessUsage, ...]:
        usages = []
        for pid in self.config.watch_pids:
            if pid not in self.readings:
                logger.warning("process %d could not be read from /proc", pid)
                continue
            first, last = self.readings[pid]
            samples = tuple(self.samples[pid])
            usages.append(
                ProcessUsage(
                    pid=pid,
                    name=last.name,
                    samples=samples,
                    cpu_mean_percent=cpu_percent(first, last),
                    cpu_max_percent=max((s.cpu_percent for s in samples), default=0.0),
                    rss_max_bytes=max((s.rss_bytes for s in samples), default=last.rss_bytes),
                    threads_max=max((s.threads for s in samples), default=last.threads),
                )
            )
        return tuple(usages)


async def run_profile(
    config: LoadConfig,
    url: str | None = None,
    *,
    connector: Connector | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunReport:
    """Run ``config``'s profile against one URL and return what was measured.

    Args:
        config: the load to apply.
        url: the URL to load; ``config.url`` if ``None``.
        connector: opens connections; :func:`tcp_connector` if ``None``. Tests pass one that
            returns ends of :func:`trio.testing.memory_stream_pair`.
        on_progress: called once a second (trio time) with a :class:`Progress`.

    Returns:
        The run's report. Thresholds are not applied here (see :func:`run_load`).

    Raises:
        OSError: the host name cannot be resolved (other network trouble is recorded as
            failures, not raised).

    Checkpoints. Runs its tasks in nurseries it owns; a cancellation closes every connection
    and leaves nothing running. The run lasts the profile's duration plus at most ``timeout``.
    """
    connector = connector or tcp_connector()
    run = _Run(config, url or config.url, connector, on_progress)
    return await run.run()


async def run_load(
    config: LoadConfig,
    *,
    connector: Connector | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> LoadReport:
    """Run the load test ``config`` describes: the URL, then the ``compare_url`` if any.

    Args:
        config: the load, the URLs and the thresholds.
        connector: as for :func:`run_profile`.
        on_progress: as for :func:`run_profile`; :attr:`Progress.url` tells the runs apart.

    Returns:
        The report: the run, the baseline run and their comparison, and the breached
        thresholds (``report.passed`` is the verdict).

    Raises:
        OSError: a host name cannot be resolved.

    Checkpoints; runs its tasks in nurseries it owns; a cancellation leaves nothing open.
    """
    if connector is None:
        connector = tcp_connector()
        for url in (config.url, config.compare_url):
            if url is not None:
                host, port, _, _ = _split_url(url)
                await _resolve(host, port)
    run = await run_profile(config, connector=connector, on_progress=on_progress)
    compare = None
    if config.compare_url is not None:
        compare = await run_profile(
            config, config.compare_url, connector=connector, on_progress=on_progress
        )
    return build_report(run, compare, config.thresholds)


async def _resolve(host: str, port: int) -> None:
    try:
        await trio.socket.getaddrinfo(host, port, type=_stdlib_socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(exc.errno or errno.ENOENT, f"cannot resolve {host}: {exc}") from exc
