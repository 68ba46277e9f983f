#!/usr/bin/env python3
"""Does one flooding agent hurt the others? A quiet session's p99 with and without a flood.

One run, loopback only, every phase bounded in time. It starts, as separate processes, a
tunnel2 relay (``tunnel2 server``), the ``tunnel2 backend`` test server and a quiet agent
exposing it (``tunnel2 http``). The quiet session is loaded at a steady open-loop rate with
tunnel2's own load generator (``tunnel2.loadtest.run_load``, in this process) and its p99
latency is measured, alternately with no other agent and while a **flooder** process floods
the same relay. The flooder connects as an agent over a real WebSocket, completes a real
handshake (HELLO / WELCOME), then sends one pre-built message of frames over and over, as
fast as the relay takes it:

* ``tiny-data``: 1 MiB messages of 1-byte DATA frames for a stream that does not exist
  (about 95,000 frames per message). They are within the protocol (connection credit paces
  them and the relay returns it), so the relay never closes this agent: this measures
  fairness, the relay reading a huge batch of tiny frames while it serves the quiet session.
* ``ping``: 1 MiB messages of PING frames. The relay closes the flooder after its ping
  burst (GOAWAY ``ENHANCE_YOUR_CALM``) and the flooder re-dials at once, forever: this
  measures what closing floods costs.
* ``window``: the same with ``WINDOW(0, 1)`` frames (credit for data never sent).

Modes are interleaved round by round (quiet, each flood, quiet, ...), so a machine whose
speed drifts affects them alike. Wall-clock figures are only read as ratios to the quiet
rounds of the same run. Run it with the interpreter that has tunnel2 installed::

    /path/to/venv/bin/python benchmarks/flood.py [--rounds 3] [--rate 300] [--duration 10]
        [--modes tiny-data ping window] [--markdown FILE]

Linux only (it reads ``/proc``). Never run by the tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    CLK_TCK,
    REPO,
    Proc,
    Processes,
    StartError,
    check_url,
    cpu_ticks,
    log,
    render,
    wait_for_line,
)

MODES = ("tiny-data", "ping", "window")
MESSAGE_SIZE = 1024 * 1024
"""Bytes of tunnel frames in each message the flooder sends."""
TINY_STREAM_ID = 2
"""Stream of the tiny DATA frames: even, so the relay never opened it."""
REDIAL_LIMIT = 100_000
"""The flooder gives up after this many connections (bounds its loop)."""
IDLE_TIMEOUT = 30.0
"""Seconds the relay gets to go idle after a flood before the next round starts."""


# --- the flooder (a separate process: ``flood.py --flooder URL --mode MODE``) ---------------


def flood_message(mode: str) -> bytes:
    """One message's worth of tunnel frames for MODE."""
    from tunnel2 import frames

    if mode == "tiny-data":
        frame = frames.encode(frames.Data(TINY_STREAM_ID, b"x"))
    elif mode == "ping":
        frame = frames.encode(frames.Ping(b"flooding"))
    else:
        frame = frames.encode(frames.Window(0, 1))
    return frame * (MESSAGE_SIZE // len(frame))


def handshake(host: str, port: int) -> socket.socket:
    """Connect as an agent: WebSocket upgrade, HELLO, WELCOME. Returns the open socket."""
    import wsproto
    import wsproto.events
    from wsproto.connection import ConnectionType

    from tunnel2 import frames

    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ws = wsproto.WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(wsproto.events.Request(host=f"{host}:{port}", target="/_tunnel/connect")))
    decoder = frames.FrameDecoder()
    accepted = False
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the relay closed during the handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                accepted = True
                sock.sendall(ws.send(wsproto.events.BytesMessage(frames.encode(frames.Hello()))))
            elif isinstance(event, wsproto.events.BytesMessage):
                decoder.receive_data(bytes(event.data))
                frame = decoder.next_frame()
                if isinstance(frame, frames.Welcome):
                    sock.settimeout(None)
                    return sock
                if frame is not None:
                    raise ConnectionError(f"the relay answered HELLO with {frame!r}")
            elif isinstance(event, wsproto.events.RejectConnection) or not accepted:
                raise ConnectionError(f"WebSocket upgrade refused: {event!r}")


def run_flooder(relay_url: str, mode: str) -> int:
    """Flood RELAY_URL until SIGTERM; print what was sent when stopped."""
    url = urllib.parse.urlsplit(relay_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = flood_message(mode)
    masked = _masked_message(payload)
    sent = 0
    connects = 0

    def report(signum: int, frame: FrameType | None) -> NoReturn:
        print(f"flooder sent {sent} bytes over {connects} connections", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    while connects < REDIAL_LIMIT:
        try:
            sock = handshake(host, port)
        except OSError as exc:
            print(f"handshake failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.1)
            continue
        connects += 1
        if connects == 1:
            print("flooding", flush=True)
        drain = threading.Thread(target=_discard, args=(sock,), daemon=True)
        drain.start()
        try:
            while True:
                sock.sendall(masked)
                sent += len(payload)
        except OSError:
            pass  # the relay closed us: dial again
        finally:
            sock.close()
    return 0


def _masked_message(payload: bytes) -> bytes:
    # Masked once, sent as is every time: a client's WebSocket frame only needs some mask.
    from wsproto.frame_protocol import FrameProtocol

    protocol = FrameProtocol(client=True, extensions=[])
    return bytes(protocol.send_data(payload, fin=True))


def _discard(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


# --- the benchmark -----------------------------------------------------------------------


@dataclass
class Round:
    """One measurement: the quiet session's latency under MODE (or ``quiet``)."""

    index: int
    mode: str
    p50_ms: float | None
    p99_ms: float | None
    succeeded: int
    sent: int
    relay_cpu_pct: float
    flooder: str


def measure(
    url: str, rate: float, duration: float, connections: int
) -> tuple[float | None, float | None, int, int]:
    import trio

    from tunnel2.loadtest.loadgen import LoadConfig, run_load
    from tunnel2.loadtest.profiles import Stage

    config = LoadConfig(
        url, stages=(Stage(rate, duration),), profile="flood", connections=connections, timeout=5
    )
    report = trio.run(run_load, config)
    overall = report.run.overall
    latency = overall.latency
    return (
        latency.p50_ms if latency else None,
        latency.p99_ms if latency else None,
        overall.succeeded,
        overall.sent,
    )


def one_round(
    procs: Processes,
    args: argparse.Namespace,
    relay: Proc,
    relay_url: str,
    url: str,
    index: int,
    mode: str,
) -> Round:
    flooder = None
    if mode != "quiet":
        flooder = procs.start(
            f"flooder-{mode}-{index}",
            [args.python, str(Path(__file__).resolve()), "--flooder", relay_url, "--mode", mode],
            cwd=REPO,
        )
        wait_for_line(flooder, r"^flooding$")
        time.sleep(1.0)  # let the flood reach full speed before measuring
    before, start = cpu_ticks(relay.pid) or 0, time.monotonic()
    p50, p99, succeeded, sent = measure(url, args.rate, args.duration, args.connections)
    relay_cpu = ((cpu_ticks(relay.pid) or 0) - before) / CLK_TCK / (time.monotonic() - start)
    note = ""
    if flooder is not None:
        procs.stop(flooder)
        # What the flooder left in the socket buffers (megabytes) is still read by the relay:
        # let it finish before the next round, so no flood leaks into a quiet one.
        wait_idle(relay)
        match = re.search(r"sent (\d+) bytes over (\d+) connections", flooder.stdout_text())
        if match:
            mib = int(match.group(1)) / MESSAGE_SIZE
            note = f"{mib:,.0f} MiB, {int(match.group(2)):,} connection(s)"
        else:
            note = "no report"
    return Round(index, mode, p50, p99, succeeded, sent, 100 * relay_cpu, note)


def wait_idle(proc: Proc, timeout: float = IDLE_TIMEOUT) -> None:
    """Wait until PROC uses under 5 % of a core over half a second (at most TIMEOUT s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_ticks(proc.pid) or 0
        time.sleep(0.5)
        if ((cpu_ticks(proc.pid) or 0) - before) / CLK_TCK < 0.025:
            return
    log(f"{proc.name} still busy {timeout:g} s after the flood stopped")


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


SECTION = "## tunnel2 flood benchmark (benchmarks/flood.py)"


def report(rounds: list[Round], modes: Sequence[str], markdown: bool, header: list[str]) -> str:
    if markdown:
        lines = [SECTION, "", *(f"- {line}" for line in header), "", "### Rounds", ""]
    else:
        lines = [*header, ""]
    rows = [
        [
            str(r.index),
            r.mode,
            fmt(r.p50_ms),
            fmt(r.p99_ms),
            f"{r.succeeded}/{r.sent}",
            f"{r.relay_cpu_pct:.0f}",
            r.flooder or "-",
        ]
        for r in rounds
    ]
    lines.append(
        render(
            ["round", "mode", "p50 ms", "p99 ms", "ok/sent", "relay CPU %", "flooder sent"],
            rows,
            markdown,
        )
    )
    quiet = {r.index: r.p99_ms for r in rounds if r.mode == "quiet" and r.p99_ms}
    summary = []
    for mode in modes:
        ratios = [
            r.p99_ms / quiet[r.index]
            for r in rounds
            if r.mode == mode and r.p99_ms and r.index in quiet
        ]
        p99s = [r.p99_ms for r in rounds if r.mode == mode and r.p99_ms]
        summary.append(
            [
                mode,
                fmt(statistics.median(quiet.values()) if quiet else None),
                fmt(statistics.median(p99s) if p99s else None),
                fmt(statistics.median(ratios) if ratios else None),
                " ".join(f"{x:.2f}" for x in ratios) or "-",
            ]
        )
    lines.append("")
    if markdown:
        lines += ["### Quiet session p99: flooded / quiet", ""]
    lines.append(
        render(
            [
                "flood",
                "quiet p99 ms (median)",
                "flooded p99 ms (median)",
                "ratio (median)",
                "ratio per round",
            ],
            summary,
            markdown,
        )
    )
    return "\n".join(lines)


def run(args: argparse.Namespace, procs: Processes) -> int:
    relay = procs.start(
        "tunnel2-server",
        [args.python, "-m", "tunnel2.cli", "server", "--port", "0", "-q"],
        cwd=REPO,
    )
    relay_url = wait_for_line(relay, r"^tunnel2 relay on (http://\S+)").group(1)
    backend = procs.start(
        "tunnel2-backend", [args.python, "-m", "tunnel2.cli", "backend", "--port", "0"], cwd=REPO
    )
    base = wait_for_line(backend, r"listening on (http://\S+)").group(1)
    port = urllib.parse.urlsplit(base).port
    agent = procs.start(
        "tunnel2-http",
        [args.python, "-m", "tunnel2.cli", "http", str(port), "--server", relay_url, "-q"],
        cwd=REPO,
    )
    public = wait_for_line(agent, r"^Forwarding (\S+) -> \S+$").group(1)
    url = public.rstrip("/") + "/loadtest/ping"
    check_url(url)
    log(f"relay {relay_url}, quiet session {url}")
    load = os.getloadavg()
    measure(url, args.rate, 2.0, args.connections)  # warm-up, not reported
    rounds: list[Round] = []
    for index in range(1, args.rounds + 1):
        for mode in ("quiet", *args.modes):
            result = one_round(procs, args, relay, relay_url, url, index, mode)
            log(
                f"round {index} {mode}: p99 {fmt(result.p99_ms)} ms, "
                f"{result.succeeded}/{result.sent} ok, relay CPU {result.relay_cpu_pct:.0f} %"
                + (f", flooder {result.flooder}" if result.flooder else "")
            )
            rounds.append(result)
    closes = len(re.findall(r"flood", relay.err.read_text(errors="replace")))
    header = [
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; nproc {os.cpu_count()}; "
        f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}",
        f"tunnel2 git {git_commit()}; relay, backend, quiet agent and flooder are separate "
        "processes on 127.0.0.1; the load generator runs in this one",
        f"quiet session: {args.rate:g} req/s open loop for {args.duration:g} s per round, "
        f"{args.connections} connections, {args.rounds} interleaved rounds",
        f"the relay logged {closes} flood close(s) (ping/window floods re-dial after each)",
    ]
    print()
    print(report(rounds, args.modes, False, header))
    if args.markdown:
        write_section(Path(args.markdown), report(rounds, args.modes, True, header))
        log(f"wrote {args.markdown}")
    return 0


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def write_section(path: Path, section: str) -> None:
    """Put SECTION into PATH: replace an earlier one (up to the next ``## ``), or append."""
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section + "\n"
    else:
        end = text.find("\n## ", start + len(SECTION))
        rest = text[end + 1 :] if end >= 0 else ""
        text = text[:start] + section + "\n" + ("\n" + rest if rest else "")
    path.write_text(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--rate", type=float, default=300, help="quiet req/s (default 300)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=20, help="load generator pool size")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--markdown", help="also write the tables as Markdown to this file")
    parser.add_argument("--python", default=sys.executable, help="interpreter for tunnel2.cli")
    parser.add_argument("--flooder", metavar="RELAY_URL", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="tiny-data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flooder:
        return run_flooder(args.flooder, args.mode)
    if not sys.platform.startswith("linux"):
        print("benchmarks/flood.py needs Linux (/proc)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="tunnel2-flood-"))
    procs = Processes(workdir)
    try:
        return run(args, procs)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except StartError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
