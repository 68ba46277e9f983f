"""A tiny Chrome DevTools Protocol client for the browser tests (not shipped).

Starts Debian's ``chromium`` headless with ``--remote-debugging-port=0``, reads the
DevTools WebSocket URL from its log, and speaks CDP over that WebSocket with wsproto (a
dependency already) on a trio stream. Commands are sent one at a time and their answers
awaited; events in between are dropped (the tests poll the DOM instead). No Playwright:
its browser download is not reachable from CI.

Usage::

    async with open_chromium(tmp_path) as browser:
        page = await browser.open_page("http://127.0.0.1:9101/")
        count = await page.evaluate("document.querySelectorAll('tr').length")
        png = await page.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import trio
import wsproto
import wsproto.events

_LISTENING_RE: Final = re.compile(rb"DevTools listening on (ws://\S+)")
START_TIMEOUT: Final = 30.0  # seconds for chromium to start listening
WAIT_TIMEOUT: Final = 15.0  # seconds Page.wait_for polls


class CdpError(Exception):
    """Chromium answered a command with an error, or the page threw."""


class Connection:
    """One CDP WebSocket connection to the browser (targets attached in flat mode)."""

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._next_id = 0
        self._text: list[str] = []

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and return its ``result``.

        Raises:
            CdpError: the browser answered with an error.
        """
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        out = self._ws.send(wsproto.events.TextMessage(data=json.dumps(message)))
        await self._stream.send_all(out)
        while True:
            answer = await self._receive()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise CdpError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result

    async def _receive(self) -> dict[str, Any]:
        while True:
            for event in self._ws.events():
                if isinstance(event, wsproto.events.TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        document: dict[str, Any] = json.loads("".join(self._text))
                        self._text.clear()
                        return document
                elif isinstance(event, wsproto.events.Ping):
                    await self._stream.send_all(self._ws.send(event.response()))
                elif isinstance(event, wsproto.events.CloseConnection):
                    raise CdpError("chromium closed the DevTools connection")
            data = await self._stream.receive_some(65536)
            if not data:
                raise CdpError("chromium closed the DevTools connection")
            self._ws.receive_data(data)


class Page:
    """A browser tab, attached to a :class:`Connection`."""

    def __init__(self, connection: Connection, session: str) -> None:
        self._connection = connection
        self._session = session

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A CDP command on this tab."""
        return await self._connection.call(method, params, self._session)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page.

        Raises:
            CdpError: it threw.
        """
        result = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        """Poll ``expression`` until it is truthy (at most ``WAIT_TIMEOUT`` seconds); its
        value.

        Raises:
            trio.TooSlowError: it stayed falsy.
        """
        with trio.fail_after(WAIT_TIMEOUT):
            # The page's state lives in the browser: polling it is the only way to wait.
            while not (value := await self.evaluate(expression)):  # noqa: ASYNC110
                await trio.sleep(0.05)
        return value

    async def screenshot(self) -> bytes:
        """A PNG of the visible page."""
        result = await self.call("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(result["data"])


class Browser:
    """A running headless chromium and its DevTools connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def open_page(self, url: str, width: int = 1280, height: int = 800) -> Page:
        """A new tab showing ``url`` at ``width`` x ``height`` CSS pixels, once loaded."""
        target = await self.connection.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.connection.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self.connection, attached["sessionId"])
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        await page.call("Page.enable")
        await page.call("Page.navigate", {"url": url})
        await page.wait_for("document.readyState === 'complete'")
        return page


def chromium_path() -> str:
    """Debian's chromium, which ``.ci/peers`` installs.

    Raises:
        RuntimeError: it is not installed (the browser tests need it; they do not skip).
    """
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    raise RuntimeError(
        "chromium is not installed: apt-get install -y chromium (bash .ci/peers installs it)"
    )


@asynccontextmanager
async def open_chromium(workdir: Path) -> AsyncIterator[Browser]:
    """Run headless chromium (profile and log under ``workdir``) for the block; it is
    killed by its process group (whose leader is the PID started here) when the block
    ends, however it ends."""
    log_path = workdir / "chromium.log"
    profile = workdir / "chromium-profile"
    profile.mkdir(exist_ok=True)
    argv = [
        chromium_path(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        "--disable-extensions", "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    try:
        with trio.fail_after(START_TIMEOUT):
            while (found := _LISTENING_RE.search(log_path.read_bytes())) is None:
                if process.poll() is not None:
                    raise RuntimeError(f"chromium exited: {log_path.read_text()[-2000:]}")
                await trio.sleep(0.05)
        url = urllib.parse.urlsplit(found.group(1).decode())
        assert url.hostname is not None
        assert url.port is not None
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        async with stream:
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send_all(ws.send(wsproto.events.Request(host=url.netloc, target=url.path)))
            connection = Connection(stream, ws)
            with trio.fail_after(START_TIMEOUT):
                while True:
                    stream_data = await stream.receive_some(65536)
                    if not stream_data:
                        raise CdpError("chromium closed during the WebSocket handshake")
                    ws.receive_data(stream_data)
                    events = list(ws.events())
                    if any(isinstance(e, wsproto.events.AcceptConnection) for e in events):
                        break
                    if any(isinstance(e, wsproto.events.RejectConnection) for e in events):
                        raise CdpError("chromium refused the DevTools WebSocket")
            yield Browser(connection)
    finally:
        # The group chromium leads (started with a session of its own): its helpers too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()


def decode_png(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) pixels of an 8-bit PNG (what chromium writes).

    Raises:
        ValueError: not such a PNG.
    """
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG")
    position, idat = 8, []
    width = height = channels = 0
    while position < len(png):
        length = int.from_bytes(png[position : position + 4], "big")
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
            depth, color = data[8], data[9]
            if depth != 8 or color not in (2, 6) or data[12] != 0:
                raise ValueError(f"unsupported PNG: depth {depth}, color type {color}")
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat.append(data)
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        method, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if method == 1:
                line[x] = (line[x] + left) & 0xFF
            elif method == 2:
                line[x] = (line[x] + up) & 0xFF
            elif method == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif method == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[x] = (line[x] + predictor) & 0xFF
        rows.append(
            bytes(line) if channels == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3)
        )
        previous = line
    return width, height, rows
