"""Resource use of processes, read from ``/proc`` (Linux): CPU %, RSS and threads.

Layer: load-test kit, bottom. Imports the standard library and attrs only; no trio, so the
sampling loop lives in :mod:`tunnel2.loadtest.loadgen` and this module stays plain functions.

CPU % is ``(utime + stime)`` ticks consumed between two readings over the wall time between
them, so 100 % is one core fully busy and two busy cores read 200 %.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Final, final

import attrs

__all__ = ["ProcReading", "cpu_percent", "own_cpu_seconds", "read_process"]

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


@final
@attrs.frozen
class ProcReading:
    """One reading of a process.

    Attributes:
        pid: the process id.
        name: the process name (``comm``) and the start of its command line.
        monotonic: ``time.monotonic()`` when read.
        cpu_seconds: user + system CPU time consumed since the process started.
        rss_bytes: resident set size.
        threads: number of threads.
    """

    pid: int
    name: str
    monotonic: float
    cpu_seconds: float
    rss_bytes: int
    threads: int


def read_process(pid: int) -> ProcReading | None:
    """Read ``/proc/PID/stat``; return ``None`` if the process is gone or unreadable.

    Does not block beyond the read of two small procfs files.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(400)
    except OSError:
        return None
    now = time.monotonic()
    # comm may contain spaces and parentheses: it ends at the last ")".
    close = stat.rfind(b")")
    comm = stat[stat.find(b"(") + 1 : close].decode(errors="replace")
    rest = stat[close + 2 :].split()
    # Fields after comm (proc(5)): state=0 ... utime=11 stime=12 ... num_threads=17 ... rss=21.
    utime, stime = int(rest[11]), int(rest[12])
    return ProcReading(
        pid=pid,
        name=_name(comm, cmdline),
        monotonic=now,
        cpu_seconds=(utime + stime) / _CLK_TCK,
        rss_bytes=int(rest[21]) * _PAGE_SIZE,
        threads=int(rest[17]),
    )


def _name(comm: str, cmdline: bytes) -> str:
    """``comm``, or the command line without the interpreter and paths (``tunnel2 http 80``)."""
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    if args and os.path.basename(args[0]).startswith("python") and len(args) > 1:
        args = args[1:]
        if args[0] == "-m" and len(args) > 1:
            args = args[1:]
    if not args:
        return comm
    text = " ".join([os.path.basename(args[0]), *args[1:]])
    return text if len(text) <= 80 else text[:77] + "..."


def cpu_percent(before: ProcReading, after: ProcReading) -> float:
    """Return the CPU % used between two readings of the same process (100 = one core)."""
    wall = after.monotonic - before.monotonic
    if wall <= 0:
        return 0.0
    return max(0.0, (after.cpu_seconds - before.cpu_seconds) / wall * 100.0)


def own_cpu_seconds() -> float:
    """Return the user + system CPU seconds this process has used (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
