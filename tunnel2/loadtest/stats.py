"""Recording outcomes during a run and turning them into report records.

Layer: load-test kit. Imports the standard library, attrs, :mod:`tunnel2.loadtest.profiles`
and :mod:`tunnel2.loadtest.report`; no trio (times are passed in), so it is tested without a
clock.

Every issued request gets exactly one outcome: an answer (with its status) or a failure (with
its :class:`~tunnel2.loadtest.report.FailureKind`). Latency is ``done - scheduled``, where
``scheduled`` is the request's slot in the open-loop schedule, not the moment it was written.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, final

import attrs

from tunnel2.loadtest.report import FailureKind, LatencySummary, Summary, TimelinePoint

if TYPE_CHECKING:
    from tunnel2.loadtest.profiles import Stage

__all__ = ["Recorder", "percentile", "summarize_latency"]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Return the nearest-rank ``p``-th percentile (0 < p <= 100) of non-empty sorted values."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_latency(seconds: Sequence[float]) -> LatencySummary | None:
    """Summarize latencies given in seconds (any order); ``None`` if there are none."""
    if not seconds:
        return None
    values = sorted(seconds)
    return LatencySummary(
        count=len(values),
        mean_ms=sum(values) / len(values) * 1000,
        p50_ms=percentile(values, 50) * 1000,
        p75_ms=percentile(values, 75) * 1000,
        p95_ms=percentile(values, 95) * 1000,
        p99_ms=percentile(values, 99) * 1000,
        max_ms=values[-1] * 1000,
    )


def _failure_kind(status: int) -> FailureKind | None:
    if status < 400:
        return None
    return FailureKind.HTTP_4XX if status < 500 else FailureKind.HTTP_5XX


@attrs.define
class _StageRecord:
    stage: Stage
    offset: float  # scheduled start, seconds after t0
    issued: int = 0
    on_wire: int = 0
    succeeded: int = 0
    answered: int = 0
    failures: Counter[str] = attrs.Factory(Counter)
    statuses: Counter[int] = attrs.Factory(Counter)
    latencies: list[float] = attrs.Factory(list)
    last_send: float = 0.0  # seconds after t0
    last_done: float = 0.0


@attrs.define
class _Second:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    latencies: list[float] = attrs.Factory(list)


@final
class Recorder:
    """Collects the outcome of every request of one run.

    Plain synchronous calls, made by the load generator with trio's clock readings; ``t0`` is
    the scheduled time of the first request.
    """

    def __init__(self, stages: Sequence[Stage], t0: float) -> None:
        self.t0 = t0
        self._stages: list[_StageRecord] = []
        offset = 0.0
        for stage in stages:
            self._stages.append(_StageRecord(stage, offset))
            offset += stage.duration
        self._seconds: dict[int, _Second] = {}
        self.issued = 0
        self.failed = 0
        self.in_flight = 0
        self.end = t0
        self.lags: list[float] = []
        """Seconds from each request's slot to its start on a connection."""

    def _second(self, now: float) -> _Second:
        key = int(now - self.t0) if now > self.t0 else 0
        second = self._seconds.get(key)
        if second is None:
            second = self._seconds[key] = _Second()
        return second

    def on_wire(self, stage: int, scheduled: float, now: float) -> None:
        """A request of ``stage`` scheduled at ``scheduled`` starts on a connection at ``now``."""
        self.lags.append(now - scheduled)
        record = self._stages[stage]
        record.on_wire += 1
        record.last_send = now - self.t0
        self._second(now).sent += 1
        self.in_flight += 1

    def on_answer(self, stage: int, scheduled: float, now: float, status: int) -> None:
        """A request scheduled at ``scheduled`` got a complete answer with ``status``."""
        record = self._stages[stage]
        latency = now - scheduled
        record.issued += 1
        record.answered += 1
        record.statuses[status] += 1
        record.latencies.append(latency)
        record.last_done = max(record.last_done, now - self.t0)
        second = self._second(now)
        second.completed += 1
        second.latencies.append(latency)
        self.issued += 1
        self.in_flight -= 1
        self.end = max(self.end, now)
        kind = _failure_kind(status)
        if kind is None:
            record.succeeded += 1
        else:
            record.failures[kind] += 1
            second.failed += 1
            self.failed += 1

    def on_failure(self, stage: int, now: float, kind: FailureKind, *, on_wire: bool) -> None:
        """A request failed with ``kind``; ``on_wire`` says whether :meth:`on_wire` was called."""
        record = self._stages[stage]
        record.issued += 1
        record.failures[kind] += 1
        self._second(now).failed += 1
        self.issued += 1
        self.failed += 1
        self.end = max(self.end, now)
        if on_wire:
            self.in_flight -= 1

    def stage_at(self, now: float) -> int:
        """Index of the stage scheduled at ``now`` (the last one after the schedule ends)."""
        elapsed = now - self.t0
        for i, record in enumerate(self._stages):
            if elapsed < record.offset + record.stage.duration:
                return i
        return len(self._stages) - 1

    def second_figures(self, key: int) -> tuple[int, float | None]:
        """Return requests put on the wire and the p99 latency (ms) in second ``key``."""
        second = self._seconds.get(key)
        if second is None:
            return 0, None
        p99 = percentile(sorted(second.latencies), 99) * 1000 if second.latencies else None
        return second.sent, p99

    # --- building the report ----------------------------------------------------------------

    def _summary(
        self, label: str, records: Sequence[_StageRecord], first: int, last: int
    ) -> Summary:
        duration = sum(r.stage.duration for r in records)
        planned = sum(r.stage.requests for r in records)
        start = records[0].offset
        issued = sum(r.issued for r in records)
        succeeded = sum(r.succeeded for r in records)
        failures: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        for r in records:
            failures.update(r.failures)
            statuses.update(r.statuses)
            latencies += r.latencies
        on_wire = sum(r.on_wire for r in records)
        answered = sum(r.answered for r in records)
        last_rate = records[-1].stage.rate
        send_span = max(duration, max(r.last_send for r in records) - start + 1 / last_rate)
        done_span = max(duration, max(r.last_done for r in records) - start)
        peak = max((s.completed for k, s in self._seconds.items() if first <= k <= last), default=0)
        return Summary(
            label=label,
            target_rps=planned / duration,
            duration_s=duration,
            sent=issued,
            succeeded=succeeded,
            failed=issued - succeeded,
            success_rate=succeeded / issued if issued else 1.0,
            failures={kind.value: failures[kind.value] for kind in FailureKind},
            timeouts=failures[FailureKind.TIMEOUT.value],
            statuses={str(code): n for code, n in sorted(statuses.items())},
            latency=summarize_latency(latencies),
            actual_rps=on_wire / send_span,
            throughput_rps=answered / done_span,
            peak_rps=float(peak),
        )

    def _seconds_of(self, record: _StageRecord) -> tuple[int, int]:
        first = math.floor(record.offset)
        last = max(first, math.ceil(record.offset + record.stage.duration) - 1)
        return first, last

    def summaries(self) -> tuple[tuple[Summary, ...], Summary]:
        """Return one :class:`Summary` per stage and the overall one."""
        stages = tuple(
            self._summary(f"stage {i + 1}", [r], *self._seconds_of(r))
            for i, r in enumerate(self._stages)
        )
        overall = self._summary("overall", self._stages, 0, max(self._seconds, default=0))
        return stages, overall

    def timeline(self) -> tuple[TimelinePoint, ...]:
        """Return one point per second from the first scheduled request to the last outcome."""
        points = []
        for key in range(max(self._seconds, default=-1) + 1):
            second = self._seconds.get(key) or _Second()
            stage = self.stage_at(self.t0 + key + 0.5)
            values = sorted(second.latencies)
            points.append(
                TimelinePoint(
                    second=key,
                    stage=stage,
                    target_rps=self._stages[stage].stage.rate,
                    sent=second.sent,
                    completed=second.completed,
                    failed=second.failed,
                    p50_ms=percentile(values, 50) * 1000 if values else None,
                    p99_ms=percentile(values, 99) * 1000 if values else None,
                )
            )
        return tuple(points)
