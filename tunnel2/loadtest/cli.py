"""``tunnel2 backend`` and ``tunnel2 loadtest``: argument parsing, logging and ``trio.run``.

Layer: top (called by :mod:`tunnel2.cli`). No logic of its own: it turns flags into a
:class:`~tunnel2.loadtest.backend.BackendConfig` or a
:class:`~tunnel2.loadtest.loadgen.LoadConfig` and calls the library.

Exit status of ``tunnel2 loadtest``: 0 when every threshold is met and nothing regressed
against ``--baseline``, 1 when a threshold is breached or a figure regressed (each is named on
stdout), 2 for bad arguments, an unresolvable host, or a baseline that cannot be used.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import trio

from tunnel2._util import port_number, positive_float, positive_int, until_signalled
from tunnel2.loadtest.backend import BackendConfig, serve_backend
from tunnel2.loadtest.baseline import (
    check_comparable,
    load_baseline,
    make_baseline,
    parse_tolerances,
    save_baseline,
    with_baseline,
)
from tunnel2.loadtest.loadgen import LoadConfig, Progress, run_load
from tunnel2.loadtest.profiles import PROFILES, parse_stages, profile_stages, total_requests
from tunnel2.loadtest.report import Thresholds, Tolerances, render_text, write_html, write_json

if TYPE_CHECKING:
    from tunnel2.loadtest.report import Baseline

__all__ = ["add_parsers"]


def _log_level(text: str) -> int:
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}")
    return level


def _configure_logging(level: int) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"header {text!r} is not 'Name: value'")
    return name.strip(), value.strip()


def _stages(text: str) -> str:
    try:
        parse_stages(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _percent(text: str) -> float:
    value = positive_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is over 100 %")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _regression_spec(text: str) -> str:
    try:
        parse_tolerances([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``backend`` and ``loadtest`` on the ``tunnel2`` parser's subparsers.

    Each sets ``func(args) -> int``, which configures logging, runs trio and returns the exit
    status.
    """
    backend = subparsers.add_parser(
        "backend",
        help="run the fast test backend (/loadtest/ping, /get, /fast, /delay/MS, /echo, ...)",
        description="Run the fast HTTP/1.1 test backend. GET /loadtest/info lists its "
        "endpoints. Prints the URL it listens on, then serves until interrupted.",
    )
    backend.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    backend.add_argument(
        "--port", type=port_number, default=8080, help="port to bind (8080; 0 picks a free one)"
    )
    backend.add_argument(
        "--max-body-size",
        type=positive_int,
        default=BackendConfig().max_body_size,
        metavar="BYTES",
        help="largest request body accepted, 413 above (64 MiB)",
    )
    backend.add_argument(
        "--log-level", type=_log_level, default=logging.WARNING, help="warning (default), info"
    )
    backend.set_defaults(func=_backend_main)

    default = Thresholds()
    load = subparsers.add_parser(
        "loadtest",
        help="staged open-loop load test of a URL, with report and thresholds",
        description="Send requests to URL at a constant rate per stage (open loop: on "
        "schedule, whether or not earlier ones have answered; latency counts from the "
        "scheduled time). Prints live progress to stderr and the report to stdout. Exits 1 "
        "if a threshold is breached or a figure regressed against --baseline.",
    )
    load.add_argument("url", metavar="URL", help="http:// URL to request")
    load.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="smoke",
        help="smoke: 20 rps x 10 s; ramp / aggressive: 20, 50, 100, 200, 500, 1000 rps x 30 s "
        "each (default smoke)",
    )
    load.add_argument(
        "--stages",
        type=_stages,
        metavar="RATExSECONDS,...",
        help="custom stages, e.g. 100x10,500x10 (overrides --profile)",
    )
    load.add_argument("--method", default="GET", help="request method (GET)")
    load.add_argument("--body", help="request body; @FILE reads it from a file")
    load.add_argument(
        "--header",
        "-H",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable)",
    )
    load.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="from scheduled send time to complete answer (10)",
    )
    load.add_argument(
        "--connections",
        type=positive_int,
        default=100,
        metavar="N",
        help="connection pool size = most requests in flight (100)",
    )
    load.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    load.add_argument(
        "--html", type=Path, metavar="FILE", help="write a self-contained HTML report with charts"
    )
    load.add_argument(
        "--watch-pid",
        type=positive_int,
        action="append",
        default=[],
        metavar="PID",
        help="sample CPU %%, RSS and threads of this process (repeatable)",
    )
    load.add_argument(
        "--max-p99-ms",
        type=positive_float,
        default=default.max_p99_ms,
        metavar="MS",
        help=f"fail if overall p99 latency is above this ({default.max_p99_ms:g})",
    )
    load.add_argument(
        "--min-success",
        type=_percent,
        default=(default.min_success or 0) * 100,
        metavar="PERCENT",
        help=f"fail if the success rate is below this ({(default.min_success or 0) * 100:g})",
    )
    load.add_argument(
        "--max-mean-ms",
        type=positive_float,
        default=default.max_mean_ms,
        metavar="MS",
        help=f"fail if the mean latency is above this ({default.max_mean_ms:g})",
    )
    load.add_argument(
        "--no-thresholds",
        action="store_true",
        help="turn off --max-p99-ms, --min-success and --max-mean-ms (a --baseline check "
        "still applies)",
    )
    load.add_argument(
        "--compare",
        metavar="URL2",
        help="then run the same profile against URL2 (the direct backend) and print the "
        "overhead table",
    )
    # --- baselines ---
    tolerances = Tolerances()
    load.add_argument(
        "--save-baseline",
        type=Path,
        metavar="FILE",
        help="save this run's figures (per stage and overall), stages, URL, date, version "
        "and machine as a baseline for --baseline",
    )
    load.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="compare this run with a saved baseline, per stage; exit 1 naming each figure "
        "that regressed past --max-regression, 2 if the stages differ in count or rate",
    )
    load.add_argument(
        "--max-regression",
        type=_regression_spec,
        action="append",
        default=[],
        metavar="PCT|FIGURE=PCT",
        help=f"how far a figure may move the wrong way from --baseline (repeatable): PCT for "
        f"throughput, mean and p99 ({tolerances.throughput_pct:g}); FIGURE=PCT or FIGURE=off "
        f"for one of throughput, mean, p50 (off), p99; success=POINTS in percentage points "
        f"({tolerances.success_points:g})",
    )
    load.add_argument(
        "--min-latency-delta-ms",
        type=_non_negative_float,
        metavar="MS",
        help=f"a latency figure regresses only if it also rose by more than this "
        f"({tolerances.min_latency_delta_ms:g})",
    )
    load.add_argument(
        "--baseline-ratios",
        action="store_true",
        help="with --compare, against a baseline saved with --compare: first scale the "
        "baseline to this machine's speed (the direct runs' median latency and throughput, "
        "now / then), so that a slower or faster runner cancels out",
    )
    load.add_argument("--quiet", "-q", action="store_true", help="no live progress")
    load.add_argument(
        "--log-level", type=_log_level, default=logging.WARNING, help="warning (default), info"
    )
    load.set_defaults(func=_loadtest_main)


def _single(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups (trio's nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# --- backend ------------------------------------------------------------------------------


async def _run_backend(host: str, port: int, config: BackendConfig) -> None:
    async with trio.open_nursery() as nursery:
        backend = await nursery.start(functools.partial(serve_backend, host, port, config=config))
        print(
            f"tunnel2 backend listening on {backend.url} "
            f"(GET {backend.url}/loadtest/info lists the endpoints)",
            flush=True,
        )
        await trio.sleep_forever()  # until a signal (until_signalled) cancels it


def _backend_main(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    config = BackendConfig(max_body_size=args.max_body_size)
    try:
        trio.run(until_signalled, _run_backend, args.host, args.port, config)
    except BaseException as exc:
        error = _single(exc)
        if isinstance(error, KeyboardInterrupt):  # before the signal receiver is open
            return 0
        if isinstance(error, OSError):
            print(
                f"tunnel2 backend: cannot listen on {args.host}:{args.port}: {error}",
                file=sys.stderr,
            )
            return 2
        raise
    return 0


# --- loadtest -----------------------------------------------------------------------------


class _ProgressPrinter:
    """Prints :class:`Progress` on one updating line (a TTY) or one line a second."""

    def __init__(self, stream: TextIO, main_url: str) -> None:
        self._stream = stream
        self._main_url = main_url
        self._tty = stream.isatty()
        self._dirty = False

    def __call__(self, p: Progress) -> None:
        who = "" if p.url == self._main_url else "compare "
        p99 = "-" if p.p99_ms is None else f"{p.p99_ms:.1f} ms"
        line = (
            f"{who}[{p.elapsed:4.0f}s] stage {p.stage + 1}/{p.stages} "
            f"target {p.target_rps:g}/s actual {p.actual_rps}/s sent {p.sent} "
            f"errors {p.errors} in-flight {p.in_flight} p99 {p99} "
            f"gen-cpu {p.cpu_percent:.0f}%"
        )
        if self._tty:
            self._stream.write("\r\x1b[K" + line)
            self._dirty = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._dirty:
            self._stream.write("\n")
            self._stream.flush()
            self._dirty = False


def _load_config(args: argparse.Namespace) -> LoadConfig:
    if args.stages:
        stages, profile = parse_stages(args.stages), f"custom ({args.stages})"
    else:
        stages, profile = profile_stages(args.profile), args.profile
    body = b""
    if args.body is not None:
        body = Path(args.body[1:]).read_bytes() if args.body.startswith("@") else args.body.encode()
    thresholds = (
        Thresholds(None, None, None)
        if args.no_thresholds
        else Thresholds(
            max_p99_ms=args.max_p99_ms,
            min_success=args.min_success / 100,
            max_mean_ms=args.max_mean_ms,
        )
    )
    return LoadConfig(
        url=args.url,
        stages=stages,
        profile=profile,
        method=args.method.upper(),
        body=body,
        headers=tuple(args.header),
        timeout=args.timeout,
        connections=args.connections,
        compare_url=args.compare,
        watch_pids=tuple(args.watch_pid),
        thresholds=thresholds,
    )


def _load_baseline(
    args: argparse.Namespace, config: LoadConfig
) -> tuple[Baseline, Tolerances] | None:
    """Read ``--baseline`` and its tolerances, and check its stages before anything runs."""
    if args.baseline is None:
        for flag, value in (
            ("--max-regression", args.max_regression),
            ("--min-latency-delta-ms", args.min_latency_delta_ms),
            ("--baseline-ratios", args.baseline_ratios or None),
        ):
            if value not in (None, []):
                raise ValueError(f"{flag} needs --baseline FILE")
        return None
    if args.baseline_ratios and config.compare_url is None:
        raise ValueError("--baseline-ratios needs --compare URL2 (the direct run)")
    delta = args.min_latency_delta_ms
    tolerances = parse_tolerances(
        args.max_regression,
        min_latency_delta_ms=Tolerances().min_latency_delta_ms if delta is None else delta,
    )
    baseline = load_baseline(args.baseline)
    check_comparable(
        baseline, config.stages, ratios=args.baseline_ratios, source=str(args.baseline)
    )
    return baseline, tolerances


def _loadtest_main(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    try:
        config = _load_config(args)
        baseline = _load_baseline(args, config)
    except (ValueError, OSError) as exc:
        print(f"tunnel2 loadtest: {exc}", file=sys.stderr)
        return 2
    runs = 2 if config.compare_url else 1
    seconds = sum(stage.duration for stage in config.stages)
    print(
        f"tunnel2 loadtest: {config.profile}, {len(config.stages)} stage(s), "
        f"{total_requests(config.stages)} requests over {seconds:g} s"
        + (f", then the same against {config.compare_url}" if runs == 2 else ""),
        file=sys.stderr,
        flush=True,
    )
    printer = None if args.quiet else _ProgressPrinter(sys.stderr, config.url)
    try:
        report = trio.run(until_signalled, functools.partial(run_load, config, on_progress=printer))
    except BaseException as exc:
        error = _single(exc)
        if not isinstance(error, KeyboardInterrupt):  # (that one: before the receiver is open)
            if printer:
                printer.finish()
            if isinstance(error, OSError):
                print(f"tunnel2 loadtest: {error}", file=sys.stderr)
                return 2
            raise
        report = None
    if printer:
        printer.finish()
    if report is None:  # Ctrl-C or SIGTERM
        print("tunnel2 loadtest: interrupted", file=sys.stderr)
        return 130
    if baseline is not None:
        saved, tolerances = baseline
        report = with_baseline(
            report, saved, tolerances, ratios=args.baseline_ratios, source=str(args.baseline)
        )
    sys.stdout.write(render_text(report))
    sys.stdout.flush()
    if args.json:
        write_json(report, args.json)
    if args.html:
        write_html(report, args.html)
    if args.save_baseline:
        try:
            save_baseline(make_baseline(report), args.save_baseline)
        except OSError as exc:
            print(f"tunnel2 loadtest: cannot save the baseline: {exc}", file=sys.stderr)
            return 2
        print(f"tunnel2 loadtest: saved the baseline to {args.save_baseline}", file=sys.stderr)
    return 0 if report.passed else 1
