"""The inspector page in headless Chromium, driven over the DevTools protocol (tests/cdp.py).

A real relay, agent and backend on 127.0.0.1 port 0: a request goes through the tunnel, the
page lists it without a reload, a screenshot of it is decoded and looked at, Replay is
clicked, a second entry appears, and the backend got the request twice. The screenshots are
kept under the test's tmp dir (``inspector.png``, ``inspector-replayed.png``).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from cdp import Page, decode_png, open_chromium
from httpbackend import Backend, serve_backend
from test_admin import get
from test_inspect import real_tunnel

if TYPE_CHECKING:
    import pytest

WIDTH, HEIGHT = 1280, 800
ROWS = "[...document.querySelectorAll('#rows tr')].map(r => r.innerText)"


async def look_at(page: Page, path: Path) -> list[bytes]:
    """Save a full-size screenshot to ``path`` and return a quarter-size one's pixel rows
    (RGB), after checking both are the page's size and not blank."""
    png = await page.screenshot()
    await trio.Path(path).write_bytes(png)
    assert png[12:16] == b"IHDR"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (
        WIDTH,
        HEIGHT,
    )
    small = await page.call(
        "Page.captureScreenshot",
        {
            "format": "png",
            "clip": {"x": 0, "y": 0, "width": WIDTH, "height": HEIGHT, "scale": 0.25},
        },
    )
    width, height, rows = decode_png(base64.b64decode(small["data"]))
    assert (width, height) == (WIDTH // 4, HEIGHT // 4)
    colours = {row[i : i + 3] for row in rows for i in range(0, len(row), 3)}
    assert len(colours) > 20, "the screenshot is (nearly) blank"
    return rows


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    r, g, b = rows[y][3 * x : 3 * x + 3]
    return r, g, b


async def test_inspector_page_lists_and_replays_in_chromium(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            async with real_tunnel(backend.port) as tunnel:
                base = tunnel.base_url
                status, _ = await get(
                    base, f"/session/{tunnel.session_id}/webhook?from=chromium", "POST",
                    b'{"event": "push"}', "application/json",
                )  # fmt: skip
                assert status == 200
                async with open_chromium(tmp_path) as browser:
                    page = await browser.open_page(tunnel.admin_url + "/", WIDTH, HEIGHT)
                    # The list fills from the event stream, with no reload.
                    rows = await page.wait_for(f"{ROWS}.length === 1 && {ROWS}")
                    assert "POST" in rows[0]
                    assert "/webhook?from=chromium" in rows[0]
                    assert "200" in rows[0]
                    assert await page.evaluate("document.getElementById('state').textContent")
                    assert await page.wait_for(
                        "document.getElementById('state').textContent === 'live'"
                    )
                    await page.evaluate("document.querySelector('#rows tr').click()")
                    await page.wait_for("!!document.getElementById('replay')")
                    detail = await page.evaluate("document.getElementById('detail').innerText")
                    assert '{"event": "push"}' in detail  # the request body, as text
                    assert "HTTP/1.1 200 OK" in detail
                    pixels = await look_at(page, tmp_path / "inspector.png")
                    # The dark header bar on top, the light list below it.
                    assert max(pixel(pixels, 2, 2)) < 80
                    assert min(pixel(pixels, 2, 60)) > 200
                    # A request made while the page is open appears live too.
                    status, _ = await get(base, f"/session/{tunnel.session_id}/second")
                    assert status == 200
                    await page.wait_for(f"{ROWS}.length === 2")
                    # Replay the first one: a third entry, marked as its replay.
                    await page.evaluate("document.querySelector('tr[data-id=\"1\"]').click()")
                    await page.wait_for(
                        "document.querySelector('h2').innerText.includes('webhook')"
                    )
                    await page.evaluate("document.getElementById('replay').click()")
                    rows = await page.wait_for(f"{ROWS}.length === 3 && {ROWS}")
                    assert "replay of #1" in rows[0]
                    banner = await page.wait_for("document.getElementById('banner').innerText")
                    assert "Replay of #1 answered 200" in banner
                    await look_at(page, tmp_path / "inspector-replayed.png")
                    listing = json.loads((await get(tunnel.admin_url, "/api/requests"))[1])
            nursery.cancel_scope.cancel()
    bodies = [(r.target, r.body) for r in backend.requests]
    assert bodies == [
        (b"/webhook?from=chromium", b'{"event": "push"}'),
        (b"/second", b""),
        (b"/webhook?from=chromium", b'{"event": "push"}'),
    ]
    assert [(e["id"], e["replay_of"]) for e in listing["requests"]] == [
        (1, None),
        (2, None),
        (3, 1),
    ]


async def test_replay_error_shows_in_the_page(tmp_path: Path) -> None:
    """The backend went away: the replay's error is on the page, in words."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            backend_scope = trio.CancelScope()
            backend_stopped = trio.Event()

            async def run_backend(task_status: trio.TaskStatus[Backend]) -> None:
                with backend_scope:
                    await serve_backend("echo", task_status=task_status)
                backend_stopped.set()

            backend: Backend = await nursery.start(run_backend)
            async with real_tunnel(backend.port) as tunnel:
                status, _ = await get(tunnel.base_url, f"/session/{tunnel.session_id}/once")
                assert status == 200
                backend_scope.cancel()
                await backend_stopped.wait()
                async with open_chromium(tmp_path) as browser:
                    page = await browser.open_page(tunnel.admin_url + "/", WIDTH, HEIGHT)
                    await page.wait_for(f"{ROWS}.length === 1")
                    await page.evaluate("document.querySelector('#rows tr').click()")
                    await page.wait_for("!!document.getElementById('replay')")
                    await page.evaluate("document.getElementById('replay').click()")
                    banner = await page.wait_for(
                        "document.getElementById('banner').className === 'error' && "
                        "document.getElementById('banner').innerText"
                    )
                    rows = await page.wait_for(f"{ROWS}.length === 2 && {ROWS}")
                    await look_at(page, tmp_path / "inspector-replay-failed.png")
            nursery.cancel_scope.cancel()
    assert "Replay of #1 failed" in banner
    assert "the backend refused the connection" in banner
    assert "error" in rows[0]


EVIL_PAGE = """<!doctype html>
<html><body>
<form id="form" method="POST" action="{replay}" enctype="text/plain" target="sink">
  <input name='{{"a": "' value='"}}'>
</form>
<iframe name="sink"></iframe>
<script>
window.results = [];
fetch("{replay}", {{method: "POST", mode: "no-cors", body: "{{}}"}})
  .then(() => results.push("no-cors sent"), () => results.push("no-cors failed"));
fetch("{replay}", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: "{{}}"}})
  .then((r) => results.push("cors " + r.status), () => results.push("cors blocked"));
fetch("{listing}").then((r) => r.text()).then(
  (t) => results.push("read " + t.length), () => results.push("read blocked"));
document.getElementById("form").submit();
</script>
</body></html>
"""


async def test_a_web_page_on_another_origin_cannot_replay_or_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CSRF, as a browser does it: a page from another origin (another port) posts a form,
    a no-cors fetch and a JSON fetch at the replay URL, and tries to read the list."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            async with real_tunnel(backend.port) as tunnel:
                status, _ = await get(
                    tunnel.base_url, f"/session/{tunnel.session_id}/transfer", "POST", b"1000"
                )
                assert status == 200
                page = EVIL_PAGE.format(
                    replay=f"{tunnel.admin_url}/api/requests/1/replay",
                    listing=f"{tunnel.admin_url}/api/requests",
                ).encode()

                async def evil(stream: trio.SocketStream) -> None:
                    head = b""
                    while b"\r\n\r\n" not in head and (data := await stream.receive_some(4096)):
                        head += data
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(page), page)
                    )
                    await stream.aclose()

                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, evil, 0, host="127.0.0.1")
                )
                evil_url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
                async with open_chromium(tmp_path) as browser:
                    attacker = await browser.open_page(evil_url, WIDTH, HEIGHT)
                    results = await attacker.wait_for(
                        "window.results && window.results.length === 3 && window.results"
                    )
                    with trio.fail_after(15):  # the form and the no-cors fetch were refused
                        while len(refusals(caplog)) < 2:  # noqa: ASYNC110 - a log, not an event
                            await trio.sleep(0.05)
                    listing = json.loads((await get(tunnel.admin_url, "/api/requests"))[1])
            nursery.cancel_scope.cancel()
    assert sorted(results) == ["cors blocked", "no-cors sent", "read blocked"]
    # Another port on the same host is "same-site" but not same-origin: refused.
    whys = [r.getMessage().rpartition(": ")[2] for r in refusals(caplog)]
    assert whys == ["Sec-Fetch-Site is same-site"] * 2
    assert [e["id"] for e in listing["requests"]] == [1]
    assert [r.body for r in backend.requests] == [b"1000"]


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("inspector refused")]
