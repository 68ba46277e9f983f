"""The load-test report: records, thresholds, comparison, and text / JSON / HTML renderings.

Layer: load-test kit. Pure: imports the standard library, attrs and
:mod:`tunnel2.loadtest.profiles`; no trio, no I/O except :func:`write_json` / :func:`write_html`.

Every figure is computed once, when the run ends (:mod:`tunnel2.loadtest.stats` builds the
records); the renderings only format them, so the text, the JSON and the HTML always agree.
Latencies are in milliseconds and measured from each request's *scheduled* send time.
"""

from __future__ import annotations

import enum
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, final

import attrs

__all__ = [
    "SCHEMA",
    "Baseline",
    "BaselineCheck",
    "Breach",
    "ComparisonRow",
    "FailureKind",
    "GeneratorUsage",
    "LatencySummary",
    "LoadReport",
    "MachineInfo",
    "ProcessSample",
    "ProcessUsage",
    "Regression",
    "RunReport",
    "Summary",
    "Thresholds",
    "TimelinePoint",
    "Tolerances",
    "build_report",
    "check_thresholds",
    "compare_runs",
    "render_html",
    "render_text",
    "to_json",
    "write_html",
    "write_json",
]

SCHEMA: Final = "tunnel2.loadtest/1"


class FailureKind(enum.StrEnum):
    """Why a request did not succeed. A request succeeds when it gets a 1xx-3xx final answer."""

    CONNECT = "connect"
    """The TCP connection could not be opened (refused, unreachable)."""
    TIMEOUT = "timeout"
    """No complete answer within ``--timeout`` of the scheduled send time."""
    HTTP_4XX = "http_4xx"
    """The answer had a 4xx status."""
    HTTP_5XX = "http_5xx"
    """The answer had a 5xx status."""
    PROTOCOL = "protocol"
    """The answer was not valid HTTP/1.1."""
    CONNECTION = "connection"
    """The connection was reset or closed before the answer was complete."""


@final
@attrs.frozen
class LatencySummary:
    """Latency of the requests that got a complete answer (any status), in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p75_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@final
@attrs.frozen
class Summary:
    """Figures for one stage, or for the whole run.

    Attributes:
        label: ``"stage 1"`` ... or ``"overall"``.
        target_rps: the stage's rate; for ``overall`` the planned requests over the planned time.
        duration_s: the planned duration.
        sent: requests issued (on schedule, or expired waiting for a free connection).
        succeeded: requests answered with a 1xx-3xx status.
        failed: ``sent - succeeded``, broken down in ``failures``.
        success_rate: ``succeeded / sent`` (1.0 when nothing was sent).
        failures: count per :class:`FailureKind` value, every kind present.
        timeouts: the same as ``failures["timeout"]``.
        statuses: count per HTTP status code (as a string, for JSON).
        latency: latency figures, or ``None`` if no request got an answer.
        actual_rps: requests actually put on the wire per second over the stage.
        throughput_rps: answers (any status) per second over the stage.
        peak_rps: the most answers completed within one second of the run.
    """

    label: str
    target_rps: float
    duration_s: float
    sent: int
    succeeded: int
    failed: int
    success_rate: float
    failures: dict[str, int]
    timeouts: int
    statuses: dict[str, int]
    latency: LatencySummary | None
    actual_rps: float
    throughput_rps: float
    peak_rps: float


@final
@attrs.frozen
class TimelinePoint:
    """One second of the run, for the progress line and the chart.

    Attributes:
        second: seconds since the first scheduled request (the point covers
            ``[second, second + 1)``).
        stage: index of the stage scheduled at that time (0-based).
        target_rps: that stage's rate.
        sent: requests put on the wire in that second.
        completed: answers (any status) received in that second.
        failed: requests that failed in that second.
        p50_ms: median latency of the answers in that second, or ``None``.
        p99_ms: 99th percentile of the same, or ``None``.
    """

    second: int
    stage: int
    target_rps: float
    sent: int
    completed: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None


@final
@attrs.frozen
class ProcessSample:
    """One sample of a watched process (``second`` since the run started)."""

    second: float
    cpu_percent: float
    rss_bytes: int
    threads: int


@final
@attrs.frozen
class ProcessUsage:
    """Resource use of one ``--watch-pid`` process over the run (CPU: 100 % = one core)."""

    pid: int
    name: str
    samples: tuple[ProcessSample, ...]
    cpu_mean_percent: float
    cpu_max_percent: float
    rss_max_bytes: int
    threads_max: int


@final
@attrs.frozen
class GeneratorUsage:
    """What the load generator itself cost and how closely it kept the schedule.

    Attributes:
        cpu_seconds: CPU time the generator process used during the run.
        wall_seconds: the run's wall-clock time.
        cpu_percent: ``cpu_seconds / wall_seconds`` (100 % = one core).
        cpu_us_per_request: CPU microseconds per request issued.
        lag_p50_ms: median time from a request's slot to its start on a connection. Part of
            every latency figure: trio's timers wake up to 1 ms late (epoll's resolution), so
            about 0.5 ms is the floor; more means the generator or the pool fell behind.
        lag_p99_ms: the same, 99th percentile.
        lag_max_ms: the same, maximum.
    """

    cpu_seconds: float
    wall_seconds: float
    cpu_percent: float
    cpu_us_per_request: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float


@final
@attrs.frozen
class RunReport:
    """Everything measured while running one profile against one URL."""

    url: str
    method: str
    profile: str
    connections: int
    timeout_s: float
    started_at: float
    """Unix time of the start."""
    duration_s: float
    """From the first scheduled request to the last answer or failure."""
    stages: tuple[Summary, ...]
    overall: Summary
    timeline: tuple[TimelinePoint, ...]
    processes: tuple[ProcessUsage, ...]
    generator: GeneratorUsage


@final
@attrs.frozen
class Thresholds:
    """Pass/fail levels for a run (defaults: the reference deployment's alert levels).

    ``None`` disables a check. ``min_success`` is a fraction (0.99 = 99 %).
    """

    max_p99_ms: float | None = 50.0
    min_success: float | None = 0.99
    max_mean_ms: float | None = 20.0


@final
@attrs.frozen
class Breach:
    """A threshold the run did not meet."""

    name: str
    """The flag that set it: ``max-p99-ms``, ``min-success`` or ``max-mean-ms``."""
    actual: float | None
    limit: float
    message: str


@final
@attrs.frozen
class ComparisonRow:
    """One metric measured through the URL under test and through the ``--compare`` URL.

    ``difference`` is ``measured - baseline``; ``ratio`` is ``measured / baseline`` (``None``
    when the baseline is 0 or either side has no value).
    """

    scope: str
    metric: str
    measured: float | None
    baseline: float | None
    difference: float | None
    ratio: float | None


@final
@attrs.frozen
class MachineInfo:
    """The machine a baseline was measured on (:func:`tunnel2.loadtest.baseline.machine_info`).

    Attributes:
        hostname: the host name; shown, never compared (CI runners get a new one each run).
        system: operating system and kernel release, e.g. ``"Linux 6.1.0-18-amd64"``.
        arch: the machine type, e.g. ``"x86_64"``.
        cpu_model: the CPU's model name, or ``"unknown"``.
        cpu_count: logical CPUs.
        python: implementation and version, e.g. ``"CPython 3.11.2"``.
    """

    hostname: str
    system: str
    arch: str
    cpu_model: str
    cpu_count: int
    python: str


@final
@attrs.frozen
class Baseline:
    """A run saved with ``--save-baseline``, for later runs to be compared with.

    Attributes:
        created_at: when it was saved, ISO 8601 in UTC (``2026-12-01T11:50:00Z``).
        tunnel2_version: the version that measured it.
        machine: where it was measured.
        run: the run against URL, every figure of it.
        compare: the ``--compare`` run of the same invocation, if there was one.
    """

    created_at: str
    tunnel2_version: str
    machine: MachineInfo
    run: RunReport
    compare: RunReport | None


@final
@attrs.frozen
class Tolerances:
    """How far each figure may move the wrong way from its baseline (``None``: not checked).

    Latency figures regress when they rise by more than their percentage *and* by more than
    ``min_latency_delta_ms`` (so 0.4 ms -> 0.6 ms is noise, not a regression); throughput
    when it falls by more than its percentage; the success rate when it falls by more than
    ``success_points`` percentage points (99.5 % -> 98 % is 1.5 points).
    """

    throughput_pct: float | None = 20.0
    mean_pct: float | None = 20.0
    p50_pct: float | None = None
    p99_pct: float | None = 20.0
    success_points: float | None = 1.0
    min_latency_delta_ms: float = 1.0


@final
@attrs.frozen
class Regression:
    """A figure that moved past its tolerance against the baseline.

    Attributes:
        scope: ``"overall"`` or a stage, as in :class:`ComparisonRow`.
        figure: ``throughput``, ``mean``, ``p50``, ``p99`` or ``success``.
        baseline: the baseline's value (req/s, ms, or a fraction for ``success``).
        measured: this run's value; ``None`` if it had no answers.
        change: percent for throughput and latency, percentage points for ``success``;
            ``None`` when it cannot be computed.
        limit: the tolerance it broke (percent or points).
        message: one line naming all of the above.
    """

    scope: str
    figure: str
    baseline: float
    measured: float | None
    change: float | None
    limit: float
    message: str


@final
@attrs.frozen
class BaselineCheck:
    """This run compared with a saved baseline (``--baseline FILE``).

    Attributes:
        source: the file it was read from.
        baseline: what the file holds.
        tolerances: the limits applied.
        comparison: this run (``measured``) against the baseline run (``baseline``), rows as
            :func:`compare_runs` makes them.
        regressions: the figures that moved past their tolerance (empty: no regression).
        warnings: differences that make the comparison less meaningful (machine, durations,
            URL, method, connections), one line each.
        scaled: whether the baseline's throughput and latencies were scaled by how fast
            the direct (``--compare``) run was now against the baseline's own direct run
            (``--baseline-ratios``); ``comparison`` then holds the scaled baseline.
        latency_scale: the factor the baseline's latencies were multiplied by (this direct
            run's median latency over the baseline's), ``None`` if not scaled or unknown.
        throughput_scale: the same for throughput (ratio of the direct runs' throughput).
    """

    source: str
    baseline: Baseline
    tolerances: Tolerances
    comparison: tuple[ComparisonRow, ...]
    regressions: tuple[Regression, ...]
    warnings: tuple[str, ...]
    scaled: bool = False
    latency_scale: float | None = None
    throughput_scale: float | None = None


@final
@attrs.frozen
class LoadReport:
    """The result of ``tunnel2 loadtest``: the run, the optional ``--compare`` run, the optional
    baseline check, and the verdict."""

    run: RunReport
    compare: RunReport | None
    comparison: tuple[ComparisonRow, ...]
    thresholds: Thresholds
    breaches: tuple[Breach, ...]
    baseline: BaselineCheck | None = None

    @property
    def passed(self) -> bool:
        """Whether every threshold was met and nothing regressed against the baseline."""
        return not self.breaches and not (self.baseline and self.baseline.regressions)


def check_thresholds(summary: Summary, thresholds: Thresholds) -> tuple[Breach, ...]:
    """Return the thresholds ``summary`` breaches (empty if it passes).

    A run with no answers at all breaches both latency thresholds.
    """
    breaches: list[Breach] = []
    latency = summary.latency
    if thresholds.max_p99_ms is not None:
        p99 = latency.p99_ms if latency else None
        if p99 is None or p99 > thresholds.max_p99_ms:
            breaches.append(
                Breach(
                    "max-p99-ms",
                    p99,
                    thresholds.max_p99_ms,
                    f"p99 latency {_ms(p99)} exceeds --max-p99-ms {thresholds.max_p99_ms:g}",
                )
            )
    if thresholds.min_success is not None and summary.success_rate < thresholds.min_success:
        breaches.append(
            Breach(
                "min-success",
                summary.success_rate,
                thresholds.min_success,
                f"success rate {summary.success_rate:.2%} is below --min-success "
                f"{thresholds.min_success * 100:g} %",
            )
        )
    if thresholds.max_mean_ms is not None:
        mean = latency.mean_ms if latency else None
        if mean is None or mean > thresholds.max_mean_ms:
            breaches.append(
                Breach(
                    "max-mean-ms",
                    mean,
                    thresholds.max_mean_ms,
                    f"mean latency {_ms(mean)} exceeds --max-mean-ms {thresholds.max_mean_ms:g}",
                )
            )
    return tuple(breaches)


def _row(scope: str, metric: str, measured: float | None, baseline: float | None) -> ComparisonRow:
    if measured is None or baseline is None:
        return ComparisonRow(scope, metric, measured, baseline, None, None)
    ratio = measured / baseline if baseline else None
    return ComparisonRow(scope, metric, measured, baseline, measured - baseline, ratio)


def _compare_summaries(scope: str, measured: Summary, baseline: Summary) -> list[ComparisonRow]:
    ml, bl = measured.latency, baseline.latency
    return [
        _row(scope, "rps", measured.throughput_rps, baseline.throughput_rps),
        _row(scope, "mean_ms", ml and ml.mean_ms, bl and bl.mean_ms),
        _row(scope, "p50_ms", ml and ml.p50_ms, bl and bl.p50_ms),
        _row(scope, "p99_ms", ml and ml.p99_ms, bl and bl.p99_ms),
        _row(scope, "success_rate", measured.success_rate, baseline.success_rate),
    ]


def compare_runs(measured: RunReport, baseline: RunReport) -> tuple[ComparisonRow, ...]:
    """Compare two runs of the same profile: overall rows first, then one block per stage."""
    rows = _compare_summaries("overall", measured.overall, baseline.overall)
    if len(measured.stages) > 1:
        for m, b in zip(measured.stages, baseline.stages, strict=False):
            rows += _compare_summaries(f"{m.label} ({m.target_rps:g} rps)", m, b)
    return tuple(rows)


def build_report(run: RunReport, compare: RunReport | None, thresholds: Thresholds) -> LoadReport:
    """Put a run, its optional baseline and the threshold verdict together."""
    return LoadReport(
        run=run,
        compare=compare,
        comparison=compare_runs(run, compare) if compare is not None else (),
        thresholds=thresholds,
        breaches=check_thresholds(run.overall, thresholds),
    )


# --- JSON ---------------------------------------------------------------------------------


def to_json(report: LoadReport) -> dict[str, Any]:
    """Return the report as JSON-ready data (``{"schema": SCHEMA, "passed": ..., ...}``)."""
    data = attrs.asdict(report)
    return {"schema": SCHEMA, "passed": report.passed, **data}


def write_json(report: LoadReport, path: str | Path) -> None:
    """Write :func:`to_json` to ``path`` (UTF-8, indented)."""
    Path(path).write_text(json.dumps(to_json(report), indent=2) + "\n", encoding="utf-8")


# --- text ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return lines


_STAGE_HEADERS: Final = (
    "stage", "target", "actual", "thrpt", "peak", "sent", "ok", "success",
    "timeouts", "mean", "p50", "p75", "p95", "p99", "max",
)  # fmt: skip


def _summary_row(s: Summary) -> list[str]:
    lat = s.latency
    return [
        s.label,
        f"{s.target_rps:.1f}",
        f"{s.actual_rps:.1f}",
        f"{s.throughput_rps:.1f}",
        f"{s.peak_rps:.0f}",
        str(s.sent),
        str(s.succeeded),
        f"{s.success_rate:.2%}",
        str(s.timeouts),
        _num(lat and lat.mean_ms),
        _num(lat and lat.p50_ms),
        _num(lat and lat.p75_ms),
        _num(lat and lat.p95_ms),
        _num(lat and lat.p99_ms),
        _num(lat and lat.max_ms),
    ]


def _failures_line(s: Summary) -> str:
    parts = [f"{kind} {n}" for kind, n in s.failures.items() if n]
    return ", ".join(parts) if parts else "none"


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _render_run(run: RunReport, title: str) -> list[str]:
    lines = [
        f"{title}: {run.method} {run.url}",
        f"  profile {run.profile}, {len(run.stages)} stage(s), {run.overall.sent} requests, "
        f"{run.connections} connections, timeout {run.timeout_s:g} s, "
        f"{run.duration_s:.1f} s",
        "  rates in req/s (target, actual send rate, throughput of answers, peak 1-s "
        "throughput); latencies in ms from the scheduled send time",
        "",
    ]
    rows = [_summary_row(s) for s in run.stages]
    rows.append(_summary_row(run.overall))
    lines += ["  " + line for line in _table(_STAGE_HEADERS, rows)]
    lines.append("")
    for s in (*run.stages, run.overall):
        if s.failed:
            lines.append(f"  failures {s.label}: {_failures_line(s)}")
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(run.overall.statuses.items()))
    lines.append(f"  statuses: {statuses or 'none'}")
    g = run.generator
    lines.append(
        f"  generator: CPU {g.cpu_percent:.1f} % of one core ({g.cpu_seconds:.2f} s CPU over "
        f"{g.wall_seconds:.1f} s, {g.cpu_us_per_request:.0f} us/request); "
        f"start lag p50 {g.lag_p50_ms:.2f} ms, p99 {g.lag_p99_ms:.2f} ms, "
        f"max {g.lag_max_ms:.2f} ms"
    )
    for p in run.processes:
        lines.append(
            f"  pid {p.pid} ({p.name}): CPU mean {p.cpu_mean_percent:.1f} % max "
            f"{p.cpu_max_percent:.1f} %, RSS max {_mib(p.rss_max_bytes)}, "
            f"threads max {p.threads_max}"
        )
    return lines


def _fmt_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "success_rate":
        return f"{value:.2%}"
    return f"{value:.1f}" if metric == "rps" else f"{value:.2f}"


def _comparison_cells(r: ComparisonRow) -> list[str]:
    return [
        r.scope,
        r.metric,
        _fmt_metric(r.metric, r.measured),
        _fmt_metric(r.metric, r.baseline),
        "-" if r.difference is None else f"{r.difference:+.2f}",
        "-" if r.ratio is None else f"{r.ratio:.2f}x",
    ]


def _comparison_headers(other: str) -> tuple[str, ...]:
    return ("scope", "metric", "URL", other, "difference", "ratio")


def _render_comparison(title: str, other: str, rows: Sequence[ComparisonRow]) -> list[str]:
    table = [_comparison_cells(r) for r in rows]
    return [title, *("  " + x for x in _table(_comparison_headers(other), table))]


def _machine_text(m: MachineInfo) -> str:
    return f"{m.hostname} ({m.system} {m.arch}, {m.cpu_count} x {m.cpu_model}, {m.python})"


def _saved_text(check: BaselineCheck) -> str:
    b = check.baseline
    return (
        f"{check.source}, saved {b.created_at} by tunnel2 {b.tunnel2_version} "
        f"on {_machine_text(b.machine)}"
    )


def _tolerances_text(t: Tolerances) -> str:
    parts = [
        f"{name} {sign}{limit:g} {unit}"
        for name, sign, limit, unit in (
            ("throughput", "-", t.throughput_pct, "%"),
            ("mean", "+", t.mean_pct, "%"),
            ("p50", "+", t.p50_pct, "%"),
            ("p99", "+", t.p99_pct, "%"),
            ("success", "-", t.success_points, "points"),
        )
        if limit is not None
    ]
    parts.append(f"latency floor {t.min_latency_delta_ms:g} ms")
    return ", ".join(parts)


def _baseline_column(check: BaselineCheck) -> str:
    return "baseline scaled by --compare" if check.scaled else "baseline"


def _scale_text(check: BaselineCheck) -> str:
    lat, thr = (
        "unknown" if f is None else f"x{f:.2f}"
        for f in (check.latency_scale, check.throughput_scale)
    )
    return (
        f"scaled to this machine's speed by the --compare runs: latencies {lat} (the direct "
        f"median latency now / then), throughput {thr}"
    )


def _render_baseline(check: BaselineCheck) -> list[str]:
    lines = _render_run(check.baseline.run, "baseline")
    lines.insert(1, f"  {_saved_text(check)}")
    if check.scaled:
        lines.insert(2, f"  {_scale_text(check)}")
    lines += [
        "",
        *_render_comparison(
            f"against the baseline (URL now vs {_baseline_column(check)}; ms and req/s):",
            _baseline_column(check),
            check.comparison,
        ),
    ]
    lines += [f"WARNING: {w}" for w in check.warnings]
    return lines


def render_text(report: LoadReport) -> str:
    """Return the human-readable report printed at the end of ``tunnel2 loadtest``."""
    lines = _render_run(report.run, "loadtest")
    if report.compare is not None:
        lines += ["", *_render_run(report.compare, "compare")]
        lines += [
            "",
            *_render_comparison(
                "overhead (URL vs --compare URL; ms and req/s):", "--compare", report.comparison
            ),
        ]
    check = report.baseline
    if check is not None:
        lines += ["", *_render_baseline(check)]
    lines.append("")
    t = report.thresholds
    limits = []
    if t.max_p99_ms is not None:
        limits.append(f"p99 <= {t.max_p99_ms:g} ms")
    if t.min_success is not None:
        limits.append(f"success >= {t.min_success * 100:g} %")
    if t.max_mean_ms is not None:
        limits.append(f"mean <= {t.max_mean_ms:g} ms")
    if check is not None:
        limits.append(f"no regression ({_tolerances_text(check.tolerances)})")
    if report.passed:
        lines.append(f"PASS: {', '.join(limits) or 'no thresholds'}")
    else:
        lines += [f"FAIL: {b.message}" for b in report.breaches]
        lines += [f"REGRESSION: {r.message}" for r in (check.regressions if check else ())]
    return "\n".join(lines) + "\n"


# --- HTML ---------------------------------------------------------------------------------

_W: Final = 960
_H: Final = 380
_PAD_L: Final = 60
_PAD_R: Final = 70
_PAD_T: Final = 30
_PAD_B: Final = 60


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if value <= m * exp:
            return float(m * exp)
    return float(10 * exp)  # pragma: no cover - the loop always returns


def _tick_step(value: float) -> float:
    """The smallest of 1, 2, 5 x 10**k that is at least ``value``."""
    exp = 10 ** math.floor(math.log10(max(value, 1e-9)))
    return float(next(m * exp for m in (1, 2, 5, 10) if value <= m * exp))


def _polyline(points: Sequence[tuple[float, float]], color: str, *, dash: str = "") -> str:
    if not points:
        return ""
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{extra} points="{coords}"/>'


def _svg_chart(run: RunReport) -> str:
    """Throughput (left axis) and p50/p99 latency (right axis) per second, stages marked."""
    timeline = run.timeline
    span = max(1.0, sum(s.duration_s for s in run.stages), len(timeline))
    rps_max = _nice_max(
        max(
            [p.completed for p in timeline]
            + [p.sent for p in timeline]
            + [s.target_rps for s in run.stages]
            + [1]
        )
    )
    lat_values = [p.p99_ms for p in timeline if p.p99_ms is not None]
    lat_max = _nice_max(max(lat_values, default=1.0))
    plot_w = _W - _PAD_L - _PAD_R
    plot_h = _H - _PAD_T - _PAD_B

    def x(t: float) -> float:
        return _PAD_L + t / span * plot_w

    def y_rps(v: float) -> float:
        return _PAD_T + plot_h - v / rps_max * plot_h

    def y_lat(v: float) -> float:
        return _PAD_T + plot_h - min(v, lat_max) / lat_max * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" '
        f'height="{_H}" font-family="sans-serif" font-size="11">',
        f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    for i in range(5):
        frac = i / 4
        yy = _PAD_T + plot_h - frac * plot_h
        parts.append(
            f'<line x1="{_PAD_L}" y1="{yy:.1f}" x2="{_PAD_L + plot_w}" y2="{yy:.1f}" '
            'stroke="#e5e5e5"/>'
        )
        parts.append(
            f'<text x="{_PAD_L - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#1f77b4">'
            f"{rps_max * frac:g}</text>"
        )
        parts.append(
            f'<text x="{_PAD_L + plot_w + 6}" y="{yy + 4:.1f}" fill="#d62728">'
            f"{lat_max * frac:g}</text>"
        )
    step = _tick_step(span / 10)
    t = 0.0
    while t <= span + 1e-9:
        parts.append(
            f'<text x="{x(t):.1f}" y="{_PAD_T + plot_h + 15}" text-anchor="middle">{t:g}</text>'
        )
        t += step
    parts.append(
        f'<text x="{_PAD_L + plot_w / 2}" y="{_PAD_T + plot_h + 30}" text-anchor="middle">'
        "seconds</text>"
        f'<text x="14" y="{_PAD_T + plot_h / 2}" text-anchor="middle" fill="#1f77b4" '
        f'transform="rotate(-90 14 {_PAD_T + plot_h / 2})">req/s</text>'
        f'<text x="{_W - 14}" y="{_PAD_T + plot_h / 2}" text-anchor="middle" fill="#d62728" '
        f'transform="rotate(90 {_W - 14} {_PAD_T + plot_h / 2})">latency ms</text>'
    )
    # Stage boundaries and the target rate as a step line.
    start = 0.0
    target: list[tuple[float, float]] = []
    for i, stage in enumerate(run.stages):
        end = start + stage.duration_s
        target += [(x(start), y_rps(stage.target_rps)), (x(end), y_rps(stage.target_rps))]
        if i:
            parts.append(
                f'<line x1="{x(start):.1f}" y1="{_PAD_T}" x2="{x(start):.1f}" '
                f'y2="{_PAD_T + plot_h}" stroke="#888" stroke-dasharray="4 3"/>'
            )
        parts.append(
            f'<text x="{x(start) + 3:.1f}" y="{_PAD_T - 6}" fill="#555">'
            f"{html.escape(stage.label)}: {stage.target_rps:g}/s</text>"
        )
        start = end
    parts.append(_polyline(target, "#999", dash="6 4"))
    mid = [(p.second + 0.5, p) for p in timeline]
    parts.append(_polyline([(x(t), y_rps(p.completed)) for t, p in mid], "#1f77b4"))
    parts.append(
        _polyline([(x(t), y_lat(p.p50_ms)) for t, p in mid if p.p50_ms is not None], "#2ca02c")
    )
    parts.append(
        _polyline([(x(t), y_lat(p.p99_ms)) for t, p in mid if p.p99_ms is not None], "#d62728")
    )
    legend = [
        ("#999", "target req/s"),
        ("#1f77b4", "answers/s"),
        ("#2ca02c", "p50 ms"),
        ("#d62728", "p99 ms"),
    ]
    lx = _PAD_L + 10
    for color, label in legend:
        ly = _H - 10
        parts.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{color}" '
            'stroke-width="2"/>'
        )
        parts.append(f'<text x="{lx + 22}" y="{ly + 4}">{label}</text>')
        lx += 110
    parts.append("</svg>")
    return "".join(p for p in parts if p)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_run(run: RunReport, title: str) -> str:
    rows = [_summary_row(s) for s in (*run.stages, run.overall)]
    failures = [[s.label, _failures_line(s)] for s in (*run.stages, run.overall)]
    g = run.generator
    procs = [
        [
            str(p.pid),
            p.name,
            f"{p.cpu_mean_percent:.1f}",
            f"{p.cpu_max_percent:.1f}",
            _mib(p.rss_max_bytes),
            str(p.threads_max),
        ]
        for p in run.processes
    ]
    parts = [
        f"<h2>{html.escape(title)}: {html.escape(run.method)} {html.escape(run.url)}</h2>",
        f"<p>profile <b>{html.escape(run.profile)}</b>, {run.overall.sent} requests, "
        f"{run.connections} connections, timeout {run.timeout_s:g} s, "
        f"{run.duration_s:.1f} s. Latencies in ms from the scheduled send time.</p>",
        _svg_chart(run),
        _html_table(_STAGE_HEADERS, rows),
        "<h3>Failures</h3>",
        _html_table(("scope", "failures by type"), failures),
        f"<p>Generator CPU: {g.cpu_percent:.1f} % of one core "
        f"({g.cpu_us_per_request:.0f} us/request); start lag after the scheduled time "
        f"p50 {g.lag_p50_ms:.2f} ms, p99 {g.lag_p99_ms:.2f} ms, max {g.lag_max_ms:.2f} ms.</p>",
    ]
    if procs:
        parts += [
            "<h3>Processes under test</h3>",
            _html_table(
                ("pid", "name", "CPU mean %", "CPU max %", "RSS max", "threads max"), procs
            ),
        ]
    return "\n".join(parts)


_CSS: Final = (
    "body{font-family:sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}"
    ".pass{color:#2a7d2a}.fail{color:#c0392b}"
)


def _html_baseline(check: BaselineCheck) -> str:
    rows = [_comparison_cells(r) for r in check.comparison]
    parts = [
        _html_run(check.baseline.run, "baseline"),
        f"<p>Baseline {html.escape(_saved_text(check))}.</p>",
        f"<p>{html.escape(_scale_text(check))}.</p>" if check.scaled else "",
        "<h2>Against the baseline</h2>",
        f"<p>Tolerances: {html.escape(_tolerances_text(check.tolerances))}.</p>",
        _html_table(_comparison_headers(_baseline_column(check)), rows),
        *(f'<p class="fail"><b>WARNING</b>: {html.escape(w)}</p>' for w in check.warnings),
    ]
    return "\n".join(parts)


def render_html(report: LoadReport) -> str:
    """Return a self-contained HTML page (inline CSS and SVG, nothing fetched)."""
    check = report.baseline
    verdict = (
        '<p class="pass"><b>PASS</b>: every threshold met'
        + (", no regression against the baseline" if check else "")
        + ".</p>"
        if report.passed
        else "".join(
            [f'<p class="fail"><b>FAIL</b>: {html.escape(b.message)}</p>' for b in report.breaches]
            + [
                f'<p class="fail"><b>REGRESSION</b>: {html.escape(r.message)}</p>'
                for r in (check.regressions if check else ())
            ]
        )
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>tunnel2 loadtest report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>tunnel2 loadtest report</h1>",
        verdict,
        _html_run(report.run, "URL"),
    ]
    if report.compare is not None:
        parts.append(_html_run(report.compare, "--compare"))
        rows = [_comparison_cells(r) for r in report.comparison]
        parts += ["<h2>Overhead</h2>", _html_table(_comparison_headers("--compare"), rows)]
    if check is not None:
        parts.append(_html_baseline(check))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(report: LoadReport, path: str | Path) -> None:
    """Write :func:`render_html` to ``path``."""
    Path(path).write_text(render_html(report), encoding="utf-8")
