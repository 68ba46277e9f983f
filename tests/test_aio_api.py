"""Tests for :mod:`tunnel2.aio`: the asyncio front door (trio in a thread the block owns).

Each test drives its own asyncio loop with ``asyncio.run`` (the suite runs in trio mode),
which is also how Jupyter's top-level ``await`` looks to the library: a running loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from embed_helpers import (
    STEP_TIMEOUT,
    fetch,
    hello_app,
    run_python,
    silent_listener,
    sync_relay,
    tunnel_threads,
)

import tunnel2


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=STEP_TIMEOUT) as client:
        return await client.get(url)


def test_open_tunnel_on_a_running_asyncio_loop() -> None:
    async def main() -> None:
        async with (
            tunnel2.aio.open_tunnel_server(tunnel2.ServerConfig(port=0)) as relay,
            tunnel2.aio.open_tunnel(relay.base_url, hello_app) as tunnel,
        ):
            assert tunnel.public_url.startswith(relay.base_url)
            answer = await get(tunnel.public_url + "aio")
            assert (answer.status_code, answer.text) == (200, "hello /aio")

    asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))


def test_cancelling_the_task_closes_the_tunnel() -> None:
    with sync_relay() as relay:
        urls: list[str] = []

        async def serve(opened: asyncio.Event) -> None:
            async with tunnel2.aio.open_tunnel(relay.base_url, hello_app) as tunnel:
                urls.append(tunnel.public_url)
                opened.set()
                await asyncio.sleep(3600)

        async def main() -> None:
            opened = asyncio.Event()
            task = asyncio.create_task(serve(opened))
            await opened.wait()
            assert (await get(urls[0])).status_code == 200
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The block was left only after the agent left the relay.
            assert (await get(urls[0])).status_code in (404, 502)

        asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))


def test_cancelling_during_the_handshake_stops_the_thread() -> None:
    with silent_listener() as port:

        async def main() -> None:
            task = asyncio.create_task(
                tunnel2.aio.open_tunnel(f"http://127.0.0.1:{port}", hello_app).__aenter__()
            )
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))
    assert tunnel_threads(join=True) == []


# Once in CI (lowest versions, a loaded machine) a socket of this test was collected
# unclosed; not reproduced in many reruns. Tolerated while it is tracked (session note).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_refusal_is_raised_in_asyncio() -> None:
    with sync_relay(tokens=frozenset({"right"})) as relay:

        async def main() -> None:
            with pytest.raises(tunnel2.HandshakeRefused, match="token"):
                async with tunnel2.aio.open_tunnel(relay.base_url, hello_app, token="bad"):
                    raise AssertionError("not reached")

        asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))


def test_the_trio_api_from_asyncio_says_to_use_aio() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match=r"use tunnel2\.aio\.open_tunnel$"):
            async with tunnel2.open_tunnel("http://127.0.0.1:1", hello_app):
                raise AssertionError("not reached")
        with pytest.raises(RuntimeError, match=r"use tunnel2\.aio\.open_tunnel_server$"):
            async with tunnel2.open_tunnel_server():
                raise AssertionError("not reached")

    asyncio.run(main())


async def test_the_aio_api_from_trio_says_to_use_the_trio_one() -> None:
    with trio.fail_after(STEP_TIMEOUT), pytest.raises(RuntimeError, match=r"tunnel2\.open_tunnel$"):
        async with tunnel2.aio.open_tunnel("http://127.0.0.1:1", hello_app):
            raise AssertionError("not reached")


def test_a_fastapi_lifespan_under_uvicorn_opens_the_tunnel() -> None:
    examples = Path(__file__).parent.parent / "examples"
    with sync_relay() as relay, socket.create_server(("127.0.0.1", 0)) as listener:
        env = {
            **os.environ,
            "TUNNEL2_RELAY": relay.base_url,
            "TUNNEL2_PORT": str(listener.getsockname()[1]),
        }
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(examples)]
        command += ["--fd", str(listener.fileno()), "embed_fastapi:app"]
        process = subprocess.Popen(
            command,
            env=env,
            pass_fds=[listener.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            assert process.stderr is not None
            line = process.stdout.readline()  # bounded: the lifespan prints or uvicorn exits
            assert line.startswith("PUBLIC_URL "), line + process.stderr.read()
            url = line.split()[1]
            assert fetch(url) == (200, '{"hello":"fastapi"}')
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=STEP_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, err
        assert "TUNNEL_CLOSED" in out
        assert "Application shutdown complete" in err
        assert fetch(url)[0] in (404, 502)


def test_top_level_await_in_the_asyncio_repl() -> None:
    # ``python -m asyncio`` runs each line on one running loop, as Jupyter does.
    lines = """\
import tunnel2
from embed_helpers import fetch, hello_app, tunnel_threads
relay = tunnel2.start_relay(tunnel2.ServerConfig(port=0))
async with tunnel2.aio.open_tunnel(relay.base_url, hello_app) as tunnel:
    print("FETCHED", await asyncio.to_thread(fetch, tunnel.public_url + "nb"))

relay.close()
print("LEFT", tunnel_threads(join=True))
"""
    # (The relay is closed before the join: joining its thread while it ran waited out the
    # helper's 30 s timeout on every run, and then only said it was still running.)
    done = run_python(lines, repl=True, args=("-m", "asyncio"))
    assert "FETCHED (200, 'hello /nb')" in done.stdout, done.stdout + done.stderr
    assert "LEFT []" in done.stdout, done.stdout + done.stderr


def test_a_loop_closed_with_the_block_still_open_does_not_keep_the_process() -> None:
    # The loop is closed without leaving the block (no asyncio.run to cancel the task):
    # the thread is left running, and interpreter exit closes it.
    code = """\
import asyncio, atexit, threading
names = lambda: [t.name for t in threading.enumerate() if t.name.startswith("tunnel2-")]
_ = atexit.register(lambda: print("AT EXIT", names()))
import tunnel2
from embed_helpers import hello_app
relay = tunnel2.start_relay(tunnel2.ServerConfig(port=0, drain_timeout=1.0))
loop = asyncio.new_event_loop()
block = tunnel2.aio.open_tunnel(relay.base_url, hello_app)
tunnel = loop.run_until_complete(block.__aenter__())
loop.close()
print("OPEN", names())
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "OPEN ['tunnel2-relay', 'tunnel2-aio-tunnel']" in done.stdout, done.stdout
    assert "AT EXIT []" in done.stdout, done.stdout + done.stderr
