"""Protocol upgrades (WebSocket and the like) pass through the tunnel as raw bytes."""

from __future__ import annotations

import functools

import trio
import trio.testing

from tunnel2.testing import open_memory_tunnel


async def upgrading_backend(stream: trio.SocketStream) -> None:
    """Answers an Upgrade request with 101, then echoes bytes upper-cased until EOF; answers
    anything else with a plain 200."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(65536)
        if not data:
            return
        head += data
    head, _, rest = head.partition(b"\r\n\r\n")
    if b"upgrade: echo" not in head.lower():
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
        return
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        + rest.upper()
    )
    while data := await stream.receive_some(65536):
        await stream.send_all(data.upper())
    await stream.send_all(b"BYE")
    await stream.aclose()


async def test_upgrade_carries_raw_bytes_both_ways(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, upgrading_backend, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with open_memory_tunnel(port) as tunnel:
            client = tunnel.open_client_stream()
            await client.send_all(
                (
                    f"GET {tunnel.path_prefix}/ws HTTP/1.1\r\nHost: relay.test\r\n"
                    "Connection: Upgrade\r\nUpgrade: echo\r\n\r\nfirst"
                ).encode()
            )
            received = b""
            while b"FIRST" not in received:
                received += await client.receive_some(65536)
            head, _, _ = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"upgrade: echo" in head.lower()
            for word in (b"hello", b"tunnel"):
                await client.send_all(word)
                echoed = b""
                while len(echoed) < len(word):
                    echoed += await client.receive_some(65536)
                assert echoed == word.upper()
            await client.send_eof()
            tail = b""
            while chunk := await client.receive_some(65536):
                tail += chunk
            assert tail == b"BYE"
            await trio.testing.wait_all_tasks_blocked()
            uplink = tunnel.agent.uplink
            assert uplink is not None
            assert uplink.statistics().open_streams == 0


async def test_refused_upgrade_is_an_ordinary_response(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, upgrading_backend, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with open_memory_tunnel(port) as tunnel:
            response = await tunnel.request(
                "GET", "/", headers=[("Connection", "Upgrade"), ("Upgrade", "other")]
            )
    assert (response.status, response.body) == (200, b"plain")
