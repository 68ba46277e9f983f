#!/usr/bin/env python3
"""The floor of tunnel2's stack: a relay and an agent on trio that only pipe bytes.

``benchmarks/run.py --paths trio-pipe`` measures it beside tunnel2, ``ssh -R`` and the nginx
proxy (issue #9: "first find the floor of this stack"). It is what a tunnel on trio in pure
Python costs when it does nothing but carry bytes over one multiplexed connection:

* public connections are multiplexed over one TCP connection to the agent as frames of an
  8-byte header (stream id, length; length 0 closes the stream), with no WebSocket, no
  HTTP parsing or validation, no flow control, no timeouts, no routing;
* two tasks run per request on each side, as in the issue's floor (the uplink reader's turn
  shared by every frame one read brings): at the relay the visitor's task when its bytes
  arrive (it writes the frame to the uplink itself) and the uplink reader when the answer
  arrives (it writes it to the visitor's socket itself); at the agent the uplink reader (it
  writes the request to the backend's socket) and the stream's task when the backend
  answers (it writes the frame to the uplink);
* sockets are read with ``os.read`` after ``wait_readable`` only when a read would block.

Not a product and not tested: a benchmark peer, like nginx and sshd in run.py. A visitor
that does not read its answers stalls the whole pipe (the reader writes to it inline).

    python benchmarks/trio_pipe.py relay       # prints "relay public PORT agent PORT"
    python benchmarks/trio_pipe.py agent AGENT_PORT BACKEND_PORT
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator

import trio

_HEADER = struct.Struct("!II")
_READ = 65536


class _Out:
    """One socket's writes from many tasks: written at once, the rest queued in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pending = bytearray()

    async def write(self, data: bytes) -> None:
        if self.pending:  # another task is flushing: it takes this too, in order
            self.pending += data
            return
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        self.pending += data[sent:]
        while self.pending:
            await trio.lowlevel.wait_writable(self.fd)
            with contextlib.suppress(BlockingIOError):
                del self.pending[: os.write(self.fd, self.pending)]


async def _read(sock: socket.socket) -> bytes:
    fd = sock.fileno()
    while True:
        try:
            return os.read(fd, _READ)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


def _socket(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _frames(sock: socket.socket) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (stream id, payload) from the uplink; payload b"" closes the stream."""
    buf = b""
    while True:
        data = await _read(sock)
        if not data:
            return
        buf += data
        at = 0
        while len(buf) - at >= 8:
            sid, size = _HEADER.unpack_from(buf, at)
            if len(buf) - at - 8 < size:
                break
            yield sid, buf[at + 8 : at + 8 + size]
            at += 8 + size
        buf = buf[at:]


async def _upstream(sid: int, peers: dict[int, _Out], out: _Out) -> None:
    """Carry what stream SID's socket sends to the uplink, as frames; its EOF closes the stream
    (unless the other side closed it first) and the socket."""
    sock = peers[sid].sock
    try:
        while data := await _read(sock):
            await out.write(_HEADER.pack(sid, len(data)) + data)
    except OSError:
        pass
    finally:
        if peers.pop(sid, None) is not None:
            await out.write(_HEADER.pack(sid, 0))
        sock.close()


async def relay() -> None:
    public = _listener()
    agents = _listener()
    print(f"relay public {public.getsockname()[1]} agent {agents.getsockname()[1]}", flush=True)
    await trio.lowlevel.wait_readable(agents.fileno())
    uplink = _socket(agents.accept()[0])
    out = _Out(uplink)
    visitors: dict[int, _Out] = {}

    async def answers() -> None:
        async for sid, payload in _frames(uplink):
            visitor = visitors.get(sid)
            if visitor is None:
                continue
            with contextlib.suppress(OSError):  # the visitor went away: its task ends it
                if not payload:
                    del visitors[sid]
                    visitor.sock.shutdown(socket.SHUT_WR)  # its task closes at the EOF
                    continue
                await visitor.write(payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answers)
        sid = 0
        while True:
            await trio.lowlevel.wait_readable(public.fileno())
            try:
                sock = _socket(public.accept()[0])
            except BlockingIOError:
                continue
            sid += 1
            visitors[sid] = _Out(sock)
            nursery.start_soon(_upstream, sid, visitors, out)


async def agent(relay_port: int, backend_port: int) -> None:
    uplink = _socket(socket.create_connection(("127.0.0.1", relay_port)))
    out = _Out(uplink)
    backends: dict[int, _Out] = {}

    async with trio.open_nursery() as nursery:
        async for sid, payload in _frames(uplink):
            backend = backends.get(sid)
            with contextlib.suppress(OSError):  # the backend went away: its task ends it
                if not payload:
                    if backend is not None:
                        del backends[sid]
                        backend.sock.shutdown(socket.SHUT_WR)  # its task closes at the EOF
                    continue
                if backend is None:
                    sock = _socket(socket.create_connection(("127.0.0.1", backend_port)))
                    backend = backends[sid] = _Out(sock)
                    nursery.start_soon(_upstream, sid, backends, out)
                await backend.write(payload)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def main(argv: list[str]) -> None:
    if argv[:1] == ["relay"]:
        trio.run(relay)
    elif argv[:1] == ["agent"] and len(argv) == 3:
        trio.run(agent, int(argv[1]), int(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
