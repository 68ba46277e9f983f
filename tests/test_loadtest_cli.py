"""Tests for ``tunnel2 backend`` and ``tunnel2 loadtest`` run as real subprocesses.

``sys.executable -m tunnel2.cli`` runs the command in this interpreter's environment. Every
subprocess has a bounded timeout and is stopped by its own pid. Outcomes are checked through
exit codes, stdout and the written files, never timings (thresholds are set far from the
figures a run can produce).
"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_loadtest_report import run_report, summary

from tunnel2.loadtest.baseline import make_baseline, save_baseline
from tunnel2.loadtest.report import SCHEMA, Thresholds, build_report

CLI = [sys.executable, "-m", "tunnel2.cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class BackendProcess:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url


@pytest.fixture
def backend() -> Iterator[BackendProcess]:
    with subprocess.Popen(
        [*CLI, "backend", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "tunnel2 backend printed nothing in 30 s"
            line = proc.stdout.readline()
            match = re.match(r"tunnel2 backend listening on (http://127\.0\.0\.1:(\d+)) ", line)
            assert match, line
            assert int(match[2]) > 0
            yield BackendProcess(proc, match[1])
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def test_backend_serves_and_stops_on_interrupt(backend: BackendProcess) -> None:
    with urllib.request.urlopen(f"{backend.url}/loadtest/ping", timeout=10) as response:
        assert response.read() == b"pong"
    with urllib.request.urlopen(f"{backend.url}/loadtest/info", timeout=10) as response:
        assert "/loadtest/echo" in {e["path"] for e in json.load(response)["endpoints"]}
    backend.proc.send_signal(signal.SIGINT)
    assert backend.proc.wait(timeout=10) == 0


def test_backend_stops_on_sigterm(backend: BackendProcess) -> None:
    backend.proc.send_signal(signal.SIGTERM)
    assert backend.proc.wait(timeout=10) == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_loadtest_stops_on_ctrl_c_or_sigterm(backend: BackendProcess, signum: int) -> None:
    # 10 requests a second for a minute: interrupted long before the end, once a progress
    # line (printed a second into the run) says the run is on.
    command = [*CLI, "loadtest", f"{backend.url}/loadtest/ping", "--stages", "10x60"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            for _ in range(2):
                ready, _, _ = select.select([proc.stderr], [], [], 30)
                assert ready, "tunnel2 loadtest printed nothing in 30 s"
                line = proc.stderr.readline()
            assert re.match(r"\[ *\d+s\] stage 1/1 ", line), line  # a progress line
            proc.send_signal(signum)
            assert proc.wait(timeout=15) == 130
            rest = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert "tunnel2 loadtest: interrupted" in rest
    assert "Traceback" not in rest, rest


def test_backend_port_in_use(backend: BackendProcess) -> None:
    port = backend.url.rsplit(":", 1)[1]
    result = run_cli("backend", "--port", port)
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1:" in result.stderr


def test_help() -> None:
    for command in ("backend", "loadtest"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        assert "usage: tunnel2 " + command in result.stdout


def test_loadtest_passes_and_writes_reports(backend: BackendProcess, tmp_path: Path) -> None:
    json_path, html_path = tmp_path / "r.json", tmp_path / "r.html"
    result = run_cli(
        "loadtest",
        f"{backend.url}/loadtest/ping",
        "--stages", "20x1,40x0.5",
        "--json", str(json_path),
        "--html", str(html_path),
        "--watch-pid", str(backend.proc.pid),
        "--max-p99-ms", "5000",
        "--max-mean-ms", "5000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout
    assert f"pid {backend.proc.pid} (" in result.stdout
    assert "stage 1/2 target 20/s" in result.stderr  # live progress, one line a second
    data = json.loads(json_path.read_text())
    assert data["schema"] == SCHEMA
    assert data["passed"] is True
    assert [s["sent"] for s in data["run"]["stages"]] == [20, 20]
    assert data["run"]["overall"]["succeeded"] == 40
    assert data["run"]["processes"][0]["pid"] == backend.proc.pid
    page = html_path.read_text()
    assert "<svg" in page
    assert "stage 2: 40/s" in page


def test_loadtest_names_each_breached_threshold(backend: BackendProcess) -> None:
    result = run_cli(
        "loadtest",
        f"{backend.url}/loadtest/delay/30",
        "--stages", "10x1",
        "--max-p99-ms", "10",
        "--max-mean-ms", "10",
        "--quiet",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "FAIL: p99 latency" in result.stdout
    assert "exceeds --max-p99-ms 10" in result.stdout
    assert "exceeds --max-mean-ms 10" in result.stdout
    assert "--min-success" not in result.stdout
    assert result.stderr.count("\n") == 1  # the start line only: --quiet


def test_loadtest_min_success(backend: BackendProcess) -> None:
    result = run_cli(
        "loadtest", f"{backend.url}/loadtest/status/503", "--stages", "10x1", "--quiet"
    )
    assert result.returncode == 1
    assert "FAIL: success rate 0.00% is below --min-success 99 %" in result.stdout
    assert "failures overall: http_5xx 10" in result.stdout
    result = run_cli(
        "loadtest",
        f"{backend.url}/loadtest/status/503",
        "--stages", "10x0.5",
        "--quiet",
        "--no-thresholds",
    )  # fmt: skip
    assert result.returncode == 0


def test_loadtest_compare(backend: BackendProcess) -> None:
    result = run_cli(
        "loadtest",
        f"{backend.url}/loadtest/echo",
        "--method", "post",
        "--body", "hello",
        "--header", "Content-Type: text/plain",
        "--stages", "20x1.5",
        "--compare", f"{backend.url}/loadtest/echo?direct",
        "--max-p99-ms", "5000",
        "--max-mean-ms", "5000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "overhead (URL vs --compare URL" in result.stdout
    assert re.search(r"overall\s+p99_ms", result.stdout)
    assert "compare [" in result.stderr  # progress of the second run is labelled
    assert result.stdout.count("statuses: 200: 30") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stages", "10"], "is not RATExSECONDS"),
        (["--stages", "0x1"], "rate must be a positive number"),
        (["--timeout", "0"], "must be positive"),
        (["--header", "nocolon"], "is not 'Name: value'"),
        (["--min-success", "101"], "over 100"),
    ],
)
def test_loadtest_bad_arguments(args: list[str], message: str) -> None:
    result = run_cli("loadtest", "http://127.0.0.1:1/", *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://127.0.0.1/", "only http:// URLs are supported"),
        ("http://no-such-host.invalid/", "cannot resolve no-such-host.invalid"),
    ],
)
def test_loadtest_unusable_url(url: str, message: str) -> None:
    result = run_cli("loadtest", url, "--stages", "1x1")
    assert result.returncode == 2
    assert message in result.stderr


# --- baselines --------------------------------------------------------------------------------

# Tolerances far past anything a noisy machine does to a 50-request run, except where a test
# narrows one figure on purpose.
GENEROUS = ["--max-regression", "1000000", "--max-regression", "success=100"]


def test_loadtest_baseline_save_then_compare(backend: BackendProcess, tmp_path: Path) -> None:
    url = f"{backend.url}/loadtest/ping"
    base, html_path = tmp_path / "base.json", tmp_path / "r.html"
    result = run_cli(
        "loadtest", url, "--stages", "50x1", "--quiet", "--no-thresholds",
        "--save-baseline", str(base),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"saved the baseline to {base}" in result.stderr
    data = json.loads(base.read_text())
    assert data["tunnel2_baseline"] == 1
    assert data["run"]["url"] == url
    assert [(s["target_rps"], s["sent"]) for s in data["run"]["stages"]] == [(50, 50)]
    assert data["machine"]["cpu_count"] >= 1

    result = run_cli(
        "loadtest", url, "--stages", "50x1", "--quiet", "--no-thresholds",
        "--baseline", str(base), *GENEROUS, "--min-latency-delta-ms", "5000",
        "--html", str(html_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"  {base}, saved {data['created_at']} by tunnel2 " in result.stdout
    assert re.search(r"overall\s+rps\s+[\d.]+\s+[\d.]+", result.stdout)
    assert "PASS: no regression (throughput -1e+06 %" in result.stdout
    assert "REGRESSION" not in result.stdout
    assert html_path.read_text().count("<svg") == 2

    # A doctored baseline claiming 10x the throughput: this run regressed on it.
    for s in [*data["run"]["stages"], data["run"]["overall"]]:
        s["throughput_rps"] *= 10
    base.write_text(json.dumps(data))
    result = run_cli(
        "loadtest", url, "--stages", "50x1", "--quiet", "--no-thresholds",
        "--baseline", str(base), *GENEROUS, "--max-regression", "throughput=50",
        "--min-latency-delta-ms", "5000",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    regressions = [line for line in result.stdout.splitlines() if line.startswith("REGRESSION")]
    assert len(regressions) == 1, result.stdout
    assert re.fullmatch(
        r"REGRESSION: overall throughput: baseline [\d.]+ req/s, now [\d.]+ req/s, "
        r"-[\d.]+ % \(tolerance -50 %\)",
        regressions[0],
    )


def test_loadtest_baseline_ratios(backend: BackendProcess, tmp_path: Path) -> None:
    url, direct = f"{backend.url}/loadtest/ping", f"{backend.url}/loadtest/ping?direct"
    base = tmp_path / "base.json"
    common = ["--stages", "50x1", "--quiet", "--no-thresholds", "--compare", direct]
    result = run_cli("loadtest", url, *common, "--save-baseline", str(base))
    assert result.returncode == 0, result.stderr
    assert json.loads(base.read_text())["compare"]["url"] == direct
    result = run_cli(
        "loadtest", url, *common, "--baseline", str(base), "--baseline-ratios", *GENEROUS,
        "--min-latency-delta-ms", "5000",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against the baseline (URL now vs baseline scaled by --compare;" in result.stdout
    assert "PASS: no regression" in result.stdout


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (
            "saved",
            ["--stages", "20x1", "--compare", "http://127.0.0.1:1/", "--baseline-ratios"],
            "baseline {base} has no --compare run to take ratios from",
        ),
        (None, [], "cannot read baseline {base}: No such file or directory"),
        ("{", [], "baseline {base} is not JSON"),
        ('{"tunnel2_baseline": 2}', [], "baseline {base} has version 2"),
        (
            "saved",
            ["--stages", "50x1,100x1"],
            "stages differ from baseline {base}: it has 1 (20x1), this run 2 (50x1,100x1); "
            "run with --stages 20x1",
        ),
    ],
)
def test_loadtest_unusable_baseline(
    tmp_path: Path, content: str | None, args: list[str], message: str
) -> None:
    """Checked before any load is sent: the URL here answers nothing."""
    base = tmp_path / "base.json"
    if content == "saved":
        run = run_report(stages=(summary("stage 1", target_rps=20.0, duration_s=1.0),))
        save_baseline(make_baseline(build_report(run, None, Thresholds())), base)
    elif content is not None:
        base.write_text(content)
    result = run_cli("loadtest", "http://127.0.0.1:1/", "--baseline", str(base), *args)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line
    assert line.startswith(f"tunnel2 loadtest: {message.format(base=base)}")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-regression", "20"], "tunnel2 loadtest: --max-regression needs --baseline FILE"),
        (["--min-latency-delta-ms", "2"], "--min-latency-delta-ms needs --baseline FILE"),
        (["--max-regression", "p98=1"], "unknown figure 'p98'"),
        (["--min-latency-delta-ms", "-1"], "'-1' must be 0 or more"),
        (["--baseline-ratios"], "--baseline-ratios needs --baseline FILE"),
        (
            ["--baseline-ratios", "--baseline", "base.json"],
            "--baseline-ratios needs --compare URL2 (the direct run)",
        ),
    ],
)
def test_loadtest_baseline_bad_arguments(args: list[str], message: str) -> None:
    result = run_cli("loadtest", "http://127.0.0.1:1/", *args)
    assert result.returncode == 2
    assert message in result.stderr
