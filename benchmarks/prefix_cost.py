"""What the path-prefix URL rewriting costs the agent per response (PROTOCOL.md §4.6).

Times ``_response_head_for_tunnel`` (the function both stream handlers build the response
head with) on a typical response head: without a request (the Host form, today's path),
with a path-form request but no URL field (the common case: the cheap check only), and on
a redirect that sets a cookie (the rewriting itself), plus the per-request search for
X-Forwarded-Prefix the forwarder makes. Interleaved rounds, best of each; compare ratios.

Usage: .venv/bin/python benchmarks/prefix_cost.py [--number 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import timeit

from tunnel2 import _http11 as http
from tunnel2.backend import _PREFIX_FIELD, _response_head_for_tunnel

REQUEST = (
    b"GET /login HTTP/1.1\r\nHost: relay.example:8000\r\nUser-Agent: bench/1.0\r\n"
    b"Accept: */*\r\nX-Forwarded-Prefix: /session/3f2a9c\r\nX-Forwarded-For: 192.0.2.1\r\n"
    b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: relay.example:8000\r\n"
    b'Forwarded: for="192.0.2.1:5123";host="relay.example:8000";proto=http\r\n\r\n'
)
COMMON = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 15\r\nConnection: keep-alive\r\n\r\n"
)
REDIRECT = (
    b"HTTP/1.1 302 FOUND\r\nServer: Werkzeug/3.1\r\nDate: Tue, 01 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/html; charset=utf-8\r\nContent-Length: 0\r\nLocation: /home\r\n"
    b"Set-Cookie: user=alice; Path=/home\r\nConnection: keep-alive\r\n\r\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    common, redirect = http.parse_response_head(COMMON), http.parse_response_head(REDIRECT)
    length = http.Framing.LENGTH
    cases = {
        "common response, no request (Host form)": lambda: _response_head_for_tunnel(
            common, length
        ),
        "common response, path form (cheap check)": lambda: _response_head_for_tunnel(
            common, length, REQUEST
        ),
        "redirect + cookie, no request": lambda: _response_head_for_tunnel(redirect, length),
        "redirect + cookie, path form (rewritten)": lambda: _response_head_for_tunnel(
            redirect, length, REQUEST
        ),
        "per request: X-Forwarded-Prefix search": lambda: _PREFIX_FIELD in REQUEST,
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.rounds):
        for name, case in cases.items():
            best[name] = min(best[name], timeit.timeit(case, number=args.number) / args.number)
    base = best["common response, no request (Host form)"]
    for name, seconds in best.items():
        print(f"{name:45s} {seconds * 1e9:8.0f} ns  ({seconds / base:4.2f}x)")


if __name__ == "__main__":
    main()
