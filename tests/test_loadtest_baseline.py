"""Tests for :mod:`tunnel2.loadtest.baseline`: the file, the tolerances and the comparison.

Sync tests on records built by hand (no load is generated here; the command line is tested
end to end in test_loadtest_cli.py).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_loadtest_report import run_report, summary

from tunnel2.loadtest.baseline import (
    BASELINE_KEY,
    BASELINE_VERSION,
    BaselineError,
    check_baseline,
    check_comparable,
    load_baseline,
    machine_info,
    make_baseline,
    parse_tolerances,
    save_baseline,
    speed_factors,
    with_baseline,
)
from tunnel2.loadtest.profiles import Stage
from tunnel2.loadtest.report import (
    Baseline,
    LatencySummary,
    LoadReport,
    MachineInfo,
    RunReport,
    Summary,
    Thresholds,
    Tolerances,
    build_report,
    render_html,
    render_text,
    to_json,
)

MACHINE = MachineInfo("ci-1", "Linux 6.1", "x86_64", "AMD EPYC", 2, "CPython 3.11.7")
NOW = datetime.datetime(2026, 12, 1, 11, 50, tzinfo=datetime.UTC)


def latency(mean: float = 5.0, p50: float = 4.0, p99: float = 30.0) -> LatencySummary:
    return LatencySummary(995, mean, p50, p50 + 2, p99 - 5, p99, p99 + 15)


def stage(label: str, rate: float, **kwargs: object) -> Summary:
    values: dict[str, object] = {"target_rps": rate, "throughput_rps": rate, "duration_s": 5.0}
    return summary(label, **(values | kwargs))


def two_stage_run(
    stage2: dict[str, object] | None = None, overall: dict[str, object] | None = None
) -> RunReport:
    """A run of 50x5,100x5; ``stage2`` / ``overall`` replace fields of those summaries."""
    return run_report(
        stages=(stage("stage 1", 50.0), stage("stage 2", 100.0, **(stage2 or {}))),
        overall=summary(target_rps=75.0, throughput_rps=75.0, **(overall or {})),  # type: ignore[arg-type]
    )


def saved(run: RunReport | None = None, machine: MachineInfo = MACHINE) -> Baseline:
    report = build_report(run or two_stage_run(), None, Thresholds())
    return make_baseline(report, machine=machine, now=NOW)


def check(run: RunReport, baseline: Baseline | None = None, **tolerances: Any) -> list[str]:
    """The regression messages of ``run`` against ``baseline`` (default: ``saved()``)."""
    result = check_baseline(
        run,
        baseline or saved(),
        attrs.evolve(Tolerances(), **tolerances),
        source="base.json",
        machine=MACHINE,
    )
    return [r.message for r in result.regressions]


# --- the file ---------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    run = two_stage_run()
    compare = run_report("http://direct/")
    baseline = make_baseline(build_report(run, compare, Thresholds()), machine=MACHINE, now=NOW)
    assert baseline.created_at == "2026-12-01T11:50:00Z"
    assert baseline.run is run
    assert baseline.compare is compare
    path = tmp_path / "base.json"
    save_baseline(baseline, path)
    data = json.loads(path.read_text())
    assert data[BASELINE_KEY] == BASELINE_VERSION == 1
    assert data["machine"]["cpu_model"] == "AMD EPYC"
    assert data["run"]["stages"][1]["throughput_rps"] == 100.0
    assert data["run"]["overall"]["latency"]["p99_ms"] == 30.0
    assert load_baseline(path) == baseline


def test_integers_are_read_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "base.json"
    save_baseline(saved(), path)
    data = json.loads(path.read_text())
    data["run"]["overall"]["throughput_rps"] = 75  # as a hand edit would write it
    data["unknown_key"] = "ignored"
    path.write_text(json.dumps(data))
    loaded = load_baseline(path).run.overall.throughput_rps
    assert (loaded, type(loaded)) == (75.0, float)


def test_machine_info_describes_this_machine() -> None:
    info = machine_info()
    assert info.cpu_count >= 1
    assert info.python.split()[0] in {"CPython", "PyPy"}
    assert info.arch
    assert info.cpu_model


def _edit(data: dict[str, object], path: str, value: object) -> None:
    *parents, last = path.split(".")
    node: object = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
    if value is _DELETE:
        del node[last]  # type: ignore[attr-defined]
    else:
        node[last] = value  # type: ignore[index]


_DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tunnel2_baseline", 2, "has version 2; this tunnel2 reads version 1"),
        ("tunnel2_baseline", _DELETE, "is not a tunnel2 baseline (no 'tunnel2_baseline' key"),
        ("run.stages.0.latency.p99_ms", "x", "baseline.run.stages[0].latency.p99_ms: expected"),
        ("run.overall.sent", 1.5, "baseline.run.overall.sent: expected int, got 1.5"),
        ("run.overall.sent", True, "baseline.run.overall.sent: expected int, got True"),
        ("run.stages", {}, "baseline.run.stages: expected a list"),
        ("run.overall.failures", [], "baseline.run.overall.failures: expected an object"),
        ("machine", None, "baseline.machine: expected an object"),
        ("run.overall.latency", _DELETE, "baseline.run.overall.latency: missing"),
        ("run.overall.target_rps", 1e400, "is not a finite number"),
    ],
)
def test_malformed_file(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = tmp_path / "base.json"
    save_baseline(saved(), path)
    data = json.loads(path.read_text())
    _edit(data, field, value)
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError) as info:
        load_baseline(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read baseline {path}: No such file or directory"),
        ("{", "baseline {path} is not JSON: "),
        ("[1, 2]", "{path} is not a tunnel2 baseline"),
        (b"\xff\xfe", "cannot read baseline {path}: "),
    ],
)
def test_unreadable_file(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "base.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(BaselineError, match="^" + message.format(path=path).replace("[", r"\[")):
        load_baseline(path)


# --- tolerances -------------------------------------------------------------------------------


def test_tolerance_defaults() -> None:
    assert parse_tolerances([]) == Tolerances()
    assert Tolerances() == Tolerances(20.0, 20.0, None, 20.0, 1.0, 1.0)


def test_bare_percentage_sets_throughput_mean_and_p99() -> None:
    t = parse_tolerances(["35"], min_latency_delta_ms=2.5)
    assert (t.throughput_pct, t.mean_pct, t.p50_pct, t.p99_pct) == (35, 35, None, 35)
    assert (t.success_points, t.min_latency_delta_ms) == (1.0, 2.5)


def test_named_tolerances_win_over_the_bare_one() -> None:
    t = parse_tolerances(["p99=50, p50=30", "10", "success=0.5", "Mean=off"])
    assert t == Tolerances(10, None, 30, 50, 0.5, 1.0)
    assert parse_tolerances(["off"]) == Tolerances(None, None, None, None, 1.0, 1.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("p98=20", "tolerance 'p98=20': unknown figure 'p98'; known: throughput, mean, p50"),
        ("fast", "tolerance 'fast': 'fast' is not a number or 'off'"),
        ("p99=-1", "tolerance 'p99=-1': '-1' must be 0 or more"),
        ("nan", "tolerance 'nan': 'nan' must be 0 or more"),
    ],
)
def test_bad_tolerance(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        parse_tolerances([spec])


def test_bad_latency_floor() -> None:
    with pytest.raises(ValueError, match="must be 0 or more"):
        parse_tolerances([], min_latency_delta_ms=-1)


# --- the comparison ---------------------------------------------------------------------------


def test_a_run_within_tolerance_passes() -> None:
    run = two_stage_run(
        stage2={"throughput_rps": 85.0, "latency": latency(mean=5.9, p99=35.9)},
        overall={"success_rate": 0.986},  # -0.9 points
    )
    result = check_baseline(run, saved(), Tolerances(), source="base.json", machine=MACHINE)
    assert result.regressions == ()
    assert result.warnings == ()
    scopes = {row.scope for row in result.comparison}
    assert scopes == {"overall", "stage 1 (50 rps)", "stage 2 (100 rps)"}
    report = attrs.evolve(build_report(run, None, Thresholds(None, None, None)), baseline=result)
    assert report.passed
    text = render_text(report)
    assert "baseline: GET http://tunnel/<x>&" in text
    assert "base.json, saved 2026-12-01T11:50:00Z by tunnel2 " in text
    assert "on ci-1 (Linux 6.1 x86_64, 2 x AMD EPYC, CPython 3.11.7)" in text
    assert "against the baseline (URL now vs baseline" in text
    assert text.rstrip().endswith(
        "PASS: no regression (throughput -20 %, mean +20 %, p99 +20 %, success -1 points, "
        "latency floor 1 ms)"
    )


def test_throughput_and_p99_regressions_are_named() -> None:
    run = two_stage_run(stage2={"throughput_rps": 70.0, "latency": latency(p99=45.0)})
    assert check(run) == [
        "stage 2 (100 rps) throughput: baseline 100.0 req/s, now 70.0 req/s, -30.0 % "
        "(tolerance -20 %)",
        "stage 2 (100 rps) p99: baseline 30.00 ms, now 45.00 ms, +50.0 % "
        "(tolerance +20 % and +1 ms)",
    ]
    assert check(run, throughput_pct=30.0, p99_pct=None) == []  # exactly 30 %: not past it


def test_mean_p50_and_success_regressions() -> None:
    run = two_stage_run(
        stage2={"latency": latency(mean=8.0, p50=6.0)}, overall={"success_rate": 0.98}
    )
    assert check(run) == [
        "overall success: baseline 99.50%, now 98.00%, -1.5 points (tolerance -1 points)",
        "stage 2 (100 rps) mean: baseline 5.00 ms, now 8.00 ms, +60.0 % "
        "(tolerance +20 % and +1 ms)",
    ]
    # p50 is checked only when asked for.
    assert len(check(run, p50_pct=40.0)) == 3
    assert check(run, mean_pct=None, success_points=2.0) == []


def test_latency_floor_ignores_small_absolute_changes() -> None:
    fast = latency(mean=0.3, p50=0.2, p99=0.4)
    baseline = saved(two_stage_run(stage2={"latency": fast}))
    run = two_stage_run(stage2={"latency": latency(mean=0.3, p50=0.2, p99=0.6)})  # +50 %
    assert check(run, baseline) == []
    assert check(run, baseline, min_latency_delta_ms=0.1) == [
        "stage 2 (100 rps) p99: baseline 0.40 ms, now 0.60 ms, +50.0 % "
        "(tolerance +20 % and +0.1 ms)"
    ]
    # The floor alone does not fail a run: the relative change must also be past its limit.
    slower = two_stage_run(stage2={"latency": latency(p99=33.0)})  # +3 ms, +10 %
    assert check(slower, min_latency_delta_ms=0) == []


def test_no_answers_is_a_latency_regression() -> None:
    run = two_stage_run(stage2={"latency": None, "success_rate": 0.0})
    assert check(run, success_points=None) == [
        "stage 2 (100 rps) mean: baseline 5.00 ms, now - (no answers), no answers "
        "(tolerance +20 % and +1 ms)",
        "stage 2 (100 rps) p99: baseline 30.00 ms, now - (no answers), no answers "
        "(tolerance +20 % and +1 ms)",
    ]
    # A baseline without answers has nothing to regress from.
    assert check(two_stage_run(), saved(run), success_points=None) == []


def test_single_stage_compares_overall() -> None:
    one = run_report(stages=(stage("stage 1", 100.0),), overall=summary(throughput_rps=100.0))
    slow = run_report(stages=(stage("stage 1", 100.0),), overall=summary(throughput_rps=50.0))
    assert check(slow, saved(one)) == [
        "overall throughput: baseline 100.0 req/s, now 50.0 req/s, -50.0 % (tolerance -20 %)"
    ]


@pytest.mark.parametrize(
    "stages",
    [
        (Stage(50, 5),),
        (Stage(50, 5), Stage(100, 5), Stage(200, 5)),
        (Stage(50, 5), Stage(120, 5)),
    ],
)
def test_stages_must_match_in_count_and_rate(stages: tuple[Stage, ...]) -> None:
    with pytest.raises(BaselineError) as info:
        check_comparable(saved(), stages, source="base.json")
    assert str(info.value).startswith("stages differ from baseline base.json: it has 2 (50x5,")
    assert "run with --stages 50x5,100x5, or save a new baseline with --save-baseline" in str(
        info.value
    )
    run = run_report(stages=tuple(stage(f"stage {i}", s.rate) for i, s in enumerate(stages)))
    with pytest.raises(BaselineError, match="stages differ"):
        check_baseline(run, saved(), Tolerances(), machine=MACHINE)


def test_differences_that_only_warn() -> None:
    run = attrs.evolve(
        run_report(
            url="http://tunnel/other",
            stages=(stage("stage 1", 50.0, duration_s=2.0), stage("stage 2", 100.0)),
            overall=summary(target_rps=75.0, throughput_rps=75.0),
        ),
        connections=10,
    )
    check_comparable(saved(), (Stage(50, 2), Stage(100, 5)))  # durations may differ
    elsewhere = attrs.evolve(MACHINE, hostname="ci-2", cpu_model="Intel Xeon", cpu_count=4)
    result = check_baseline(run, saved(), Tolerances(), machine=elsewhere)
    assert result.regressions == ()
    assert result.warnings == (
        "the baseline was measured on another machine (ci-1): cpu_model 'AMD EPYC' -> "
        "'Intel Xeon'; cpu_count 2 -> 4",
        "stage durations differ from the baseline: stage 1 5 s -> 2 s",
        "URL differs from the baseline: http://tunnel/<x>& -> http://tunnel/other",
        "connections differs from the baseline: 100 -> 10",
    )
    assert "WARNING: stage durations differ" in render_text(
        attrs.evolve(build_report(run, None, Thresholds()), baseline=result)
    )
    # Another host name alone is not another machine (CI runners get a new one each run).
    renamed = attrs.evolve(MACHINE, hostname="ci-2")
    assert check_baseline(two_stage_run(), saved(), Tolerances(), machine=renamed).warnings == ()


def regressed_report() -> LoadReport:
    run = two_stage_run(stage2={"throughput_rps": 10.0})
    report = build_report(run, None, Thresholds())
    return with_baseline(report, saved(), Tolerances(), source="base.json", machine=MACHINE)


def test_regressions_fail_the_report_in_every_rendering() -> None:
    report = regressed_report()
    assert report.breaches == ()
    assert not report.passed
    text = render_text(report)
    assert text.rstrip().splitlines()[-1] == (
        "REGRESSION: stage 2 (100 rps) throughput: baseline 100.0 req/s, now 10.0 req/s, "
        "-90.0 % (tolerance -20 %)"
    )
    assert "PASS" not in text
    data = json.loads(json.dumps(to_json(report)))
    assert data["passed"] is False
    check_data = data["baseline"]
    assert check_data["source"] == "base.json"
    assert check_data["baseline"]["created_at"] == "2026-12-01T11:50:00Z"
    assert check_data["regressions"][0]["figure"] == "throughput"
    assert check_data["regressions"][0]["change"] == pytest.approx(-90.0)
    rows = {(r["scope"], r["metric"]): r for r in check_data["comparison"]}
    assert rows["stage 2 (100 rps)", "rps"]["baseline"] == 100.0
    assert rows["stage 2 (100 rps)", "rps"]["measured"] == 10.0
    page = render_html(report)
    assert page.count("<svg") == 2  # this run and the baseline, each with its chart
    assert "<h2>baseline: GET http://tunnel/&lt;x&gt;&amp;</h2>" in page
    assert "<h2>Against the baseline</h2>" in page
    assert "<th>baseline</th>" in page
    assert "<b>REGRESSION</b>: stage 2 (100 rps) throughput: baseline 100.0 req/s" in page


def test_passing_html_says_so() -> None:
    report = with_baseline(
        build_report(two_stage_run(), None, Thresholds()), saved(), Tolerances(), machine=MACHINE
    )
    assert report.passed
    assert "every threshold met, no regression against the baseline." in render_html(report)


# --- ratios to the direct run (--baseline-ratios) ---------------------------------------------


def direct_run(p50: float = 1.0, throughput: float = 75.0) -> RunReport:
    """A --compare run of 50x5,100x5 whose overall median latency is ``p50``."""
    return run_report(
        "http://direct/",
        stages=(stage("stage 1", 50.0), stage("stage 2", 100.0)),
        overall=summary(throughput_rps=throughput, latency=latency(mean=5.0, p50=p50, p99=90.0)),
    )


def with_direct(direct: RunReport) -> Baseline:
    report = build_report(two_stage_run(), direct, Thresholds())
    return make_baseline(report, machine=MACHINE, now=NOW)


def ratio_report(run: RunReport, direct: RunReport) -> LoadReport:
    report = build_report(run, direct, Thresholds())
    baseline = with_direct(direct_run(p50=1.0))
    return with_baseline(report, baseline, Tolerances(), ratios=True, machine=MACHINE)


def ratio_check(run: RunReport, direct: RunReport) -> list[str]:
    checked = ratio_report(run, direct).baseline
    assert checked is not None
    assert checked.scaled
    return [r.message for r in checked.regressions]


def test_speed_factors() -> None:
    assert speed_factors(direct_run(p50=2.0), direct_run(p50=3.0, throughput=60.0)) == (
        1.5,
        0.8,
    )
    no_answers = run_report(overall=summary(latency=None, throughput_rps=0.0))
    assert speed_factors(no_answers, direct_run()) == (None, None)


def test_ratios_cancel_a_slower_machine() -> None:
    # Today everything is twice as slow: the direct median 1 -> 2 ms, the tunnel's latencies
    # doubled, and (past saturation) throughput fell to 0.7x on both.
    slow = run_report(
        stages=(
            stage("stage 1", 50.0, throughput_rps=35.0, latency=latency(10.0, 8.0, 60.0)),
            stage("stage 2", 100.0, throughput_rps=70.0, latency=latency(10.0, 8.0, 60.0)),
        ),
        overall=summary(target_rps=75.0, throughput_rps=52.5, latency=latency(10.0, 8.0, 60.0)),
    )
    assert len(check(slow, with_direct(direct_run()))) == 9  # absolute: everything regressed
    assert ratio_check(slow, direct_run(p50=2.0, throughput=52.5)) == []
    text = render_text(ratio_report(slow, direct_run(p50=2.0, throughput=52.5)))
    assert (
        "  scaled to this machine's speed by the --compare runs: latencies x2.00 (the direct "
        "median latency now / then), throughput x0.70"
    ) in text


def test_ratios_find_a_slower_tunnel() -> None:
    # The direct run is as fast as with the baseline; only the tunnel got slower.
    slow = two_stage_run(stage2={"latency": latency(p99=60.0)})
    assert ratio_check(slow, direct_run(p50=1.0)) == [
        "stage 2 (100 rps) p99: baseline 30.00 ms, now 60.00 ms, +100.0 % "
        "(tolerance +20 % and +1 ms)"
    ]
    # A machine 1.5x slower explains 45 ms of it; the other 15 ms (+33 %) regressed.
    assert ratio_check(slow, direct_run(p50=1.5)) == [
        "stage 2 (100 rps) p99: baseline 45.00 ms, now 60.00 ms, +33.3 % "
        "(tolerance +20 % and +1 ms)"
    ]
    checked = ratio_report(slow, direct_run(p50=1.5))
    assert "against the baseline (URL now vs baseline scaled by --compare;" in render_text(checked)
    page = render_html(checked)
    assert "<th>baseline scaled by --compare</th>" in page
    assert "latencies x1.50" in page


def test_ratios_without_a_direct_latency_compare_no_latency() -> None:
    slow = two_stage_run(stage2={"latency": latency(p99=60.0)})
    no_answers = run_report("http://direct/", overall=summary(latency=None, throughput_rps=75.0))
    assert ratio_check(slow, no_answers) == []
    checked = ratio_report(slow, no_answers).baseline
    assert checked is not None
    assert (checked.latency_scale, checked.throughput_scale) == (None, 1.0)
    assert "latencies unknown" in render_text(ratio_report(slow, no_answers))


def test_ratios_need_a_direct_run_on_both_sides() -> None:
    report = build_report(two_stage_run(), None, Thresholds())
    with pytest.raises(BaselineError, match=r"^comparing ratios with a baseline needs a --compare"):
        with_baseline(report, with_direct(direct_run()), Tolerances(), ratios=True)
    report = build_report(two_stage_run(), direct_run(), Thresholds())
    with pytest.raises(
        BaselineError,
        match=r"^baseline base\.json has no --compare run to take ratios from; save it with "
        r"--compare URL2 --save-baseline$",
    ):
        with_baseline(report, saved(), Tolerances(), ratios=True, source="base.json")
    # Without ratios the direct runs are not used.
    assert with_baseline(report, saved(), Tolerances(), machine=MACHINE).passed
