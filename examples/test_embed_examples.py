"""Plain ``def`` tests of the embedding examples (run: pytest examples/)."""

from __future__ import annotations

import urllib.request

from embed_asgi import app as asgi_app
from embed_flask import exposed

from tunnel2.testing import sync_memory_tunnel


def test_the_flask_example_answers_through_a_real_tunnel() -> None:
    with exposed() as url, urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        assert response.read() == b"Hello from Flask behind the tunnel!\n"


def test_a_sync_test_through_a_memory_tunnel() -> None:
    with sync_memory_tunnel(asgi_app) as tunnel:
        response = tunnel.request("GET", "/hello")
    assert response.status == 200
    assert response.text == "Hello from an in-process ASGI app at /hello\n"
