#!/usr/bin/env python3
"""Which asyncio bridge should tunnel2.aio use? Measures both against the plain trio API.

One run on 127.0.0.1. A relay (``tunnel2.start_relay``) and the ``tunnel2 backend`` test
server run in subprocesses; this process runs only the agent, three ways:

- ``trio``: ``trio.run`` + :func:`tunnel2.open_tunnel` (the baseline);
- ``thread``: ``asyncio.run`` + :func:`tunnel2.aio.open_tunnel` (trio in a thread the block
  owns; futures completed on the loop with ``call_soon_threadsafe``);
- ``guest``: ``asyncio.run`` + trio guest mode (``trio.lowlevel.start_guest_run`` on the
  running loop) around :func:`tunnel2.open_tunnel`.

A client subprocess sends ``--requests`` sequential keep-alive GETs through the tunnel
(the same client for every mode), and this process's CPU time per request (the agent
side, from ``getrusage``) and the client's requests/s are printed, as medians over
``--repeats`` interleaved rounds, with ratios to ``trio``. Then the loop-blocking failure
mode: while the asyncio loop is blocked for ``--block`` seconds (``time.sleep`` in a
callback), how many of the client's requests completed, and the longest one took.

Every subprocess is stopped by PID at the end. Never run by the tests::

    .venv/bin/python benchmarks/bridges.py [--requests 2000] [--repeats 5] [--block 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import trio

import tunnel2

RELAY = """
import time, tunnel2
relay = tunnel2.start_relay(tunnel2.ServerConfig(port=0))
print(relay.base_url, flush=True)
time.sleep(3600)
"""

# One keep-alive connection, N sequential requests; prints "<seconds> <max latency>".
CLIENT = """
import socket, sys, time
host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sock = socket.create_connection((host, port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
request = f"GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n".encode()
worst = 0.0
start = time.perf_counter()
for _ in range(n):
    t0 = time.perf_counter()
    sock.sendall(request)
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        buf += sock.recv(65536)
    head, _, body = buf.partition(b"\\r\\n\\r\\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\\r\\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    worst = max(worst, time.perf_counter() - t0)
print(time.perf_counter() - start, worst, flush=True)
"""


@contextlib.contextmanager
def process(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def run_client(public_url: str, n: int) -> tuple[float, float]:
    parts = urllib.parse.urlsplit(public_url)
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, parts.hostname or "", str(parts.port), parts.path, str(n)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.split()
    return float(out[0]), float(out[1])


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def client_in_thread(public_url: str, n: int, block: float) -> tuple[float, float, float]:
    """Run the client from asyncio (in a worker thread), optionally blocking the loop."""
    before = cpu()
    pending = asyncio.get_running_loop().run_in_executor(None, run_client, public_url, n)
    if block:
        await asyncio.sleep(0.05)
        time.sleep(block)  # noqa: ASYNC251 - the failure mode measured: a blocked loop
    seconds, worst = await pending
    return seconds, worst, cpu() - before


def mode_trio(relay: str, port: int, n: int, block: float) -> tuple[float, float, float]:
    async def main() -> tuple[float, float, float]:
        async with tunnel2.open_tunnel(relay, port) as tunnel:
            before = cpu()
            seconds, worst = await trio.to_thread.run_sync(run_client, tunnel.public_url, n)
            return seconds, worst, cpu() - before

    return trio.run(main)


def mode_thread(relay: str, port: int, n: int, block: float) -> tuple[float, float, float]:
    async def main() -> tuple[float, float, float]:
        async with tunnel2.aio.open_tunnel(relay, port) as tunnel:
            return await client_in_thread(tunnel.public_url, n, block)

    return asyncio.run(main())


def mode_guest(relay: str, port: int, n: int, block: float) -> tuple[float, float, float]:
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[str] = loop.create_future()
        finished: asyncio.Future[None] = loop.create_future()
        stop = trio.Event()
        token: list[trio.lowlevel.TrioToken] = []

        async def trio_side() -> None:
            token.append(trio.lowlevel.current_trio_token())
            async with tunnel2.open_tunnel(relay, port) as tunnel:
                loop.call_soon(opened.set_result, tunnel.public_url)
                await stop.wait()

        def done(outcome: object) -> None:
            finished.set_result(None)

        trio.lowlevel.start_guest_run(
            trio_side,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done,
            host_uses_signal_set_wakeup_fd=True,
        )
        try:
            return await client_in_thread(await opened, n, block)
        finally:
            token[0].run_sync_soon(stop.set)
            await finished

    return asyncio.run(main())


MODES = {"trio": mode_trio, "thread": mode_thread, "guest": mode_guest}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=float, default=1.0)
    args = parser.parse_args()
    tunnel2_cmd = [str(Path(sys.executable).with_name("tunnel2"))]
    with (
        process([sys.executable, "-c", RELAY]) as relay_proc,
        process([*tunnel2_cmd, "backend", "--port", "0"]) as backend_proc,
    ):
        assert relay_proc.stdout is not None
        assert backend_proc.stdout is not None
        relay = relay_proc.stdout.readline().strip()
        backend_url = backend_proc.stdout.readline().split()[4]
        port = urllib.parse.urlsplit(backend_url).port or 0
        results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
        for mode in MODES.values():  # warm-up round, not counted
            mode(relay, port, args.requests // 10, 0.0)
        for _ in range(args.repeats):
            for name, mode in MODES.items():
                results[name].append(mode(relay, port, args.requests, 0.0))
        base_rate = args.requests / statistics.median(r[0] for r in results["trio"])
        base_cpu = statistics.median(r[2] for r in results["trio"]) / args.requests
        print(f"{args.requests} requests x {args.repeats} rounds, 1 connection, medians")
        print(f"{'mode':8} {'req/s':>8} {'ratio':>6} {'agent-process CPU us/req':>25} {'ratio':>6}")
        for name in MODES:
            rate = args.requests / statistics.median(r[0] for r in results[name])
            per = statistics.median(r[2] for r in results[name]) / args.requests
            print(
                f"{name:8} {rate:8.0f} {rate / base_rate:6.2f} {per * 1e6:25.1f} "
                f"{per / base_cpu:6.2f}"
            )
        n = 200
        print(f"\nloop blocked {args.block}s while {n} requests are sent:")
        for name in ("thread", "guest"):
            seconds, worst, _ = MODES[name](relay, port, n, args.block)
            print(f"{name:8} all {n} took {seconds:.2f}s; slowest request {worst * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
