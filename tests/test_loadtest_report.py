"""Tests for the pure parts of the load-test kit: profiles, statistics, /proc readings, report.

Covers :mod:`tunnel2.loadtest.profiles`, :mod:`tunnel2.loadtest.stats`,
:mod:`tunnel2.loadtest.procstats` and :mod:`tunnel2.loadtest.report`. Sync tests, no clock:
the recorder is fed made-up times.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tunnel2.loadtest import procstats
from tunnel2.loadtest.profiles import PROFILES, Stage, parse_stages, profile_stages, total_requests
from tunnel2.loadtest.report import (
    SCHEMA,
    FailureKind,
    GeneratorUsage,
    LatencySummary,
    LoadReport,
    ProcessSample,
    ProcessUsage,
    RunReport,
    Summary,
    Thresholds,
    TimelinePoint,
    build_report,
    check_thresholds,
    compare_runs,
    render_html,
    render_text,
    to_json,
    write_html,
    write_json,
)
from tunnel2.loadtest.stats import Recorder, percentile, summarize_latency

# --- profiles ---------------------------------------------------------------------------------


def test_builtin_profiles() -> None:
    assert PROFILES["smoke"] == (Stage(20, 10),)
    assert total_requests(PROFILES["smoke"]) == 200
    ramp = [(s.rate, s.duration) for s in PROFILES["ramp"]]
    assert ramp == [(20, 30), (50, 30), (100, 30), (200, 30), (500, 30), (1000, 30)]
    assert total_requests(PROFILES["ramp"]) == 56_100
    assert PROFILES["aggressive"] == PROFILES["ramp"]
    assert profile_stages("ramp") is PROFILES["ramp"]


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile 'fast'; known: aggressive, ramp, smoke"):
        profile_stages("fast")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100x10,500x10", [(100, 10), (500, 10)]),
        (" 20 x 1 , 0.5X4 ,", [(20, 1), (0.5, 4)]),
        ("1000x0.25", [(1000, 0.25)]),
    ],
)
def test_parse_stages(text: str, expected: list[tuple[float, float]]) -> None:
    assert [(s.rate, s.duration) for s in parse_stages(text)] == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no stages"),
        (",", "no stages"),
        ("100", "is not RATExSECONDS"),
        ("ax10", "stage 'ax10'"),
        ("0x10", "rate must be a positive number"),
        ("-5x1", "rate must be a positive number"),
        ("10x0", "duration must be a positive number"),
        ("10xinf", "duration must be a positive number"),
        ("10x5x5", "stage '10x5x5'"),
    ],
)
def test_parse_stages_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_stages(text)


def test_stage_requests_and_str() -> None:
    assert Stage(20, 10).requests == 200
    assert Stage(0.1, 1).requests == 1  # every stage sends at least one
    assert str(Stage(100, 10)) == "100x10"


# --- statistics -------------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7
    assert percentile([1.0, 2.0], 50) == 1


def test_summarize_latency() -> None:
    assert summarize_latency([]) is None
    summary = summarize_latency([0.003, 0.001, 0.002, 0.010])
    assert summary is not None
    assert summary.count == 4
    figures = (summary.mean_ms, summary.p50_ms, summary.p75_ms, summary.p95_ms, summary.p99_ms)
    assert figures == pytest.approx((4.0, 2.0, 3.0, 10.0, 10.0))
    assert summary.max_ms == pytest.approx(10.0)


def feed(recorder: Recorder, stage: int, scheduled: float, latency: float, status: int) -> None:
    recorder.on_wire(stage, scheduled, scheduled)
    recorder.on_answer(stage, scheduled, scheduled + latency, status)


def test_recorder_summaries() -> None:
    t0 = 100.0
    recorder = Recorder([Stage(4, 1), Stage(2, 1)], t0)
    for k in range(4):
        feed(recorder, 0, t0 + k / 4, 0.010, 200 if k else 503)
    feed(recorder, 1, t0 + 1.0, 0.020, 302)
    recorder.on_wire(1, t0 + 1.5, t0 + 1.5)
    recorder.on_failure(1, t0 + 1.7, FailureKind.TIMEOUT, on_wire=True)
    stages, overall = recorder.summaries()
    first, second = stages
    assert (first.sent, first.succeeded, first.failed) == (4, 3, 1)
    assert first.failures["http_5xx"] == 1
    assert first.statuses == {"200": 3, "503": 1}
    assert first.actual_rps == pytest.approx(4)
    assert first.latency is not None
    assert first.latency.mean_ms == pytest.approx(10)
    assert (second.sent, second.succeeded, second.timeouts) == (2, 1, 1)
    assert second.success_rate == pytest.approx(0.5)
    assert set(second.failures) == {kind.value for kind in FailureKind}
    assert (overall.sent, overall.succeeded) == (6, 4)
    assert overall.target_rps == pytest.approx(3)
    assert overall.peak_rps == 4
    assert recorder.in_flight == 0
    assert [p.sent for p in recorder.timeline()] == [4, 2]
    assert [p.failed for p in recorder.timeline()] == [1, 1]
    assert recorder.second_figures(0)[0] == 4


def test_recorder_without_outcomes() -> None:
    recorder = Recorder([Stage(1, 1)], 0.0)
    _, overall = recorder.summaries()
    assert overall.sent == 0
    assert overall.success_rate == 1.0
    assert overall.latency is None
    assert recorder.timeline() == ()


# --- /proc ------------------------------------------------------------------------------------


def test_read_own_process() -> None:
    before = procstats.read_process(os.getpid())
    assert before is not None
    sum(i * i for i in range(200_000))  # burn a little CPU
    after = procstats.read_process(os.getpid())
    assert after is not None
    assert after.rss_bytes > 0
    assert after.threads >= 1
    assert "python" in after.name or "pytest" in after.name
    assert procstats.cpu_percent(before, after) >= 0
    assert procstats.cpu_percent(after, after) == 0
    assert procstats.own_cpu_seconds() > 0


def test_read_missing_process() -> None:
    assert procstats.read_process(2**22 + 12345) is None


# --- report -----------------------------------------------------------------------------------


def summary(label: str = "overall", **kwargs: object) -> Summary:
    values: dict[str, object] = {
        "label": label,
        "target_rps": 100.0,
        "duration_s": 10.0,
        "sent": 1000,
        "succeeded": 995,
        "failed": 5,
        "success_rate": 0.995,
        "failures": {kind.value: 0 for kind in FailureKind} | {"timeout": 5},
        "timeouts": 5,
        "statuses": {"200": 995},
        "latency": LatencySummary(995, 5.0, 4.0, 6.0, 9.0, 30.0, 45.0),
        "actual_rps": 99.9,
        "throughput_rps": 99.4,
        "peak_rps": 101.0,
    }
    values.update(kwargs)
    return Summary(**values)  # type: ignore[arg-type]


def run_report(url: str = "http://tunnel/<x>&", **kwargs: object) -> RunReport:
    stages = (summary("stage 1", target_rps=50.0, duration_s=5.0), summary("stage 2"))
    values: dict[str, object] = {
        "url": url,
        "method": "GET",
        "profile": "custom",
        "connections": 100,
        "timeout_s": 10.0,
        "started_at": 1.7e9,
        "duration_s": 10.0,
        "stages": stages,
        "overall": summary(),
        "timeline": (),
        "processes": (
            ProcessUsage(
                pid=42,
                name="python: tunnel2 server",
                samples=(ProcessSample(1.0, 35.0, 50_000_000, 3),),
                cpu_mean_percent=30.0,
                cpu_max_percent=35.0,
                rss_max_bytes=50_000_000,
                threads_max=3,
            ),
        ),
        "generator": GeneratorUsage(1.0, 10.0, 10.0, 100.0, 0.5, 1.1, 2.0),
    }
    values.update(kwargs)
    return RunReport(**values)  # type: ignore[arg-type]


def test_thresholds_pass() -> None:
    assert check_thresholds(summary(), Thresholds()) == ()


def test_each_breached_threshold_is_named() -> None:
    bad = summary(success_rate=0.5, latency=LatencySummary(10, 25.0, 20.0, 21.0, 40.0, 60.0, 90.0))
    breaches = check_thresholds(bad, Thresholds())
    assert [b.name for b in breaches] == ["max-p99-ms", "min-success", "max-mean-ms"]
    assert breaches[0].message == "p99 latency 60.00 ms exceeds --max-p99-ms 50"
    assert breaches[1].message == "success rate 50.00% is below --min-success 99 %"
    assert breaches[2].message == "mean latency 25.00 ms exceeds --max-mean-ms 20"
    assert check_thresholds(bad, Thresholds(None, None, None)) == ()


def test_no_answers_breaches_latency_thresholds() -> None:
    breaches = check_thresholds(summary(latency=None), Thresholds(min_success=None))
    assert [(b.name, b.actual) for b in breaches] == [("max-p99-ms", None), ("max-mean-ms", None)]


def test_compare_runs() -> None:
    tunnel = run_report()
    direct = run_report(
        overall=summary(
            throughput_rps=100.0, latency=LatencySummary(1000, 1.0, 1.0, 1.0, 1.0, 3.0, 5.0)
        )
    )
    rows = {(r.scope, r.metric): r for r in compare_runs(tunnel, direct)}
    p99 = rows["overall", "p99_ms"]
    assert (p99.measured, p99.baseline, p99.difference, p99.ratio) == (30.0, 3.0, 27.0, 10.0)
    rps = rows["overall", "rps"]
    assert rps.difference == pytest.approx(-0.6)
    assert rps.ratio == pytest.approx(0.994)
    assert ("stage 2 (100 rps)", "mean_ms") in rows
    none = rows["stage 1 (50 rps)", "mean_ms"]
    assert none.ratio == 1


def test_compare_without_latency() -> None:
    rows = compare_runs(run_report(overall=summary(latency=None)), run_report())
    p99 = next(r for r in rows if r.metric == "p99_ms")
    assert (p99.measured, p99.difference, p99.ratio) == (None, None, None)


def full_report(**kwargs: object) -> LoadReport:
    return build_report(run_report(), run_report("http://direct/"), Thresholds(**kwargs))  # type: ignore[arg-type]


def test_json_is_complete_and_serializable(tmp_path: Path) -> None:
    report = full_report(max_p99_ms=10)
    data = to_json(report)
    assert data["schema"] == SCHEMA
    assert data["passed"] is False
    assert data["breaches"][0]["name"] == "max-p99-ms"
    overall = data["run"]["overall"]
    for key in ("sent", "succeeded", "success_rate", "failures", "timeouts", "latency",
                "actual_rps", "target_rps", "peak_rps", "throughput_rps"):  # fmt: skip
        assert key in overall
    assert set(overall["latency"]) == {
        "count", "mean_ms", "p50_ms", "p75_ms", "p95_ms", "p99_ms", "max_ms",
    }  # fmt: skip
    assert data["run"]["processes"][0]["cpu_mean_percent"] == 30.0
    assert data["compare"]["url"] == "http://direct/"
    assert data["comparison"][0]["metric"] == "rps"
    path = tmp_path / "report.json"
    write_json(report, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))


def test_text_report() -> None:
    text = render_text(full_report())
    assert "loadtest: GET http://tunnel/<x>&" in text
    assert "compare: GET http://direct/" in text
    assert "overhead (URL vs --compare URL" in text
    assert "failures overall: timeout 5" in text
    assert "pid 42 (python: tunnel2 server): CPU mean 30.0 %" in text
    assert "generator: CPU 10.0 % of one core" in text
    assert text.rstrip().endswith("PASS: p99 <= 50 ms, success >= 99 %, mean <= 20 ms")
    failing = render_text(full_report(max_p99_ms=10, max_mean_ms=1))
    assert "FAIL: p99 latency 30.00 ms exceeds --max-p99-ms 10" in failing
    assert "FAIL: mean latency 5.00 ms exceeds --max-mean-ms 1" in failing


def test_html_is_self_contained_with_chart() -> None:
    timeline = (
        TimelinePoint(0, 0, 50.0, 48, 48, 0, 2.0, 5.0),
        TimelinePoint(1, 0, 50.0, 50, 50, 0, 2.5, 6.0),
        TimelinePoint(2, 1, 100.0, 99, 99, 0, 3.0, 9.0),
        TimelinePoint(3, 1, 100.0, 0, 0, 0, None, None),
    )
    report = build_report(
        run_report(timeline=timeline), run_report("http://direct/"), Thresholds(max_p99_ms=1)
    )
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 2
    assert "stage 2: 100/s" in page  # the stage boundary label
    assert 'stroke-dasharray="4 3"' in page  # the boundary line
    assert page.count("<polyline") >= 4  # target, answers/s, p50, p99
    assert "http://tunnel/&lt;x&gt;&amp;" in page  # escaped
    assert "<x>" not in page
    assert "FAIL" in page
    # Nothing is fetched: no scripts, stylesheets or images, and the only URLs are the SVG
    # namespace and the URLs under test.
    for tag in ("<script", "<link", "<img", "url("):
        assert tag not in page
    urls = set(re.findall(r"https?://[^\s\"<&]+", page))
    assert urls == {"http://www.w3.org/2000/svg", "http://tunnel/", "http://direct/"}


def test_write_html(tmp_path: Path) -> None:
    path = tmp_path / "r.html"
    write_html(full_report(), path)
    assert path.read_text().count("<svg") == 2


def test_package_all_matches_public_names() -> None:
    import tunnel2.loadtest as package

    modules = {
        "backend",
        "baseline",
        "cli",
        "loadgen",
        "procstats",
        "profiles",
        "report",
        "sockets",
        "stats",
    }
    # (names starting with "@" are pytest's assertion-rewriting helpers, present when the
    # package is imported through the installed pytest plugin)
    public = {name for name in vars(package) if not name.startswith(("_", "@"))} - modules
    public.discard("annotations")
    assert public == set(package.__all__)


@pytest.mark.parametrize(
    ("cmdline", "name"),
    [
        (b"/venv/bin/python3\0/venv/bin/tunnel2\0http\x008080\0", "tunnel2 http 8080"),
        (b"/usr/bin/python3.11\0-m\0tunnel2.cli\0server\0", "tunnel2.cli server"),
        (b"nginx: worker process\0", "nginx: worker process"),
        (b"", "kworker"),
    ],
)
def test_process_names(cmdline: bytes, name: str) -> None:
    assert procstats._name("kworker", cmdline) == name
