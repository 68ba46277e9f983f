"""A pytest-trio test through a real tunnel with no sockets (run: pytest examples/).

The ``memory_tunnel`` fixture comes from tunnel2's pytest plugin, installed with tunnel2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embed_asgi import app

if TYPE_CHECKING:
    from tunnel2.testing import MemoryTunnelFactory


async def test_app_answers_through_the_tunnel(memory_tunnel: MemoryTunnelFactory) -> None:
    async with memory_tunnel(app) as tunnel:
        response = await tunnel.request("GET", "/hello")
    assert response.status == 200
    assert response.text == "Hello from an in-process ASGI app at /hello\n"
