"""Load-test baselines: save a run, compare later runs with it, name what regressed.

Layer: load-test kit, beside :mod:`tunnel2.loadtest.report` (whose records it fills in). Pure
except :func:`save_baseline`, :func:`load_baseline` and :func:`machine_info`, which read and
write one file or read ``/proc/cpuinfo``; no trio.

A baseline file is versioned JSON::

    {"tunnel2_baseline": 1, "created_at": "2026-12-01T11:50:00Z", "tunnel2_version": "0.1.0",
     "machine": {...}, "run": {...every figure of the run...}, "compare": null}

``run`` and ``compare`` are :class:`~tunnel2.loadtest.report.RunReport` records exactly as
``--json`` writes them, so a file can be read by hand or by ``jq``. Reading checks every field
and its type: anything else is a :class:`BaselineError` naming the first bad field.

The comparison reuses :func:`~tunnel2.loadtest.report.compare_runs` (the rows of
``--compare``); a figure regresses when it moves the wrong way past its tolerance (see
:class:`~tunnel2.loadtest.report.Tolerances`). With ``--baseline-ratios`` the baseline is
first scaled to this machine's speed by the two ``--compare`` runs (:func:`speed_factors`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from tunnel2 import __version__
from tunnel2.loadtest.profiles import Stage
from tunnel2.loadtest.report import (
    Baseline,
    BaselineCheck,
    ComparisonRow,
    LoadReport,
    MachineInfo,
    Regression,
    RunReport,
    Summary,
    Tolerances,
    _fmt_metric,  # the comparison table's number format: a regression line reads the same
    compare_runs,
)

__all__ = [
    "BASELINE_KEY",
    "BASELINE_VERSION",
    "FIGURES",
    "BaselineError",
    "check_baseline",
    "check_comparable",
    "load_baseline",
    "machine_info",
    "make_baseline",
    "parse_tolerances",
    "save_baseline",
    "speed_factors",
    "with_baseline",
]

BASELINE_KEY: Final = "tunnel2_baseline"
BASELINE_VERSION: Final = 1

FIGURES: Final[dict[str, str]] = {
    "throughput": "rps",
    "mean": "mean_ms",
    "p50": "p50_ms",
    "p99": "p99_ms",
    "success": "success_rate",
}
"""The figures a baseline checks, by the name ``--max-regression`` uses, and the
:class:`~tunnel2.loadtest.report.ComparisonRow` metric each reads."""

_TOLERANCE_FIELD: Final = {
    "throughput": "throughput_pct",
    "mean": "mean_pct",
    "p50": "p50_pct",
    "p99": "p99_pct",
    "success": "success_points",
}
# A bare "--max-regression PCT" sets these; p50 and success keep their own defaults.
_DEFAULT_FIGURES: Final = ("throughput", "mean", "p99")
# A change exactly at its tolerance passes; this absorbs float rounding (70 / 100 - 1).
_EPSILON: Final = 1e-9


class BaselineError(ValueError):
    """A baseline that cannot be used: missing, malformed, of another version, or measured
    with other stages. The message is one line that says which and why."""


# --- the file -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def machine_info() -> MachineInfo:
    """Describe this machine: host name, OS and kernel, CPU model and count, Python."""
    return MachineInfo(
        hostname=platform.node() or "unknown",
        system=f"{platform.system()} {platform.release()}".strip() or "unknown",
        arch=platform.machine() or "unknown",
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 0,
        python=f"{platform.python_implementation()} {platform.python_version()}",
    )


def make_baseline(
    report: LoadReport,
    *,
    machine: MachineInfo | None = None,
    now: datetime.datetime | None = None,
) -> Baseline:
    """Turn a finished load test into a :class:`~tunnel2.loadtest.report.Baseline`.

    Args:
        report: the load test; its run (and ``--compare`` run, if any) are kept whole.
        machine: where it ran; :func:`machine_info` if ``None``.
        now: the time to record; the current time if ``None``.
    """
    when = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    return Baseline(
        created_at=when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        tunnel2_version=__version__,
        machine=machine or machine_info(),
        run=report.run,
        compare=report.compare,
    )


def save_baseline(baseline: Baseline, path: str | Path) -> None:
    """Write ``baseline`` to ``path`` as versioned JSON (UTF-8, indented, keys in order)."""
    data = {BASELINE_KEY: BASELINE_VERSION, **attrs.asdict(baseline)}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _structure(tp: Any, value: object, where: str) -> Any:
    """Build a value of type ``tp`` (an attrs record, tuple, dict, union or scalar) from JSON."""
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise BaselineError(f"{where}: expected an object")
        hints = typing.get_type_hints(tp)
        kwargs: dict[str, object] = {}
        for field in attrs.fields(tp):
            if field.name not in value:
                raise BaselineError(f"{where}.{field.name}: missing")
            kwargs[field.name] = _structure(
                hints[field.name], value[field.name], f"{where}.{field.name}"
            )
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:
            raise BaselineError(f"{where}: {exc}") from None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _structure(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise BaselineError(f"{where}: expected a list")
        return tuple(_structure(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise BaselineError(f"{where}: expected an object")
        return {k: _structure(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise BaselineError(f"{where}: {value!r} is not a finite number")
        return float(value)
    if tp in (int, str) and type(value) is tp:
        return value
    raise BaselineError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r:.40}")


def load_baseline(path: str | Path) -> Baseline:
    """Read a baseline file written by :func:`save_baseline`.

    Raises:
        BaselineError: the file cannot be read, is not JSON, is not a baseline, has another
            version, or a field is missing or of the wrong type; the message names the file
            and the first problem.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise BaselineError(f"cannot read baseline {path}: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or BASELINE_KEY not in data:
        raise BaselineError(
            f"{path} is not a tunnel2 baseline (no {BASELINE_KEY!r} key; write one with "
            "--save-baseline)"
        )
    version = data[BASELINE_KEY]
    if version != BASELINE_VERSION:
        raise BaselineError(
            f"baseline {path} has version {version!r}; this tunnel2 reads version "
            f"{BASELINE_VERSION} (re-save it with --save-baseline)"
        )
    try:
        baseline: Baseline = _structure(Baseline, data, "baseline")
    except BaselineError as exc:
        raise BaselineError(f"baseline {path} is malformed: {exc}") from None
    return baseline


# --- tolerances ---------------------------------------------------------------------------


def _limit(text: str, item: str) -> float | None:
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"tolerance {item!r}: {text!r} is not a number or 'off'") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"tolerance {item!r}: {text!r} must be 0 or more")
    return value


def parse_tolerances(specs: Sequence[str], *, min_latency_delta_ms: float = 1.0) -> Tolerances:
    """Build :class:`~tunnel2.loadtest.report.Tolerances` from ``--max-regression`` values.

    Args:
        specs: items such as ``"20"`` (throughput, mean and p99 may move 20 %) or
            ``"p99=50"``, ``"p50=30"``, ``"success=0.5"`` (points), ``"mean=off"``; each item
            may hold several, comma-separated. Later items win; a ``FIGURE=`` item wins over a
            bare percentage wherever it appears.
        min_latency_delta_ms: the absolute floor for latency regressions.

    Raises:
        ValueError: an unknown figure or a bad number; the message names the item.
    """
    bare: dict[str, float | None] = {}
    named: dict[str, float | None] = {}
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            figure, equals, number = item.partition("=")
            if not equals:
                value = _limit(item, item)
                bare.update(dict.fromkeys(_DEFAULT_FIGURES, value))
                continue
            figure = figure.strip().lower()
            if figure not in _TOLERANCE_FIELD:
                known = ", ".join(_TOLERANCE_FIELD)
                raise ValueError(f"tolerance {item!r}: unknown figure {figure!r}; known: {known}")
            named[figure] = _limit(number.strip(), item)
    changes = {_TOLERANCE_FIELD[f]: v for f, v in (bare | named).items()}
    if not (math.isfinite(min_latency_delta_ms) and min_latency_delta_ms >= 0):
        raise ValueError(f"--min-latency-delta-ms {min_latency_delta_ms!r} must be 0 or more")
    return attrs.evolve(Tolerances(), min_latency_delta_ms=min_latency_delta_ms, **changes)


# --- the comparison -----------------------------------------------------------------------


def _plan(stages: Sequence[Stage]) -> str:
    return ",".join(str(s) for s in stages)


def _stages_of(run: RunReport) -> tuple[Stage, ...]:
    return tuple(Stage(s.target_rps, s.duration_s) for s in run.stages)


def check_comparable(
    baseline: Baseline, stages: Sequence[Stage], *, ratios: bool = False, source: str = ""
) -> None:
    """Check that a run of ``stages`` can be compared with ``baseline``: same count and rates
    (durations may differ: :func:`check_baseline` warns), and with ``ratios`` that the
    baseline holds a ``--compare`` run to take ratios from.

    Raises:
        BaselineError: the count or a rate differs (the message gives both plans and the
            ``--stages`` that would match), or ``ratios`` and the baseline has no direct run.
    """
    saved = _stages_of(baseline.run)
    same = len(saved) == len(stages) and all(
        math.isclose(a.rate, b.rate, rel_tol=1e-9) for a, b in zip(saved, stages, strict=True)
    )
    if not same:
        raise BaselineError(
            f"stages differ from baseline {source or 'file'}: it has {len(saved)} "
            f"({_plan(saved)}), this run {len(stages)} ({_plan(stages)}); run with "
            f"--stages {_plan(saved)}, or save a new baseline with --save-baseline"
        )
    if ratios and baseline.compare is None:
        raise BaselineError(
            f"baseline {source or 'file'} has no --compare run to take ratios from; save it "
            "with --compare URL2 --save-baseline"
        )


_LATENCY_FIELDS: Final = ("mean_ms", "p50_ms", "p75_ms", "p95_ms", "p99_ms", "max_ms")


def _factor(now: float | None, then: float | None) -> float | None:
    return now / then if now is not None and then else None


def speed_factors(then: RunReport, now: RunReport) -> tuple[float | None, float | None]:
    """How much slower this machine is now than when the baseline was saved, as seen by the
    direct (``--compare``) runs: ``(latency, throughput)``.

    The latency factor is the ratio of the direct runs' overall *median* latency (a
    percentile that a few stalls of a shared machine do not move, unlike the mean or p99);
    the throughput factor the ratio of their overall throughput. ``None`` where the direct
    baseline has no such figure.
    """
    nl, tl = now.overall.latency, then.overall.latency
    return (
        _factor(nl and nl.p50_ms, tl and tl.p50_ms),
        _factor(now.overall.throughput_rps, then.overall.throughput_rps),
    )


def _scaled_summary(saved: Summary, latency: float | None, throughput: float | None) -> Summary:
    sl = saved.latency
    return attrs.evolve(
        saved,
        throughput_rps=saved.throughput_rps * throughput if throughput is not None else 0.0,
        latency=attrs.evolve(sl, **{n: getattr(sl, n) * latency for n in _LATENCY_FIELDS})
        if sl is not None and latency is not None
        else None,
    )


def _scaled(saved: RunReport, latency: float | None, throughput: float | None) -> RunReport:
    """The baseline run as it would measure on this machine today: every throughput and
    latency figure times its factor (:func:`speed_factors`); nothing to compare (0 req/s, no
    latency) where a factor is unknown."""
    return attrs.evolve(
        saved,
        stages=tuple(_scaled_summary(s, latency, throughput) for s in saved.stages),
        overall=_scaled_summary(saved.overall, latency, throughput),
    )


def _warnings(run: RunReport, baseline: Baseline, machine: MachineInfo) -> list[str]:
    saved, now = baseline.run, run
    warnings: list[str] = []
    mine = attrs.asdict(machine)
    theirs = attrs.asdict(baseline.machine)
    differ = [
        f"{key} {theirs[key]!r} -> {mine[key]!r}"
        for key in ("system", "arch", "cpu_model", "cpu_count", "python")
        if mine[key] != theirs[key]
    ]
    if differ:
        warnings.append(
            f"the baseline was measured on another machine ({baseline.machine.hostname}): "
            + "; ".join(differ)
        )
    durations = [
        f"{b.label} {b.duration_s:g} s -> {n.duration_s:g} s"
        for b, n in zip(saved.stages, now.stages, strict=False)
        if not math.isclose(b.duration_s, n.duration_s, rel_tol=1e-9)
    ]
    if durations:
        warnings.append("stage durations differ from the baseline: " + ", ".join(durations))
    for what, before, after in (
        ("URL", saved.url, now.url),
        ("method", saved.method, now.method),
        ("connections", saved.connections, now.connections),
    ):
        if before != after:
            warnings.append(f"{what} differs from the baseline: {before} -> {after}")
    return warnings


def _fmt(figure: str, value: float | None) -> str:
    if value is None:
        return "- (no answers)"
    unit = {"throughput": " req/s", "success": ""}.get(figure, " ms")
    return _fmt_metric(FIGURES[figure], value) + unit


def _regression(row: ComparisonRow, figure: str, t: Tolerances) -> Regression | None:
    limit: float | None = getattr(t, _TOLERANCE_FIELD[figure])
    base, now = row.baseline, row.measured
    if limit is None or base is None:
        return None
    change: float | None
    if figure == "success":
        assert now is not None  # a success rate is always there
        change = (now - base) * 100
        if change >= -limit - _EPSILON:
            return None
        unit, bound = "points", f"-{limit:g} points"
    elif figure == "throughput":
        if base <= 0 or now is None:
            return None
        change = (now / base - 1) * 100
        if change >= -limit - _EPSILON:
            return None
        unit, bound = "%", f"-{limit:g} %"
    else:
        if now is not None:
            change = (now / base - 1) * 100 if base > 0 else math.inf
            if change <= limit + _EPSILON or now - base <= t.min_latency_delta_ms + _EPSILON:
                return None
        else:
            change = None
        unit, bound = "%", f"+{limit:g} % and +{t.min_latency_delta_ms:g} ms"
    moved = "no answers" if change is None else f"{change:+.1f} {unit}"
    message = (
        f"{row.scope} {figure}: baseline {_fmt(figure, base)}, now {_fmt(figure, now)}, "
        f"{moved} (tolerance {bound})"
    )
    return Regression(row.scope, figure, base, now, change, limit, message)


def check_baseline(
    run: RunReport,
    baseline: Baseline,
    tolerances: Tolerances,
    *,
    direct: RunReport | None = None,
    source: str = "",
    machine: MachineInfo | None = None,
) -> BaselineCheck:
    """Compare ``run`` with ``baseline``, overall and per stage, and name what regressed.

    Args:
        run: the new run (against URL).
        baseline: the saved one.
        tolerances: how far each figure may move the wrong way.
        direct: this invocation's ``--compare`` run. If given, the baseline's throughput and
            latencies are first scaled by how much slower the machine is now than then, as
            the direct runs tell (:func:`speed_factors`), so that a machine twice as slow
            today cancels out. Success rates are compared as they are.
        source: where the baseline came from, for messages (its path).
        machine: this machine; :func:`machine_info` if ``None``. A baseline from a machine
            that differs in OS, architecture, CPU or Python gets a warning, not a failure.

    Raises:
        BaselineError: the stages differ in count or rate, or ``direct`` is given and the
            baseline has no ``--compare`` run (:func:`check_comparable`).
    """
    check_comparable(baseline, _stages_of(run), ratios=direct is not None, source=source)
    reference = baseline.run
    factors: tuple[float | None, float | None] = (None, None)
    if direct is not None and baseline.compare is not None:
        factors = speed_factors(baseline.compare, direct)
        reference = _scaled(baseline.run, *factors)
    rows = compare_runs(run, reference)
    by_metric = {metric: figure for figure, metric in FIGURES.items()}
    regressions = [
        r for row in rows if (r := _regression(row, by_metric[row.metric], tolerances)) is not None
    ]
    return BaselineCheck(
        source=source,
        baseline=baseline,
        tolerances=tolerances,
        comparison=rows,
        regressions=tuple(regressions),
        warnings=tuple(_warnings(run, baseline, machine or machine_info())),
        scaled=direct is not None,
        latency_scale=factors[0],
        throughput_scale=factors[1],
    )


def with_baseline(
    report: LoadReport,
    baseline: Baseline,
    tolerances: Tolerances,
    *,
    ratios: bool = False,
    source: str = "",
    machine: MachineInfo | None = None,
) -> LoadReport:
    """Return ``report`` with its run checked against ``baseline`` (:func:`check_baseline`);
    ``passed`` is then false if a figure regressed.

    Args:
        report: the load test.
        baseline: the saved one.
        tolerances: how far each figure may move the wrong way.
        ratios: compare ratios to the direct run (``report.compare``, the ``--compare`` run)
            rather than absolute figures (``--baseline-ratios``).
        source: where the baseline came from, for messages (its path).
        machine: this machine; :func:`machine_info` if ``None``.

    Raises:
        BaselineError: the stages differ in count or rate; ``ratios`` and the report or the
            baseline has no ``--compare`` run.
    """
    if ratios and report.compare is None:
        raise BaselineError("comparing ratios with a baseline needs a --compare run")
    direct = report.compare if ratios else None
    check = check_baseline(
        report.run, baseline, tolerances, direct=direct, source=source, machine=machine
    )
    return attrs.evolve(report, baseline=check)
