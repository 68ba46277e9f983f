"""What running an in-process ASGI app on asyncio costs: the bridge against trio, interleaved.

One process runs a relay (``serve_tunnel_server``) on 127.0.0.1 and two agents
(``open_tunnel``) with the same trivial ASGI app, one with ``asgi_loop="trio"`` (the app in
the agent's own tasks) and one with ``asgi_loop="asyncio"`` (the app on a loop the tunnel
owns in a thread; each ``receive``/``send`` crosses the threads), and C keep-alive clients
sending N requests each to one tunnel, then the other, round after round. CPU time is the
whole process's (relay + agents + the asyncio thread + clients), so compare the difference:
the extra CPU us per request is the bridge's cost.

The app, clients and figures are ``observer_cost.py``'s.

Usage: .venv/bin/python benchmarks/asgi_loop.py [--requests 2000] [--rounds 5] [--clients 1]
"""

from __future__ import annotations

import argparse

import trio
from observer_cost import app, client, measure, report

import tunnel2
from tunnel2.server import ServerConfig


async def main(requests: int, rounds: int, clients: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(tunnel2.serve_tunnel_server, ServerConfig(port=0))
        port = int(server.base_url.rpartition(":")[2])
        async with (
            tunnel2.open_tunnel(server.base_url, app, asgi_loop="trio") as on_trio,
            tunnel2.open_tunnel(server.base_url, app, asgi_loop="asyncio") as on_asyncio,
        ):
            sessions = {"trio": on_trio.session_id, "asyncio": on_asyncio.session_id}
            for session in sessions.values():
                assert session is not None
                async with trio.open_nursery() as warm:
                    warm.start_soon(client, port, session, 300)
            for _ in range(rounds):
                for mode, session in sessions.items():
                    assert session is not None
                    results.setdefault(mode, []).append(
                        await measure(port, session, requests, clients)
                    )
        nursery.cancel_scope.cancel()
    report(results, "trio", f"{requests} requests x {clients} clients, {rounds} interleaved rounds")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per client per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    trio.run(main, args.requests, args.rounds, args.clients)
