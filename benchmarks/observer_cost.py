"""What observing costs: req/s and CPU us/request with metrics on and off, interleaved.

One process runs a relay (``serve_tunnel_server``) and an agent (``open_tunnel``) on
127.0.0.1 with an in-process ASGI app (on trio), and C keep-alive clients sending N requests each.
Each round toggles the observers in place (the same relay, agent and sockets): ``off`` has
no observer (no event is built), ``metrics`` a PrometheusObserver on both sides, ``metrics+log``
also the access log (to a NullHandler-ed logger, so formatting is measured but no I/O).
CPU time is the whole process's (relay + agent + clients), so compare the ratios.

Usage: .venv/bin/python benchmarks/observer_cost.py [--requests 2000] [--rounds 4] [--clients 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import MutableMapping
from typing import Any

import trio

import tunnel2
from tunnel2.admin import PrometheusObserver
from tunnel2.observe import AccessLogObserver, Observer
from tunnel2.server import ServerConfig


async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


async def client(port: int, session: str, n: int, body: bytes = b"") -> None:
    """``n`` requests on one keep-alive connection: a GET, or a POST of ``body``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if body:
        request = (
            f"POST /session/{session}/ HTTP/1.1\r\nHost: bench\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    else:
        request = f"GET /session/{session}/ HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    async with stream:
        buf = b""
        for _ in range(n):
            await stream.send_all(request)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    length = int(buf.lower().split(b"content-length:", 1)[1].split(b"\r\n")[0])
                    if len(buf) >= end + 4 + length:
                        assert buf.startswith(b"HTTP/1.1 200 "), buf[:100]
                        buf = buf[end + 4 + length :]
                        break
                buf += await stream.receive_some(65536)


async def main(requests: int, rounds: int, clients: int) -> None:
    logging.getLogger("tunnel2.requests").addHandler(logging.NullHandler())
    logging.getLogger("tunnel2.requests").setLevel(logging.INFO)
    logging.getLogger("tunnel2.requests").propagate = False
    results: dict[str, list[tuple[float, float]]] = {}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(tunnel2.serve_tunnel_server, ServerConfig(port=0))
        port = int(server.base_url.rpartition(":")[2])
        async with tunnel2.open_tunnel(server.base_url, app, asgi_loop="trio") as agent:
            session = agent.session_id
            assert session is not None
            modes: dict[str, tuple[list[Observer], list[Observer]]] = {
                "off": ([], []),
                "metrics": ([PrometheusObserver()], [PrometheusObserver()]),
                "metrics+log": (
                    [PrometheusObserver(), AccessLogObserver()],
                    [PrometheusObserver(), AccessLogObserver()],
                ),
            }
            async with trio.open_nursery() as warm:
                warm.start_soon(client, port, session, 300)
            for _ in range(rounds):
                for mode, (relay_obs, agent_obs) in modes.items():
                    server.observers[:] = relay_obs
                    agent.observers[:] = agent_obs
                    run = await measure(port, session, requests, clients)
                    results.setdefault(mode, []).append(run)
        nursery.cancel_scope.cancel()
    report(results, "off", f"{requests} requests x {clients} clients, {rounds} interleaved rounds")


async def measure(port: int, session: str, requests: int, clients: int) -> tuple[float, float]:
    """One batch: ``clients`` clients sending ``requests`` each; req/s and CPU us/request."""
    wall, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as batch:
        for _ in range(clients):
            batch.start_soon(client, port, session, requests)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = requests * clients
    return total / wall, cpu / total * 1e6


def report(results: dict[str, list[tuple[float, float]]], base: str, title: str) -> None:
    """Print each mode's medians and their ratios (and CPU difference) to mode ``base``."""
    base_rps = statistics.median(r for r, _ in results[base])
    base_cpu = statistics.median(c for _, c in results[base])
    print(f"{title} (medians)")
    for mode, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(
            f"{mode:12} {rps:8.0f} req/s ({rps / base_rps:5.3f}x)   "
            f"{cpu:6.1f} CPU us/request ({cpu / base_cpu:5.3f}x, {cpu - base_cpu:+6.1f} us)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per client per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    trio.run(main, args.requests, args.rounds, args.clients)
