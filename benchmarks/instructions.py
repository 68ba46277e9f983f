"""Instructions per request under callgrind: the repeatable cost figure of ``run.py``.

Wall-clock figures on a shared machine swing by tens of percent; the number of user-space
instructions a process executes for the same work hardly moves (callgrind's ``Ir``, to
~0.5 %). ``run.py --instructions`` uses this module to start a path's processes under
``valgrind --tool=callgrind`` with instrumentation off (start-up is not counted), and then,
per connection count C:

1. switches instrumentation on (``vgdb ... instrumentation on``) and sends a warm-up;
2. dumps the counters (each dump holds the cost since the previous one) and idles for a few
   seconds, which measures what timers cost per second with no traffic;
3. sends N1 then N2 keep-alive requests over C fresh connections (every answer checked),
   dumping after each segment.

Per process, instructions per request = (Ir(N2) - Ir(N1) - idle rate x (t(N2) - t(N1))) /
(N2 - N1): what a segment costs whatever its size (connects, closes, the pause, the dump)
cancels, and so do the timers' wake-ups, which valgrind's slowness (~50x) would otherwise
charge to each request. The same method as ``../shared/tools/instr-per-request.sh``.

Only user space is counted: the kernel's work in system calls (a large share of nginx's
CPU) is not in the figures. Standard library only; never run by the tests.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

VGDB_TIMEOUT = 60.0
"""Seconds one vgdb command may take."""
DUMP_TIMEOUT = 30.0
"""Seconds callgrind gets to finish writing a dump file."""
CLIENT_TIMEOUT = 120.0
"""Socket timeout of the request driver (valgrind makes a request ~50x slower)."""
START_TIMEOUT = 120.0
"""Seconds a process under valgrind gets to report readiness."""


class CallgrindError(Exception):
    """A callgrind measurement could not be made (the message says why)."""


@dataclass
class Counted:
    """A process running under callgrind, and where its dumps go."""

    role: str
    pid: int
    out_base: Path
    """``--callgrind-out-file`` without the ``.N`` suffix of each dump."""
    dumps: int = 0


@dataclass
class Settings:
    n1: int = 300
    n2: int = 1500
    warmup: int = 200
    idle_s: float = 5.0
    quiet_s: float = 0.5


@dataclass
class Figures:
    """Instructions per request by role, at C connections."""

    connections: int
    per_request: dict[str, float] = field(default_factory=dict)
    idle_per_second: dict[str, float] = field(default_factory=dict)
    seconds_per_request: float = 0.0
    """Wall time per request under valgrind (N2 segment minus N1, over N2 - N1)."""


def valgrind_argv(outdir: Path, vgdb_prefix: Path, role: str) -> list[str]:
    """The valgrind prefix of a measured process's command line."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--vgdb=yes",
        f"--vgdb-prefix={vgdb_prefix}",
        "--child-silent-after-fork=yes",
        f"--callgrind-out-file={outdir}/{role}.%p",
    ]


def _vgdb(vgdb_prefix: Path, pid: int, *command: str) -> None:
    try:
        done = subprocess.run(
            ["vgdb", f"--vgdb-prefix={vgdb_prefix}", f"--pid={pid}", *command],
            capture_output=True,
            text=True,
            timeout=VGDB_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise CallgrindError(f"vgdb {' '.join(command)} for PID {pid}: no answer") from None
    if done.returncode != 0:
        raise CallgrindError(
            f"vgdb {' '.join(command)} for PID {pid} failed: {(done.stderr or done.stdout)[-300:]}"
        )


def _dump(vgdb_prefix: Path, counted: Counted) -> int:
    """Dump (and so zero) COUNTED's counters; the instructions since its previous dump."""
    _vgdb(vgdb_prefix, counted.pid, "dump")
    counted.dumps += 1
    path = Path(f"{counted.out_base}.{counted.dumps}")
    deadline = time.monotonic() + DUMP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.1)
    raise CallgrindError(f"callgrind wrote no complete dump {path}")


def drive(url: str, requests: int, connections: int) -> None:
    """REQUESTS keep-alive GETs over CONNECTIONS fresh HTTP/1.1 connections (one request at a
    time on each); every answer must be a 200 with a Content-Length body.

    Raises:
        CallgrindError: an answer was wrong or missing (the first error is named).
    """
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    request = (
        f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: tunnel2-bench\r\n"
        "Accept: */*\r\n\r\n"
    ).encode()
    shares = [requests // connections + (i < requests % connections) for i in range(connections)]
    errors: list[str] = []

    def worker(count: int) -> None:
        try:
            with socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
                for _ in range(count):
                    sock.sendall(request)
                    buf = _read_answer(sock, buf)
        except (OSError, ValueError, EOFError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(share,)) for share in shares if share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise CallgrindError(f"{len(errors)} of {len(threads)} connections failed: {errors[0]}")


def _read_answer(sock: socket.socket, buf: bytes) -> bytes:
    """Read one 200 answer with a Content-Length body; returns what came after it."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError("connection closed before the answer")
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ValueError(f"no Content-Length in {head[:200]!r}")
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            raise EOFError("connection closed in the body")
        buf += data
    if status != 200:
        raise ValueError(f"status {status}: {buf[: min(length, 200)]!r}")
    return buf[length:]


def measure(
    url: str,
    counted: Sequence[Counted],
    vgdb_prefix: Path,
    connections: int,
    settings: Settings,
    *,
    log: Callable[[str], None],
) -> Figures:
    """Instructions per request of each COUNTED process for requests to URL at CONNECTIONS
    (the method in the module docstring)."""
    if not 0 < connections <= settings.n1 < settings.n2:
        raise CallgrindError("need 0 < connections <= N1 < N2")
    for proc in counted:
        _vgdb(vgdb_prefix, proc.pid, "instrumentation", "on")

    def segment(requests: int) -> tuple[dict[str, int], float]:
        started = time.monotonic()
        drive(url, requests, connections)
        seconds = time.monotonic() - started
        time.sleep(settings.quiet_s)
        return {proc.role: _dump(vgdb_prefix, proc) for proc in counted}, seconds

    log(f"  warm-up: {settings.warmup} requests")
    segment(settings.warmup)
    log(f"  idle {settings.idle_s:g} s")
    started = time.monotonic()
    time.sleep(settings.idle_s)
    idle = {proc.role: _dump(vgdb_prefix, proc) for proc in counted}
    idle_seconds = time.monotonic() - started
    log(f"  {settings.n1} requests, then {settings.n2}")
    first, first_s = segment(settings.n1)
    second, second_s = segment(settings.n2)
    extra = settings.n2 - settings.n1
    figures = Figures(connections, seconds_per_request=(second_s - first_s) / extra)
    for proc in counted:
        rate = idle[proc.role] / idle_seconds
        figures.idle_per_second[proc.role] = rate
        cost = second[proc.role] - first[proc.role] - rate * (second_s - first_s)
        figures.per_request[proc.role] = cost / extra
    return figures
