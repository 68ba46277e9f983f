"""Agent internals that have no socket-free end-to-end view: head rewriting."""

from __future__ import annotations

import pytest

from tunnel2 import _http11 as http
from tunnel2.asgi import _forwarded_client
from tunnel2.backend import _relay_head_framing, _response_head_for_tunnel


def rewrite(head: bytes, method: bytes = b"GET") -> tuple[bytes, bool]:
    response = http.parse_response_head(head)
    framing, _ = http.response_framing(response, method)
    return _response_head_for_tunnel(response, framing)


def test_hop_by_hop_response_fields_are_cut_and_keep_alive_read() -> None:
    head, keep_alive = rewrite(
        b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\nSet-Cookie: a\r\nSet-Cookie: b\r\n\r\n"
    )
    assert head == (
        b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n"
        b"Set-Cookie: a\r\nSet-Cookie: b\r\n\r\n"
    )
    assert keep_alive


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: Close\r\n\r\n", False),
        # Two Connection fields, each a single option on its own: together they close.
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n",
            False,
        ),
    ],
)
def test_keep_alive_follows_version_and_connection(head: bytes, keep_alive: bool) -> None:
    assert rewrite(head)[1] is keep_alive


def test_close_delimited_and_chunked_bodies_are_marked_chunked() -> None:
    close_delimited, _ = rewrite(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n")
    chunked, _ = rewrite(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert close_delimited == b"HTTP/1.1 200 OK\r\nServer: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert chunked == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_switching_protocols_keeps_its_upgrade_fields() -> None:
    head, _ = rewrite(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Keep-Alive: 5\r\n\r\n"
    )
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", (b"GET", http.Framing.NONE, 0)),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-F: 1\r\n\r\n",
            (b"POST", http.Framing.LENGTH, 12),
        ),
        (
            b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            (b"PUT", http.Framing.CHUNKED, 0),
        ),
    ],
)
def test_relay_heads_state_their_framing(
    head: bytes, expected: tuple[bytes, http.Framing, int]
) -> None:
    assert _relay_head_framing(head) == expected


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        (b'for="192.0.2.1:5000";host="h";proto=http', ("192.0.2.1", 5000)),
        (b'for=192.0.2.7;host="h";proto=https, for=10.0.0.1', ("192.0.2.7", 0)),
        (b'for="[2001:db8::1]:443";host="h";proto=http', ("2001:db8::1", 443)),
        (b'for="[::1]";host="h"', ("::1", 0)),
        (b'for=unknown;host="relay.test";proto=http', None),
        (b"for=_hidden", None),
        (b'host="h";for=192.0.2.1', None),  # the relay writes for= first; anything else is not its
        (b'for="192.0.2.1:99999999"', ("192.0.2.1", 0)),
        (None, None),
    ],
)
def test_forwarded_client_reads_the_relays_first_element(
    forwarded: bytes | None, client: tuple[str, int] | None
) -> None:
    assert _forwarded_client(forwarded) == client
