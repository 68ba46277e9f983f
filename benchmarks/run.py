#!/usr/bin/env python3
"""Throughput benchmark of tunnel2 against direct, nginx reverse proxy and ``ssh -R`` paths.

One run, loopback only, every phase bounded in time. It starts an nginx backend serving a
small static file, the ``tunnel2 backend`` test server, a tunnel2 relay + agent in front of
the nginx backend, a second nginx as a plain reverse proxy, an OpenSSH reverse tunnel and
``benchmarks/trio_pipe.py`` (the floor of tunnel2's stack: a trio relay and agent that only
carry bytes), then drives each path at each connection count and prints req/s, p50, p99,
mean, errors, the ratio to the direct rate and the CPU microseconds per request of the relay
and agent processes (from ``/proc/PID/stat``). ``--instructions`` then counts the user-space
instructions per request of tunnel2's relay and agent, of the nginx proxy and of the trio
pipe under callgrind (``benchmarks/instructions.py``: the figure that does not swing with
the machine's load).
``--aggressive`` then runs ``tunnel2 loadtest --profile aggressive`` through the tunnel
against the direct backend.

Loads (``--loads``, one or more):

* ``keepalive``: ``wrk --latency``, kept-alive connections, as fast as they go;
* ``close``: ``ab`` without ``-k``, a new connection per request (how the reference
  deployment measured its tunnel);
* ``burst``: ``hey -q`` at a fixed total rate (``--burst-rate``, default 1000 req/s over
  the connection count), bursty arrivals; its figure is the mean latency each path adds
  to the direct one.

These machines are shared and their speed swings by tens of percent within minutes, so
``--rounds N`` measures every path once per round, rounds interleaved, and reports the
median round with each round's figure beside it: compare paths within one run only.

Every process it starts is stopped by PID at the end, also on error, Ctrl-C or SIGTERM.
Only the standard library is used; run it with the interpreter that has tunnel2 installed::

    /path/to/venv/bin/python benchmarks/run.py [--connections 50 100] [--duration 10]
        [--aggressive [--stages 100x10,500x10]] [--markdown benchmarks/RESULTS.md]

Linux only (it reads ``/proc``). Never run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import getpass
import http.client
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn

import instructions

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20.0
"""Seconds any started process gets to report readiness."""
STOP_TIMEOUT = 5.0
"""Seconds a process gets to exit after SIGTERM before SIGKILL."""
STATIC_BODY = b"hello from nginx\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATHS = ("direct", "backend-direct", "tunnel2", "nginx-proxy", "ssh-R", "trio-pipe")
"""Every path, in the order they are measured."""
APT_PACKAGES = {
    "wrk": "wrk",
    "nginx": "nginx-light",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ab": "apache2-utils",
    "hey": "hey",
}
CALLGRIND_PACKAGES = {"valgrind": "valgrind", "vgdb": "valgrind"}


class FatalError(Exception):
    """Setup failed so that nothing useful can be measured."""


class StartError(Exception):
    """A process did not come up; the message says why."""


# --- /proc --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if the process is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of PID in clock ticks, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return int(fields[11]) + int(fields[12])


def descendants(root: int) -> list[int]:
    """Every live descendant of ROOT (scans /proc once)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of PID in KiB from /proc/PID/status."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    if len(values) != 2:
        return None
    return values["VmRSS"], values["VmHWM"]


# --- processes ----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not glibc/musl
    _LIBC = None


def _child_setup() -> None:
    """In the child before exec: die with this script even if it is SIGKILLed."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Proc:
    """One started process; its stdout and stderr go to files in the work directory."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout_text(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr_tail(self, lines: int = 12) -> str:
        try:
            text = self.err.read_text(errors="replace").strip()
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def why_dead(self) -> str:
        tail = self.stderr_tail() or self.stdout_text().strip()[-800:]
        return f"{self.name} exited with status {self.popen.returncode}" + (
            f":\n{tail}" if tail else ""
        )


class Processes:
    """Starts processes and stops every one of them, by PID, at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._live: list[Proc] = []
        self._count = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        inherit_stderr: bool = False,
    ) -> Proc:
        self._count += 1
        stem = f"{self._count:02d}-{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}"
        out, err = self.workdir / f"{stem}.out", self.workdir / f"{stem}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=None if inherit_stderr else stderr,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
                preexec_fn=_child_setup,
            )
        proc = Proc(name, popen, out, err)
        self._live.append(proc)
        return proc

    def run(self, name: str, argv: Sequence[str], timeout: float) -> Proc:
        """Start, wait at most TIMEOUT seconds (then stop it and raise StartError)."""
        proc = self.start(name, argv)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise StartError(f"{name} did not finish within {timeout:g} s") from None
        finally:
            self.stop(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """SIGTERM the process, then its leftover descendants; SIGKILL what outlives that."""
        if proc not in self._live:
            return
        self._live.remove(proc)
        if proc.popen.poll() is not None:
            return
        family = [(pid, _start_time(pid)) for pid in descendants(proc.pid)]
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        # Children the process left behind (sshd sessions, nginx workers if the master died).
        alive = [(pid, start) for pid, start in family if start and _start_time(pid) == start]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, _ in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + (2.0 if sig == signal.SIGTERM else 1.0)
            while alive and time.monotonic() < deadline:
                time.sleep(0.05)
                alive = [(p, s) for p, s in alive if _start_time(p) == s]
            if not alive:
                break

    def stop_named(self, *names: str) -> None:
        for proc in [p for p in self._live if p.name in names]:
            self.stop(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._live)):
            self.stop(proc)


def wait_for_line(proc: Proc, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match[str]:
    """Wait for a stdout line of PROC matching PATTERN (re.MULTILINE)."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        match = regex.search(proc.stdout_text())
        if match:
            return match
        if proc.popen.poll() is not None:
            raise StartError(proc.why_dead())
        if time.monotonic() > deadline:
            raise StartError(
                f"{proc.name} printed no line matching {pattern!r} within {timeout:g} s"
                + (f"; stderr:\n{proc.stderr_tail()}" if proc.stderr_tail() else "")
            )
        time.sleep(0.05)


def wait_for_port(port: int, procs: Sequence[Proc], timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait until 127.0.0.1:PORT accepts connections; fail early if one of PROCS exits."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise StartError(proc.why_dead())
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            raise StartError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def check_url(url: str, expect_body: bytes | None = None) -> None:
    """One GET; StartError unless it answers 200 (with EXPECT_BODY if given)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        raise StartError(f"GET {url}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200 or (expect_body is not None and body != expect_body):
        raise StartError(f"GET {url}: {response.status} {body[:200]!r}")


# --- tools --------------------------------------------------------------------------------


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        candidate = Path(folder) / name
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_tools(*, callgrind: bool = False) -> dict[str, str | None]:
    """Paths of the tools; apt-get installs missing ones when running as root on Debian
    (valgrind only with ``callgrind``)."""
    packages = {**APT_PACKAGES, **(CALLGRIND_PACKAGES if callgrind else {})}
    tools = {name: find_binary(name) for name in packages}
    missing = sorted({packages[name] for name, path in tools.items() if path is None})
    if missing and os.geteuid() == 0 and find_binary("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        # Keep the packages' init scripts from starting system nginx/sshd services.
        policy = Path("/usr/sbin/policy-rc.d")
        created_policy = False
        if not policy.exists():
            with contextlib.suppress(OSError):
                policy.write_text("#!/bin/sh\nexit 101\n")
                policy.chmod(0o755)
                created_policy = True
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, env=env)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", *missing], check=True, timeout=600, env=env
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log(f"apt-get failed: {exc}")
        finally:
            if created_policy:
                policy.unlink(missing_ok=True)
        tools = {name: find_binary(name) for name in packages}
    if callgrind and (tools["valgrind"] is None or tools["vgdb"] is None):
        raise FatalError("--instructions needs valgrind and vgdb (apt-get install valgrind)")
    if tools["wrk"] is None or tools["nginx"] is None:
        raise FatalError(
            "wrk and nginx are required (as root on Debian this script installs them: "
            "apt-get install wrk nginx-light openssh-server)"
        )
    return tools


def version_of(argv: Sequence[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "?"


# --- nginx --------------------------------------------------------------------------------


def _nginx_temp_paths(nginx: str, tmp: Path) -> str:
    """*_temp_path directives for every module this nginx build has (they differ by flavour)."""
    try:
        configure = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.TimeoutExpired):
        configure = ""
    lines = [f"client_body_temp_path {tmp}/client_body;", f"proxy_temp_path {tmp}/proxy;"]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in configure:
            lines.append(f"{module}_temp_path {tmp}/{module};")
    return "\n    ".join(lines)


def start_nginx(
    procs: Processes,
    nginx: str,
    name: str,
    server: Callable[[int], str],
    *,
    wrapper: Sequence[str] = (),
    start_timeout: float = 10.0,
) -> tuple[Proc, int]:
    """Start nginx (master + 1 worker, daemon off) with SERVER(port) in ``http {}``; with a
    WRAPPER command (valgrind), as one process (``master_process off``)."""
    prefix = procs.workdir / name
    prefix.mkdir()
    (prefix / "www").mkdir()
    (prefix / "www" / "index.html").write_bytes(STATIC_BODY)
    temp_paths = _nginx_temp_paths(nginx, prefix)
    last_error = ""
    for _attempt in range(3):
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""worker_processes 1;
daemon off;
{"master_process off;" if wrapper else ""}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    default_type text/plain;
    {temp_paths}
{server(port)}
}}
"""
        )
        proc = procs.start(
            name,
            [*wrapper, nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log"],
        )
        try:
            wait_for_port(port, [proc], timeout=start_timeout)
            return proc, port
        except StartError as exc:
            error_log = prefix / "error.log"
            log_text = error_log.read_text(errors="replace") if error_log.exists() else ""
            last_error = f"{exc}\n{log_text.strip()[-800:]}"
            procs.stop(proc)
            if "Address already in use" not in last_error:
                break
    raise StartError(f"{name} did not start: {last_error}")


def static_server(port: int) -> str:
    return f"""    server {{
        listen 127.0.0.1:{port};
        location / {{
            root www;
            index index.html;
        }}
    }}"""


def proxy_server(backend_port: int) -> Callable[[int], str]:
    def server(port: int) -> str:
        return f"""    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""

    return server


# --- ssh -R -------------------------------------------------------------------------------


@dataclass
class SshTunnel:
    sshd: Proc
    client: Proc
    port: int


def start_ssh_tunnel(
    procs: Processes, tools: dict[str, str | None], backend_port: int
) -> SshTunnel:
    sshd, ssh, keygen = tools["sshd"], tools["ssh"], tools["ssh-keygen"]
    if sshd is None or ssh is None or keygen is None:
        raise StartError("sshd, ssh or ssh-keygen is not installed (openssh-server)")
    folder = procs.workdir / "ssh"
    folder.mkdir(mode=0o700)
    host_key, user_key = folder / "host_ed25519_key", folder / "id_ed25519"
    for key in (host_key, user_key):
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "tunnel2-bench", "-f", str(key)],
            check=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    authorized = folder / "authorized_keys"
    authorized.write_bytes(Path(f"{user_key}.pub").read_bytes())
    authorized.chmod(0o600)
    privsep = Path("/run/sshd")  # sshd refuses to start without it; Debian's unit creates it
    if not privsep.exists() and os.geteuid() == 0:
        privsep.mkdir(mode=0o755, parents=True)
    conf = folder / "sshd_config"
    conf.write_text(
        f"""ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {folder}/sshd.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel INFO
"""
    )
    test = subprocess.run([sshd, "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise StartError(
            f"sshd -t rejects the config (status {test.returncode}): "
            + (test.stdout + test.stderr).strip()
        )
    port = free_port()
    daemon = procs.start("sshd", [sshd, "-D", "-e", "-f", str(conf), "-p", str(port)])
    wait_for_port(port, [daemon])
    rport = free_port()
    client = procs.start(
        "ssh-R",
        [
            ssh,
            "-N",
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(user_key),
            "-p",
            str(port),
            "-R",
            f"{rport}:127.0.0.1:{backend_port}",
            f"{getpass.getuser()}@127.0.0.1",
        ],
    )
    try:
        wait_for_port(rport, [client, daemon])
    except StartError as exc:
        log_tail = daemon.stderr_tail()
        hint = ""
        if "account is locked" in log_tail:
            hint = (
                "\n(with UsePAM no, sshd refuses a user whose password field starts with '!'; "
                "`usermod -p '*' USER` unlocks key logins without setting a password)"
            )
        raise StartError(f"{exc}\nsshd log:\n{log_tail}{hint}") from None
    return SshTunnel(daemon, client, rport)


# --- wrk ----------------------------------------------------------------------------------

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _to_ms(number: str, unit: str) -> float:
    return float(number) * _TIME_UNITS_MS[unit]


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None = None
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    non_2xx: int = 0

    @property
    def errors(self) -> int:
        return (
            self.connect_errors + self.read_errors + self.write_errors + self.timeouts
        ) + self.non_2xx

    def error_text(self) -> str:
        parts = [
            (name, value)
            for name, value in (
                ("connect", self.connect_errors),
                ("read", self.read_errors),
                ("write", self.write_errors),
                ("timeout", self.timeouts),
                ("non-2xx", self.non_2xx),
            )
            if value
        ]
        if not parts:
            return "0"
        return f"{self.errors} (" + ", ".join(f"{n} {v}" for n, v in parts) + ")"


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output; ValueError if the summary lines are missing."""
    summary = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", text, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.MULTILINE)
    if not summary or not rate:
        raise ValueError(f"no summary in wrk output:\n{text.strip()[-800:]}")
    percentiles: dict[str, float] = {}
    _, _, distribution = text.partition("Latency Distribution")
    for match in re.finditer(
        r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", distribution, re.MULTILINE
    ):
        percentiles[f"{float(match.group(1)):g}"] = _to_ms(match.group(2), match.group(3))
    mean = re.search(r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\b", text, re.MULTILINE)
    result = WrkResult(
        requests=int(summary.group(1)),
        seconds=_to_ms(summary.group(2), summary.group(3)) / 1000,
        rps=float(rate.group(1)),
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        mean_ms=_to_ms(mean.group(1), mean.group(2)) if mean else None,
    )
    socket_errors = re.search(
        r"Socket errors:\s*connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        (result.connect_errors, result.read_errors, result.write_errors, result.timeouts) = (
            int(group) for group in socket_errors.groups()
        )
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if non_2xx:
        result.non_2xx = int(non_2xx.group(1))
    return result


def run_wrk(
    procs: Processes,
    wrk: str,
    url: str,
    *,
    threads: int,
    connections: int,
    seconds: int,
    latency: bool = True,
) -> WrkResult:
    argv = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s"]
    if latency:
        argv.append("--latency")
    proc = procs.run("wrk", [*argv, url], timeout=seconds + 20)
    text = proc.stdout_text()
    if proc.popen.returncode != 0:
        raise StartError(proc.why_dead())
    return parse_wrk(text)


def parse_ab(text: str) -> WrkResult:
    """Parse ``ab`` output; ValueError if the summary lines are missing."""
    complete = re.search(r"^Complete requests:\s*(\d+)", text, re.MULTILINE)
    taken = re.search(r"^Time taken for tests:\s*([\d.]+) seconds", text, re.MULTILINE)
    rate = re.search(r"^Requests per second:\s*([\d.]+)", text, re.MULTILINE)
    if not complete or not taken or not rate:
        raise ValueError(f"no summary in ab output:\n{text.strip()[-800:]}")
    percentiles = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^\s*(\d+)%\s+(\d+)", text, re.MULTILINE)
    }
    mean = re.search(r"^Time per request:\s*([\d.]+) \[ms\] \(mean\)$", text, re.MULTILINE)
    failed = re.search(r"^Failed requests:\s*(\d+)", text, re.MULTILINE)
    non_2xx = re.search(r"^Non-2xx responses:\s*(\d+)", text, re.MULTILINE)
    return WrkResult(
        requests=int(complete.group(1)),
        seconds=float(taken.group(1)),
        rps=float(rate.group(1)),
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        # ab's first "Time per request" is per concurrent request: the latency.
        mean_ms=float(mean.group(1)) if mean else None,
        read_errors=int(failed.group(1)) if failed else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def parse_hey(text: str) -> WrkResult:
    """Parse ``hey`` output; ValueError if the summary lines are missing."""
    total = re.search(r"^\s*Total:\s*([\d.]+) secs", text, re.MULTILINE)
    rate = re.search(r"^\s*Requests/sec:\s*([\d.]+)", text, re.MULTILINE)
    mean = re.search(r"^\s*Average:\s*([\d.]+) secs", text, re.MULTILINE)
    if not total or not rate or not mean:
        raise ValueError(f"no summary in hey output:\n{text.strip()[-800:]}")
    percentiles = {
        m.group(1): float(m.group(2)) * 1000
        for m in re.finditer(r"^\s*(\d+)% in ([\d.]+) secs", text, re.MULTILINE)
    }
    codes = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^\s*\[(\d+)\]\s+(\d+) responses", text, re.MULTILINE)
    }
    _, _, error_part = text.partition("Error distribution:")
    errors = sum(int(m.group(1)) for m in re.finditer(r"^\s*\[(\d+)\]", error_part, re.M))
    return WrkResult(
        requests=sum(codes.values()),
        seconds=float(total.group(1)),
        rps=float(rate.group(1)),
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        mean_ms=float(mean.group(1)) * 1000,
        read_errors=errors,
        non_2xx=sum(n for code, n in codes.items() if not 200 <= code < 400),
    )


def run_load(
    procs: Processes,
    tools: dict[str, str | None],
    load: str,
    url: str,
    connections: int,
    args: argparse.Namespace,
) -> WrkResult:
    """Drive ``url`` with ``load`` for ``args.duration`` seconds."""
    seconds = args.duration
    tool = {"keepalive": "wrk", "close": "ab", "burst": "hey"}[load]
    if tools[tool] is None:
        raise StartError(f"{tool} is not installed (apt-get install {APT_PACKAGES[tool]})")
    if load == "keepalive":
        return run_wrk(
            procs,
            tools["wrk"] or "wrk",
            url,
            threads=args.threads,
            connections=connections,
            seconds=seconds,
        )
    if load == "close":
        # -n is a ceiling that -t reaches first; -r: a failed receive is counted, not fatal.
        argv = [str(tools["ab"]), "-q", "-r", "-s", "10", "-c", str(connections)]
        argv += ["-t", str(seconds), "-n", "100000000", url]
        proc = procs.run("ab", argv, timeout=seconds + 30)
        if proc.popen.returncode != 0:
            raise StartError(proc.why_dead())
        return parse_ab(proc.stdout_text())
    per_worker = max(args.burst_rate / connections, 1.0)
    argv = [str(tools["hey"]), "-z", f"{seconds}s", "-c", str(connections)]
    argv += ["-q", f"{per_worker:g}", "-t", "10", url]
    proc = procs.run("hey", argv, timeout=seconds + 30)
    if proc.popen.returncode != 0:
        raise StartError(proc.why_dead())
    return parse_hey(proc.stdout_text())


# --- measurement --------------------------------------------------------------------------


@dataclass
class Target:
    """A URL to drive, and the processes whose CPU counts as relay / agent for it."""

    name: str
    url: str
    roles: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    """role -> PID whose VmRSS/VmHWM is reported after each run."""


@dataclass
class Row:
    path: str
    result: WrkResult | None = None
    failure: str | None = None
    cpu_us: dict[str, float] = field(default_factory=dict)
    cpu_percent: dict[str, float] = field(default_factory=dict)
    """Share of one CPU the role's processes used during the measured window."""
    memory: dict[str, tuple[int, int]] = field(default_factory=dict)
    rounds: list[float] = field(default_factory=list)
    """With --rounds: this path's figure in each round (req/s, or mean ms for burst)."""


def _snapshot(pids: list[int]) -> dict[int, int]:
    ticks = {pid: cpu_ticks(pid) for pid in pids}
    return {pid: value for pid, value in ticks.items() if value is not None}


def measure(
    procs: Processes,
    tools: dict[str, str | None],
    load: str,
    target: Target,
    connections: int,
    args: argparse.Namespace,
) -> Row:
    row = Row(target.name)
    try:
        if args.warmup > 0:
            run_wrk(
                procs,
                tools["wrk"] or "wrk",
                target.url,
                threads=args.threads,
                connections=connections,
                seconds=args.warmup,
                latency=False,
            )
        before = {role: _snapshot(pids()) for role, pids in target.roles.items()}
        started = time.monotonic()
        result = run_load(procs, tools, load, target.url, connections, args)
        after = {role: _snapshot(pids()) for role, pids in target.roles.items()}
        window = time.monotonic() - started
    except (StartError, ValueError) as exc:
        row.failure = str(exc)
        return row
    row.result = result
    for role in target.roles:
        ticks = sum(now - before[role].get(pid, 0) for pid, now in after[role].items())
        row.cpu_percent[role] = ticks / CLK_TCK / window * 100
        if result.requests:
            row.cpu_us[role] = ticks / CLK_TCK * 1e6 / result.requests
    for role, pid in target.memory.items():
        memory = memory_kib(pid)
        if memory:
            row.memory[role] = memory
    return row


# --- output -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def fmt_cpu(row: Row, role: str) -> str:
    value = row.cpu_us.get(role)
    return "-" if value is None else f"{value:.0f}"


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    out = []
    for r in [headers, *rows]:
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def results_table(rows: list[Row], markdown: bool, *, burst: bool = False) -> str:
    direct = next((r.result for r in rows if r.path == "direct" and r.result), None)
    headers = [
        "path",
        "req/s",
        "p50 ms",
        "p99 ms",
        "mean ms",
        "added mean ms" if burst else "vs direct",
        "errors",
        "relay CPU µs/req",
        "agent CPU µs/req",
    ]
    if any(len(row.rounds) > 1 for row in rows):
        headers.append("each round (mean ms)" if burst else "each round (req/s)")
    body = []
    for row in rows:
        if row.result is None:
            body.append([row.path, "failed", *["-"] * (len(headers) - 2)])
            continue
        result = row.result
        if burst:
            added = (
                f"{result.mean_ms - direct.mean_ms:+.2f}"
                if direct and direct.mean_ms is not None and result.mean_ms is not None
                else "-"
            )
        else:
            added = f"{result.rps / direct.rps:.3f}" if direct and direct.rps else "-"
        cells = [
            row.path,
            f"{result.rps:,.0f}",
            fmt_ms(result.p50_ms),
            fmt_ms(result.p99_ms),
            fmt_ms(result.mean_ms),
            added,
            result.error_text(),
            fmt_cpu(row, "relay"),
            fmt_cpu(row, "agent"),
        ]
        if len(headers) > len(cells):
            cells.append(" / ".join(fmt_ms(v) if burst else f"{v:,.0f}" for v in row.rounds))
        body.append(cells)
    return render(headers, body, markdown)


def tunnel2_table(results: dict[str, list[Row]], markdown: bool) -> str:
    headers = [
        "load",
        "req/s",
        "entry CPU µs/req",
        "agent CPU µs/req",
        "entry / agent CPU %",
        "entry RSS / HWM MiB",
        "agent RSS / HWM MiB",
    ]
    body = []
    for label, rows in results.items():
        for row in rows:
            if row.path != "tunnel2" or row.result is None:
                continue
            memory = [
                f"{row.memory[role][0] / 1024:.1f} / {row.memory[role][1] / 1024:.1f}"
                if role in row.memory
                else "-"
                for role in ("relay", "agent")
            ]
            body.append(
                [
                    label,
                    f"{row.result.rps:,.0f}",
                    fmt_cpu(row, "relay"),
                    fmt_cpu(row, "agent"),
                    " / ".join(f"{row.cpu_percent.get(r, 0):.0f}" for r in ("relay", "agent")),
                    *memory,
                ]
            )
    return render(headers, body, markdown) if body else ""


def machine_info(tools: dict[str, str | None], args: argparse.Namespace) -> list[str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                model = value.strip()
                break
    try:
        version = importlib.metadata.version("tunnel2")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    commit = version_of(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], r"(\w+)")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    wrk = version_of([tools["wrk"] or "wrk", "-v"], r"wrk (\S+)")
    nginx = version_of([tools["nginx"] or "nginx", "-v"], r"nginx/(\S+)")
    ssh = version_of([tools["ssh"] or "ssh", "-V"], r"(OpenSSH_\S+)")
    now = datetime.datetime.now(datetime.UTC)
    return [
        f"date: {now:%Y-%m-%d %H:%M} UTC",
        f"machine: nproc {len(os.sched_getaffinity(0))} (of {os.cpu_count()}), {model}",
        f"kernel: {platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"load average at start: {load}",
        f"tunnel2 {version} (git {commit}); wrk {wrk}; nginx {nginx}; {ssh}",
        "method: callgrind only (--instructions-only); loopback; all processes on this machine"
        if args.instructions_only
        else f"method: {args.duration} s per path and load (keepalive: wrk -t{args.threads} "
        f"-cN --latency; close: ab -cN without -k; burst: hey -cN -q at {args.burst_rate:g} "
        f"req/s in all) after a {args.warmup} s unmeasured wrk warm-up; {args.rounds} round(s), "
        "paths interleaved in each, the median round shown; loopback; all processes on this "
        "machine",
    ]


# --- the run ------------------------------------------------------------------------------


@dataclass
class Stack:
    """What :func:`setup` started: the paths to measure and what was skipped."""

    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    backend_url: str | None = None
    """The tunnel2 backend's /loadtest/ping, direct."""
    relay: Proc | None = None
    relay_url: str | None = None
    tunnel2_failed: bool = False
    aggressive_url: str | None = None
    """tunnel2 public URL of the tunnel2 backend's /loadtest/ping."""
    aggressive_pids: list[int] = field(default_factory=list)
    backend_port: int | None = None
    """The nginx backend every path leads to."""

    def note(self, text: str) -> None:
        """Log TEXT in full; the report gets its first and last lines."""
        log(text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) > 3:
            lines = [lines[0], "...", *lines[-2:]]
        self.notes.append(" ".join(lines))


def start_tunnel2(
    procs: Processes, python: str, target_port: int, stack: Stack
) -> tuple[Proc, Proc, str]:
    """Start the relay (once) and an agent for TARGET_PORT; returns relay, agent, public URL."""
    if stack.relay is None or stack.relay_url is None:
        relay = procs.start(
            "tunnel2-server", [python, "-m", "tunnel2.cli", "server", "--port", "0", "-q"], cwd=REPO
        )
        stack.relay = relay
        stack.relay_url = wait_for_line(relay, r"^tunnel2 relay on (http://\S+)").group(1)
    agent = procs.start(
        f"tunnel2-http-{target_port}",
        [python, "-m", "tunnel2.cli", "http", str(target_port), "--server", stack.relay_url, "-q"],
        cwd=REPO,
    )
    public_url = wait_for_line(agent, r"^Forwarding (\S+) -> \S+$").group(1)
    return stack.relay, agent, public_url


def start_trio_pipe(
    procs: Processes,
    python: str,
    backend_port: int,
    *,
    suffix: str = "",
    wrap: Callable[[str], list[str]] = lambda role: [],
    timeout: float = STARTUP_TIMEOUT,
) -> tuple[Proc, Proc, str]:
    """Start benchmarks/trio_pipe.py's relay and agent (each under WRAP(role)) in front of
    BACKEND_PORT; returns relay, agent, public URL. Both are stopped by PROCS at the end."""
    pipe = str(REPO / "benchmarks" / "trio_pipe.py")
    relay = procs.start(f"trio-pipe-relay{suffix}", [*wrap("relay"), python, pipe, "relay"])
    ports = wait_for_line(relay, r"^relay public (\d+) agent (\d+)$", timeout)
    agent = procs.start(
        f"trio-pipe-agent{suffix}",
        [*wrap("agent"), python, pipe, "agent", ports.group(2), str(backend_port)],
    )
    return relay, agent, f"http://127.0.0.1:{ports.group(1)}/"


def setup(procs: Processes, tools: dict[str, str | None], args: argparse.Namespace) -> Stack:
    """Start the backends and every requested path; failures of optional paths become notes."""
    stack = Stack()
    wanted = set(args.paths)
    nginx = tools["nginx"]
    assert nginx is not None
    log("starting the nginx backend")
    try:
        _, backend_port = start_nginx(procs, nginx, "nginx-backend", static_server)
        check_url(f"http://127.0.0.1:{backend_port}/", STATIC_BODY)
    except StartError as exc:
        raise FatalError(str(exc)) from None
    stack.backend_port = backend_port
    if "direct" in wanted:
        stack.targets.append(Target("direct", f"http://127.0.0.1:{backend_port}/"))

    if "backend-direct" in wanted or args.aggressive:
        log("starting tunnel2 backend")
        backend = procs.start(
            "tunnel2-backend",
            [args.python, "-m", "tunnel2.cli", "backend", "--port", "0"],
            cwd=REPO,
        )
        try:
            base = wait_for_line(backend, r"listening on (http://\S+)").group(1)
            check_url(f"{base}/loadtest/ping")
            stack.backend_url = f"{base}/loadtest/ping"
            if "backend-direct" in wanted:
                stack.targets.append(Target("backend-direct", stack.backend_url))
        except StartError as exc:
            stack.note(f"backend-direct skipped: `tunnel2 backend` did not start: {exc}")
            procs.stop(backend)

    if "tunnel2" in wanted or args.aggressive:
        log("starting tunnel2 relay and agent")
        try:
            relay, agent, public_url = start_tunnel2(procs, args.python, backend_port, stack)
            check_url(public_url, STATIC_BODY)
            if "tunnel2" in wanted:
                stack.targets.append(
                    Target(
                        "tunnel2",
                        public_url,
                        roles={"relay": lambda: [relay.pid], "agent": lambda: [agent.pid]},
                        memory={"relay": relay.pid, "agent": agent.pid},
                    )
                )
        except StartError as exc:
            stack.tunnel2_failed = True
            stack.note(f"tunnel2 FAILED: {exc}")

    if "nginx-proxy" in wanted:
        log("starting the nginx reverse proxy")
        try:
            proxy, proxy_port = start_nginx(procs, nginx, "nginx-proxy", proxy_server(backend_port))
            proxy_url = f"http://127.0.0.1:{proxy_port}/"
            check_url(proxy_url, STATIC_BODY)
            stack.targets.append(
                Target("nginx-proxy", proxy_url, roles={"relay": lambda: tree(proxy.pid)})
            )
        except StartError as exc:
            stack.note(f"nginx-proxy skipped: {exc}")

    if "ssh-R" in wanted:
        log("starting sshd and ssh -R")
        try:
            ssh = start_ssh_tunnel(procs, tools, backend_port)
            ssh_url = f"http://127.0.0.1:{ssh.port}/"
            check_url(ssh_url, STATIC_BODY)
            stack.targets.append(
                Target(
                    "ssh-R",
                    ssh_url,
                    roles={"relay": lambda: tree(ssh.sshd.pid), "agent": lambda: [ssh.client.pid]},
                )
            )
        except (StartError, subprocess.SubprocessError, OSError) as exc:
            stack.note(f"ssh-R skipped: {exc}")
            procs.stop_named("ssh-R", "sshd")

    if "trio-pipe" in wanted:
        log("starting the trio byte pipe (benchmarks/trio_pipe.py: the floor of the stack)")
        try:
            pipe_relay, pipe_agent, pipe_url = start_trio_pipe(procs, args.python, backend_port)
            check_url(pipe_url, STATIC_BODY)
            stack.targets.append(
                Target(
                    "trio-pipe",
                    pipe_url,
                    roles={"relay": lambda: [pipe_relay.pid], "agent": lambda: [pipe_agent.pid]},
                )
            )
        except StartError as exc:
            stack.note(f"trio-pipe skipped: {exc}")

    if args.aggressive:
        port = urllib.parse.urlsplit(stack.backend_url or "").port
        if port is None or stack.relay is None or stack.tunnel2_failed:
            stack.note("--aggressive skipped: it needs the tunnel2 backend and relay")
        else:
            log("starting a second tunnel2 agent, to the tunnel2 backend")
            try:
                relay, agent2, public2 = start_tunnel2(procs, args.python, port, stack)
                check_url(public2 + "loadtest/ping")
                stack.aggressive_url = public2 + "loadtest/ping"
                stack.aggressive_pids = [relay.pid, agent2.pid]
            except StartError as exc:
                stack.note(f"--aggressive skipped: its agent did not start: {exc}")
    return stack


# --- instructions per request (callgrind) ----------------------------------------------------


@dataclass
class InstructionRow:
    path: str
    figures: instructions.Figures | None = None
    failure: str | None = None


def run_instructions(
    procs: Processes, tools: dict[str, str | None], args: argparse.Namespace, stack: Stack
) -> list[InstructionRow]:
    """Count instructions per request of tunnel2 (relay + agent) and the nginx proxy under
    callgrind, at each of ``--instr-connections``; fresh processes, stopped afterwards."""
    assert stack.backend_port is not None
    settings = instructions.Settings()
    cg_dir = procs.workdir / "callgrind"
    cg_dir.mkdir(exist_ok=True)
    cg_dir.chmod(0o1777)  # nginx writes its dumps as the worker user
    vgdb_prefix = cg_dir / "vgdb"
    rows: list[InstructionRow] = []

    def wrap(role: str) -> list[str]:
        return instructions.valgrind_argv(cg_dir, vgdb_prefix, role)

    def counted(role: str, proc: Proc) -> instructions.Counted:
        return instructions.Counted(role, proc.pid, cg_dir / f"{role}.{proc.pid}")

    def measure_path(path: str, url: str, processes: list[instructions.Counted]) -> None:
        for connections in args.instr_connections:
            log(f"callgrind: {path}, C={connections}")
            row = InstructionRow(f"{path}, C={connections}")
            try:
                row.figures = instructions.measure(
                    url, processes, vgdb_prefix, connections, settings, log=log
                )
            except instructions.CallgrindError as exc:
                row.failure = str(exc)
                stack.note(f"callgrind: {row.path} failed: {exc}")
            rows.append(row)

    if "tunnel2" in args.paths:
        log("starting tunnel2 relay and agent under callgrind")
        started: list[Proc] = []
        try:
            relay = procs.start(
                "tunnel2-server-callgrind",
                [*wrap("relay"), args.python, "-m", "tunnel2.cli", "server", "--port", "0", "-q"],
                cwd=REPO,
            )
            started.append(relay)
            relay_url = wait_for_line(
                relay, r"^tunnel2 relay on (http://\S+)", instructions.START_TIMEOUT
            ).group(1)
            agent = procs.start(
                "tunnel2-http-callgrind",
                [
                    *wrap("agent"),
                    args.python,
                    "-m",
                    "tunnel2.cli",
                    "http",
                    str(stack.backend_port),
                    "--server",
                    relay_url,
                    "-q",
                ],
                cwd=REPO,
            )
            started.append(agent)
            url = wait_for_line(
                agent, r"^Forwarding (\S+) -> \S+$", instructions.START_TIMEOUT
            ).group(1)
            measure_path("tunnel2", url, [counted("relay", relay), counted("agent", agent)])
        except StartError as exc:
            rows.append(InstructionRow("tunnel2", failure=str(exc)))
            stack.note(f"callgrind: tunnel2 did not start: {exc}")
        finally:
            for proc in reversed(started):
                procs.stop(proc)

    if "trio-pipe" in args.paths:
        log("starting the trio byte pipe under callgrind")
        try:
            relay, agent, url = start_trio_pipe(
                procs,
                args.python,
                stack.backend_port,
                suffix="-callgrind",
                wrap=wrap,
                timeout=instructions.START_TIMEOUT,
            )
        except StartError as exc:
            rows.append(InstructionRow("trio-pipe", failure=str(exc)))
            stack.note(f"callgrind: trio-pipe did not start: {exc}")
            procs.stop_named("trio-pipe-relay-callgrind", "trio-pipe-agent-callgrind")
        else:
            try:
                measure_path("trio-pipe", url, [counted("relay", relay), counted("agent", agent)])
            finally:
                procs.stop(agent)
                procs.stop(relay)

    if "nginx-proxy" in args.paths:
        log("starting the nginx reverse proxy under callgrind")
        nginx = tools["nginx"]
        assert nginx is not None
        try:
            proxy, port = start_nginx(
                procs,
                nginx,
                "nginx-proxy-callgrind",
                proxy_server(stack.backend_port),
                wrapper=wrap("nginx"),
                start_timeout=instructions.START_TIMEOUT,
            )
        except StartError as exc:
            rows.append(InstructionRow("nginx-proxy", failure=str(exc)))
            stack.note(f"callgrind: nginx-proxy did not start: {exc}")
        else:
            try:
                measure_path("nginx-proxy", f"http://127.0.0.1:{port}/", [counted("nginx", proxy)])
            finally:
                procs.stop(proxy)
    return rows


def instructions_table(rows: list[InstructionRow], markdown: bool) -> str:
    headers = [
        "path, connections",
        "relay instr/req",
        "agent instr/req",
        "total instr/req",
        "idle relay / agent Ir/s",
        "ms/req under valgrind",
    ]
    body = []
    for row in rows:
        figures = row.figures
        if figures is None:
            body.append([row.path, "failed", *["-"] * (len(headers) - 2)])
            continue
        per = figures.per_request
        relay = per.get("relay", per.get("nginx"))
        agent = per.get("agent")
        idle = [figures.idle_per_second.get(r) for r in ("relay", "agent")]
        if "nginx" in per:
            idle[0] = figures.idle_per_second["nginx"]
        body.append(
            [
                row.path,
                "-" if relay is None else f"{relay:,.0f}",
                "-" if agent is None else f"{agent:,.0f}",
                f"{sum(per.values()):,.0f}",
                " / ".join("-" if v is None else f"{v:,.0f}" for v in idle),
                f"{figures.seconds_per_request * 1000:.1f}",
            ]
        )
    return render(headers, body, markdown)


def stage_seconds(stages: str | None) -> float:
    """Seconds one URL takes under ``--stages`` (or the aggressive profile: 6 x 30 s)."""
    if not stages:
        return 180.0
    return sum(float(seconds) for seconds in re.findall(r"x\s*([\d.]+)", stages))


def run_aggressive(procs: Processes, args: argparse.Namespace, stack: Stack) -> tuple[int, str]:
    """Run ``tunnel2 loadtest`` through the tunnel vs direct; returns its status and report."""
    assert stack.aggressive_url is not None
    assert stack.backend_url is not None
    json_path = args.aggressive_json or procs.workdir / "aggressive.json"
    argv = [
        args.python,
        "-m",
        "tunnel2.cli",
        "loadtest",
        "--profile",
        "aggressive",
        stack.aggressive_url,
        "--compare",
        stack.backend_url,
        "--json",
        str(json_path),
    ]
    if args.stages:
        argv += ["--stages", args.stages]
    for pid in stack.aggressive_pids:
        argv += ["--watch-pid", str(pid)]
    timeout = 2 * stage_seconds(args.stages) + 180
    log(f"running {' '.join(argv[1:])} (at most {timeout:.0f} s)")
    proc = procs.start("loadtest", argv, cwd=REPO, inherit_stderr=True)
    try:
        status = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        status = -1
    finally:
        procs.stop(proc)
    report = proc.stdout_text()
    if status == -1:
        report += f"\n(loadtest did not finish within {timeout:.0f} s and was stopped)\n"
    elif status == 1:
        report += "\n(loadtest exit status 1: a threshold was breached, see above)\n"
    elif status != 0:
        report += f"\n(loadtest exit status {status})\n"
    if args.aggressive_json:
        report += f"\nJSON report: {json_path}\n"
    return status, report


def build_report(
    info: list[str],
    results: dict[str, list[Row]],
    notes: list[str],
    markdown: bool,
    instruction_rows: list[InstructionRow] | None = None,
) -> str:
    out: list[str] = []
    if markdown:
        out += ["## tunnel2 benchmark (benchmarks/run.py)", ""]
        out += [f"- {line}" for line in info]
    else:
        out += ["tunnel2 benchmark", *info]
    for label, rows in results.items():
        table = results_table(rows, markdown, burst=label.startswith("burst"))
        out += ["", f"### {label}" if markdown else f"{label}:"]
        out += ["", table] if markdown else [table]
    t2 = tunnel2_table(results, markdown)
    if t2:
        title = "tunnel2 entry (relay) and agent: CPU per request, memory after the run"
        out += ["", f"### {title}" if markdown else f"{title}:"]
        out += ["", t2] if markdown else [t2]
    if instruction_rows:
        title = "instructions per request (callgrind, user space, keep-alive)"
        table = instructions_table(instruction_rows, markdown)
        out += ["", f"### {title}" if markdown else f"{title}:"]
        out += ["", table] if markdown else [table]
    wall_clock = [
        "relay CPU: tunnel2 entry process / nginx proxy (master+worker) / sshd (listener+session); "
        "agent CPU: tunnel2 agent / ssh client; utime+stime over the measured window divided by "
        "the requests wrk completed. The backend's and wrk's CPU are not counted.",
        "CPU %: share of one core during the measured window (100 = one core saturated).",
        "errors: socket errors (wrk: connect, read, write, timeout; ab: failed requests; "
        "hey: errors) + non-2xx/3xx responses.",
        "loads: keepalive = wrk on kept-alive connections; close = ab without -k, a new "
        "connection per request; burst = hey -q at a fixed total rate, added mean ms = the "
        "path's mean latency minus direct's.",
    ]
    legend = [
        *(wall_clock if results else []),
        *(
            [
                "instructions: callgrind's Ir of each process between dumps, (N2 segment - N1 "
                "segment - idle rate x their time difference) / (N2 - N1), N1=300 and N2=1500 "
                "keep-alive requests over C fresh connections (benchmarks/instructions.py); "
                "user space only, the kernel's work in system calls is not in it; the nginx "
                "proxy's figure is in the relay column."
            ]
            if instruction_rows
            else []
        ),
        *notes,
    ]
    out += [""]
    out += [f"- {line}" if markdown else f"* {line}" for line in legend]
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace, procs: Processes) -> int:
    tools = ensure_tools(callgrind=args.instructions)
    info = machine_info(tools, args)
    for line in info:
        log(line)
    stack = setup(procs, tools, args)
    per_run = args.warmup + args.duration
    loads = [] if args.instructions_only else args.loads
    estimate = len(stack.targets) * len(args.connections) * len(loads) * per_run
    log(
        f"measuring {', '.join(t.name for t in stack.targets)} with {' '.join(args.loads)} at "
        f"{' '.join(map(str, args.connections))} connections, {args.rounds} round(s): "
        f"about {estimate * args.rounds} s"
    )
    measured: dict[str, dict[str, list[Row]]] = {}
    failed = stack.tunnel2_failed
    for round_number in range(1, args.rounds + 1):  # rounds interleaved: each path once
        for load in loads:
            for connections in args.connections:
                label = f"{load}, {connections} connections"
                if load == "burst":
                    label += f" at {args.burst_rate:g} req/s"
                for target in stack.targets:
                    log(f"round {round_number}: {target.name}, {label} ({target.url})")
                    row = measure(procs, tools, load, target, connections, args)
                    measured.setdefault(label, {}).setdefault(target.name, []).append(row)
                    if row.result is None:
                        failed = True
                        stack.note(f"{target.name}, {label} failed: {row.failure}")
                    else:
                        log(
                            f"  {row.result.rps:,.0f} req/s, p50 {fmt_ms(row.result.p50_ms)} "
                            f"ms, mean {fmt_ms(row.result.mean_ms)} ms, errors "
                            f"{row.result.error_text()}"
                        )
    results = {
        label: [median_row(rows, burst=label.startswith("burst")) for rows in by_path.values()]
        for label, by_path in measured.items()
    }
    instruction_rows = run_instructions(procs, tools, args, stack) if args.instructions else []
    failed = failed or any(row.figures is None for row in instruction_rows)
    info.append("load average at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print()
    print(build_report(info, results, stack.notes, False, instruction_rows), flush=True)
    markdown = build_report(info, results, stack.notes, True, instruction_rows)
    if args.markdown:
        args.markdown.write_text(markdown)
        log(f"wrote {args.markdown}")
    if stack.aggressive_url:
        status, report = run_aggressive(procs, args, stack)
        print("\ntunnel2 loadtest --profile aggressive, through tunnel2 vs direct:")
        print(report, flush=True)
        if args.markdown:
            title = "### tunnel2 loadtest --profile aggressive (through tunnel2 vs direct)"
            args.markdown.write_text(f"{markdown}\n{title}\n\n```text\n{report.rstrip()}\n```\n")
        failed = failed or status not in (0, 1)
    return 1 if failed else 0


def median_row(rows: list[Row], *, burst: bool) -> Row:
    """The median round of one path (by req/s, or by mean latency for bursts), with every
    round's figure in ``rounds``; a failed round makes the whole row failed."""
    failed = next((row for row in rows if row.result is None), None)
    if failed is not None:
        return failed

    def figure(row: Row) -> float:
        assert row.result is not None
        return (row.result.mean_ms or 0.0) if burst else row.result.rps

    ordered = sorted(rows, key=figure)
    median = ordered[(len(ordered) - 1) // 2]
    median.rounds = [figure(row) for row in rows]
    return median


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark tunnel2 against direct, an nginx reverse proxy and ssh -R "
        "(wrk on loopback). Prints req/s, p50/p99, errors, ratio to direct and CPU µs per "
        "request of the relay and agent."
    )
    parser.add_argument(
        "--connections",
        type=_positive_int,
        nargs="+",
        default=[50, 100],
        metavar="N",
        help="wrk connection counts (default: 50 100)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_int,
        default=10,
        metavar="S",
        help="measured seconds per path and connection count (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        metavar="S",
        help="unmeasured warm-up seconds before each measurement (default 2; 0: none)",
    )
    parser.add_argument("--threads", type=_positive_int, default=2, help="wrk threads (2)")
    parser.add_argument(
        "--loads",
        nargs="+",
        choices=("keepalive", "close", "burst"),
        default=["keepalive"],
        metavar="LOAD",
        help="keepalive (wrk), close (ab without -k: a connection per request), burst "
        "(hey -q at --burst-rate); default keepalive",
    )
    parser.add_argument(
        "--burst-rate",
        type=float,
        default=1000.0,
        metavar="REQ/S",
        help="total request rate of the burst load, shared by the connections (default 1000)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        metavar="N",
        help="measure every path N times, rounds interleaved; report the median (default 1)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=list(PATHS),
        metavar="PATH",
        help=f"paths to measure (default all: {' '.join(PATHS)})",
    )
    parser.add_argument(
        "--aggressive",
        action="store_true",
        help="then run `tunnel2 loadtest --profile aggressive` through tunnel2 against the "
        "tunnel2 backend, compared with the backend direct (~6 min)",
    )
    parser.add_argument(
        "--stages",
        metavar="RATExSECONDS,...",
        help="with --aggressive: passed to tunnel2 loadtest --stages (e.g. 100x5,500x5)",
    )
    parser.add_argument(
        "--aggressive-json",
        type=Path,
        metavar="FILE",
        help="with --aggressive: keep the loadtest's JSON report here",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="then count user-space instructions per request under callgrind (tunnel2 relay "
        "and agent, nginx proxy; needs valgrind; ~1.5 min per path and connection count)",
    )
    parser.add_argument(
        "--instructions-only",
        action="store_true",
        help="--instructions without the wall-clock loads",
    )
    parser.add_argument(
        "--instr-connections",
        type=_positive_int,
        nargs="+",
        default=[1, 10],
        metavar="C",
        help="with --instructions: concurrent keep-alive connections (default: 1 10)",
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="FILE", help="also write the results as Markdown"
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs tunnel2 (default: this one)",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the temp dir (configs, process logs)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.instructions_only:
        args.instructions = True
    if max(args.instr_connections) > instructions.Settings().n1:
        parser.error(f"--instr-connections must be at most {instructions.Settings().n1}")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("benchmarks/run.py needs Linux (/proc)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="tunnel2-bench-"))
    workdir.chmod(0o755)  # nginx workers (user nobody) read the static file under it
    procs = Processes(workdir)
    try:
        return run(args, procs)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except FatalError as exc:
        log(f"error: {exc}")
        return 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        if args.keep_temp:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
