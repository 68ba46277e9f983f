"""What the inspector costs: req/s and CPU us/request with it on and off, interleaved.

One process runs a relay (``serve_tunnel_server``) and two agents (``open_tunnel``) on
127.0.0.1 with the same in-process ASGI app: one agent with ``inspect=False`` (no wrapper at
all), one with ``inspect=True`` (every stream recorded into the ring: heads kept, the first
16 KiB of each body copied). Rounds alternate between the two sessions (which goes first
alternates too); C keep-alive clients
send N requests each (a GET, or a POST with ``--body`` bytes that the app echoes back).
CPU time is the whole process's (relay + agents + clients), so compare the ratios.

Usage: .venv/bin/python benchmarks/inspect_cost.py [--requests 2000] [--rounds 4]
[--clients 4] [--body 0]

``--micro`` times the recording wrapper alone (a trivial handler on a stream that does
nothing, called directly and through ``Inspector.handle``; ``--requests`` x 50 calls a round).

For a figure that does not swing with the machine, ``--memory off|inspect`` instead sends
``--requests`` requests one at a time through an in-memory tunnel (no sockets, no output), to
be counted with callgrind; instructions per request = the difference of two runs' totals over
the difference of their request counts::

    for mode in off inspect; do for n in 1000 3000; do
      valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$mode.$n \
        .venv/bin/python benchmarks/inspect_cost.py --memory $mode --requests $n
    done; done
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, cast

import trio
from observer_cost import client

import tunnel2
from tunnel2.server import ServerConfig

if TYPE_CHECKING:
    from tunnel2.uplink import TunnelStream


async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body or b'{"status":"ok"}'})


async def main(requests: int, rounds: int, clients: int, body_size: int) -> None:
    body = bytes(i % 251 for i in range(body_size))
    results: dict[str, list[tuple[float, float]]] = {}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(tunnel2.serve_tunnel_server, ServerConfig(port=0))
        port = int(server.base_url.rpartition(":")[2])
        async with (
            tunnel2.open_tunnel(server.base_url, app) as plain,
            tunnel2.open_tunnel(server.base_url, app, inspect=True) as inspecting,
        ):
            sessions = {"off": plain.session_id, "inspect": inspecting.session_id}
            for session in sessions.values():
                assert session is not None
                async with trio.open_nursery() as warm:
                    warm.start_soon(client, port, session, 300, body)
            for round_ in range(rounds):
                order = list(sessions.items())
                for mode, session in order if round_ % 2 == 0 else order[::-1]:
                    assert session is not None
                    wall, cpu = time.perf_counter(), time.process_time()
                    async with trio.open_nursery() as batch:
                        for _ in range(clients):
                            batch.start_soon(client, port, session, requests, body)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    total = requests * clients
                    results.setdefault(mode, []).append((total / wall, cpu / total * 1e6))
            kept = inspecting.requests()
            assert len(kept) == 100
            assert kept[-1].request_size == body_size
        nursery.cancel_scope.cancel()
    base_rps = statistics.median(r for r, _ in results["off"])
    base_cpu = statistics.median(c for _, c in results["off"])
    kind = f"POST {body_size} B echoed" if body_size else "GET"
    print(f"{kind}: {requests} requests x {clients} clients, {rounds} interleaved rounds (medians)")
    for mode, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(
            f"{mode:8} {rps:8.0f} req/s ({rps / base_rps:5.3f}x)   "
            f"{cpu:6.1f} CPU us/request ({cpu / base_cpu:5.3f}x, {cpu - base_cpu:+5.1f} us)"
        )


class _NullStream:
    """Just what the handler below calls, doing nothing (``--micro``)."""

    id = 1
    head = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
    local_ended = False

    async def receive_data(self) -> bytes:
        return b""

    def send_head(self, head: bytes) -> None:
        pass

    def send_data_nowait(self, data: bytes, *, end: bool = False) -> None:
        pass


async def micro(requests: int, rounds: int) -> None:
    """The recording wrapper alone: a trivial handler on a stream that does nothing, called
    directly and through :meth:`Inspector.handle`, interleaved."""
    from tunnel2.inspect import Inspector

    async def handler(stream: TunnelStream) -> int | None:
        await stream.receive_data()
        stream.send_head(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n")
        stream.send_data_nowait(b'{"status":"ok"}', end=True)
        return 200

    stream = cast("TunnelStream", _NullStream())  # only what the handler calls
    inspector = Inspector(handler)
    overheads = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(requests):
            await handler(stream)
        plain = time.process_time() - start
        start = time.process_time()
        for _ in range(requests):
            await inspector.handle(stream)
        overheads.append((time.process_time() - start - plain) / requests * 1e6)
    print(f"recording costs {statistics.median(overheads):.2f} CPU us per request (median)")


async def in_memory(mode: str, requests: int, body_size: int) -> None:
    from tunnel2.agent import AgentConfig
    from tunnel2.testing import open_memory_tunnel

    body = bytes(i % 251 for i in range(body_size))
    method = "POST" if body else "GET"
    config = AgentConfig(inspect=mode == "inspect")
    async with open_memory_tunnel(app, agent_config=config) as tunnel:
        for _ in range(requests):
            response = await tunnel.request(method, "/", body=body)
            assert response.status == 200


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per client per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--body", type=int, default=0, help="POST this many bytes (0: GET)")
    parser.add_argument("--memory", choices=("off", "inspect"), help="in memory, for callgrind")
    parser.add_argument("--micro", action="store_true", help="the recording wrapper alone")
    args = parser.parse_args()
    if args.micro:
        trio.run(micro, args.requests * 50, args.rounds)
    elif args.memory:
        trio.run(in_memory, args.memory, args.requests, args.body)
    else:
        trio.run(main, args.requests, args.rounds, args.clients, args.body)
