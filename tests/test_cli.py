"""Tests for the ``tunnel2`` command line, run as real subprocesses (``python -m tunnel2.cli``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

import tunnel2.loadtest.cli
from tunnel2.cli import build_parser, main

CLI = (sys.executable, "-m", "tunnel2.cli")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIGNAL_MID_WAIT = Path(__file__).resolve().parent / "apps" / "signal_mid_wait.py"


@attrs.define
class Proc:
    """A running subprocess whose stdout is read line by line and stderr goes to a file."""

    process: trio.Process
    stderr_path: Path
    buf: bytearray = attrs.Factory(bytearray)

    async def readline(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self.buf:
            data = await self.process.stdout.receive_some(4096)
            if not data:
                raise EOFError(f"stdout ended: {bytes(self.buf)!r}; stderr: {self.stderr()}")
            self.buf += data
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf[:] = rest
        return line.decode()

    async def rest_of_stdout(self) -> str:
        assert self.process.stdout is not None
        while data := await self.process.stdout.receive_some(4096):
            self.buf += data
        return bytes(self.buf).decode()

    async def interrupt(self) -> int:
        """SIGINT (as Ctrl-C does), then the exit status."""
        self.process.send_signal(signal.SIGINT)
        return await self.process.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@asynccontextmanager
async def run(*args: str, stderr: Path) -> AsyncIterator[Proc]:
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [*args], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL
        )
    try:
        yield Proc(process, stderr)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_help_lists_the_commands() -> None:
    with trio.fail_after(15):
        result = await trio.run_process([*CLI, "--help"], capture_stdout=True, capture_stderr=True)
    out = result.stdout.decode()
    for command in ("server", "http", "backend", "loadtest"):
        assert command in out, command


async def test_server_and_http_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello through the tunnel\n")
    with trio.fail_after(30):
        async with (
            run(
                sys.executable,
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(tmp_path / "www"),
                stderr=tmp_path / "backend.err",
            ) as backend,  # fmt: skip
            run(*CLI, "server", "--port", "0", stderr=tmp_path / "relay.err") as relay,
        ):
            line = await backend.readline()  # "Serving HTTP on 127.0.0.1 port N (...) ..."
            backend_port = int(line.split(" port ")[1].split()[0])
            line = await relay.readline()
            assert line.startswith("tunnel2 relay on http://127.0.0.1:"), line
            relay_url = line.split()[3]
            assert not relay_url.endswith(":0"), f"--port 0 printed {line!r}"
            async with run(
                *CLI, "http", str(backend_port), "--server", relay_url,
                stderr=tmp_path / "agent.err",
            ) as agent:  # fmt: skip
                line = await agent.readline()
                target = f"http://127.0.0.1:{backend_port}"
                assert line.startswith(f"Forwarding {relay_url}/session/"), line
                assert line.endswith(f"/ -> {target}"), line
                public_url = line.split()[1]

                result = await trio.run_process(
                    ["curl", "-sS", "--max-time", "5", public_url + "hello.txt"],
                    capture_stdout=True,
                    capture_stderr=True,
                )
                assert result.stdout == b"hello through the tunnel\n"

                assert await agent.interrupt() == 0
                assert await agent.rest_of_stdout() == "", "more than one line on stdout"
                assert "Traceback" not in agent.stderr(), agent.stderr()
            assert await relay.interrupt() == 0
            assert "Traceback" not in relay.stderr(), relay.stderr()
    # One access-log line per request on each side, in the format of the other log lines
    # (as when they went through logging: the observer writes them to stderr itself now).
    session = public_url.rstrip("/").rsplit("/", 1)[1][:8]
    for side, err in (("relay", relay.stderr()), ("agent", agent.stderr())):
        lines = [line for line in err.splitlines() if " tunnel2.requests: " in line]
        assert len(lines) == 1, err
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tunnel2.requests: "
            rf"{side} {session} GET /hello.txt -> 200 \(\d+\.\d ms\)",
            lines[0],
        ), lines[0]
        other = next(
            line
            for line in err.splitlines()
            if " INFO tunnel2." in line and " tunnel2.requests: " not in line
        )
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tunnel2\.", other)


async def test_http_against_an_unreachable_relay_exits_1(tmp_path: Path) -> None:
    relay_url = f"http://127.0.0.1:{free_port()}"
    with trio.fail_after(20):
        result = await trio.run_process(
            [*CLI, "http", "8080", "--server", relay_url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert result.stdout == b""
    assert "Traceback" not in stderr
    assert stderr.startswith("tunnel2 http:"), stderr
    assert "relay" in stderr


async def test_http_with_a_bad_target_exits_2() -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, "http", "ftp://notaport"], capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 2
    assert "ftp://notaport" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


async def test_server_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with run(*CLI, "server", "--port", "0", stderr=tmp_path / "relay.err") as relay:
            line = await relay.readline()
            assert line.startswith("tunnel2 relay on http://127.0.0.1:"), line
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    assert "Traceback" not in relay.stderr(), relay.stderr()


async def test_server_with_a_bad_token_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text("lonely-token\n")
    with trio.fail_after(15):
        for path in (bad, tmp_path / "missing"):
            result = await trio.run_process(
                [*CLI, "server", "--port", "0", "--token-file", str(path)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            stderr = result.stderr.decode()
            assert result.returncode == 2, stderr
            assert stderr.startswith("tunnel2 server: bad tokens:"), stderr
            assert len(stderr.strip().splitlines()) == 1, stderr


async def test_open_relay_says_so_and_token_file_reloads_on_sighup(tmp_path: Path) -> None:
    state = ("--state-dir", str(tmp_path / "state"))
    with trio.fail_after(30):
        async with run(*CLI, "server", "--port", "0", *state, stderr=tmp_path / "open.err") as r:
            await r.readline()
            assert await r.interrupt() == 0
        assert "WARNING tunnel2.api: open relay" in r.stderr()

        tokens = tmp_path / "tokens"
        tokens.write_text("bob-token-1 bob\n")
        async with run(
            *CLI, "server", "--port", "0", "--token-file", str(tokens), *state,
            stderr=tmp_path / "relay.err",
        ) as relay:  # fmt: skip
            relay_url = (await relay.readline()).split()[3]

            async def agent_exit(token: str) -> tuple[int, str]:
                agent = await trio.run_process(
                    [*CLI, "http", "9", "--server", relay_url],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env={**os.environ, "TUNNEL2_TOKEN": token},
                )
                return agent.returncode, agent.stderr.decode()

            status, stderr = await agent_exit("carol-token-1")
            assert status == 1
            assert "invalid or missing token" in stderr
            tokens.write_text("bob-token-1 bob\ncarol-token-1 carol\n")
            relay.process.send_signal(signal.SIGHUP)
            while "tokens reloaded" not in relay.stderr():  # noqa: ASYNC110 - a log file
                await trio.sleep(0.05)
            async with run(
                *CLI, "http", "9", "--server", relay_url, "--token", "carol-token-1",
                stderr=tmp_path / "agent.err",
            ) as agent:  # fmt: skip
                assert (await agent.readline()).startswith("Forwarding"), agent.stderr()
            assert await relay.interrupt() == 0
        assert "open relay" not in relay.stderr()
        assert "Traceback" not in relay.stderr(), relay.stderr()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["http", "8080", "--server", "ftp://x"], "must be http://, https://, ws:// or wss://"),
        (["http", "99999"], "port is out of range 1-65535"),
        (["http", "65536"], "port is out of range 1-65535"),
        (["http", "http://127.0.0.1:99999"], "port is out of range"),
        (["http", "8080", "--server", "http://127.0.0.1:65536"], "port is out of range"),
        (["server", "--port", "99999"], "port 99999 is out of range 0-65535"),
        (["server", "--port", "65536"], "port 65536 is out of range 0-65535"),
        (["backend", "--port", "70000"], "port 70000 is out of range 0-65535"),
        (["http", "8080", "--max-concurrent", "0"], "must be at least 1"),
        (["server", "--domain", "bad/domain"], "is not a domain name"),
        (["server", "--domain=-x.example"], "is not a domain name"),
    ],
)
async def test_cli_mistakes_are_one_line_and_exit_2(args: list[str], says: str) -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert says in stderr
    assert result.stdout == b""
    # argparse prints its usage line first; our own checks print exactly one line.
    assert len([line for line in stderr.splitlines() if line.startswith("tunnel2")]) == 1


@pytest.mark.parametrize("spelling", ["127.0.0.1:{port}", "localhost:{port}"])
async def test_host_port_without_a_scheme_is_taken_as_http(spelling: str) -> None:
    port = free_port()
    with trio.fail_after(20):
        as_server = await trio.run_process(
            [*CLI, "http", "8080", "--server", spelling.format(port=port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        as_target = await trio.run_process(
            [*CLI, "http", spelling.format(port=9), "--server", f"http://127.0.0.1:{port}"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    for result in (as_server, as_target):
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr  # accepted; the relay is simply not there
        assert "cannot connect to the relay" in stderr


@asynccontextmanager
async def serving_example(tmp_path: Path, *wrapper: str) -> AsyncIterator[Proc]:
    """``examples/expose_port.py`` in demo mode (run by ``wrapper``, a script, if given), read
    up to its ``Ctrl-C`` line."""
    example = str(EXAMPLES / "expose_port.py")
    async with run(
        sys.executable, *wrapper, example, "--relay-port", "0", stderr=tmp_path / "ex.err"
    ) as demo:
        while not (await demo.readline()).startswith("Ctrl-C"):
            pass
        yield demo


def assert_stopped_cleanly(demo: Proc) -> None:
    stderr = demo.stderr()
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "expose_port: stopped"


async def test_version_and_ctrl_c_on_the_readme_example(tmp_path: Path) -> None:
    with trio.fail_after(20):
        version = await trio.run_process([*CLI, "--version"], capture_stdout=True)
        assert version.stdout.decode().startswith("tunnel2 ")
        async with serving_example(tmp_path) as demo:
            assert await demo.interrupt() == 0
    assert_stopped_cleanly(demo)


async def test_readme_example_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with serving_example(tmp_path) as demo:
            demo.process.send_signal(signal.SIGTERM)
            assert await demo.process.wait() == 0
    assert_stopped_cleanly(demo)


async def test_readme_example_stops_on_ctrl_c_while_still_connecting(tmp_path: Path) -> None:
    # A "relay" that takes the connection and never answers: the example is still in
    # open_tunnel when Ctrl-C comes, and stops there.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        with trio.fail_after(20):
            async with run(
                sys.executable,
                str(EXAMPLES / "expose_port.py"),
                "--server",
                f"http://127.0.0.1:{port}",
                "--port",
                "9",
                stderr=tmp_path / "ex.err",
            ) as demo:
                silent = await listeners[0].accept()
                demo.process.send_signal(signal.SIGINT)
                assert await demo.process.wait() == 0, demo.stderr()
                await silent.aclose()
    assert_stopped_cleanly(demo)


async def test_readme_example_survives_ctrl_c_in_the_middle_of_an_event_wait(
    tmp_path: Path,
) -> None:
    # A KeyboardInterrupt raised inside trio.Event.wait, between the task registering and
    # parking, broke trio itself (TrioInternalError, exit 1: a CI run caught it once). The
    # harness sends SIGINT at exactly that point (the uplink's writer waits on an event when
    # it has sent what it had); the example takes signals from a receiver.
    with trio.fail_after(20):
        async with serving_example(tmp_path, str(SIGNAL_MID_WAIT)) as demo:
            assert await demo.process.wait() == 0, demo.stderr()
    assert "signal_mid_wait: SIGINT inside Event.wait" in demo.stderr()
    assert_stopped_cleanly(demo)


async def test_embed_asgi_example_answers_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with run(*CLI, "server", "--port", "0", stderr=tmp_path / "relay.err") as relay:
            relay_url = (await relay.readline()).split()[3]
            async with run(
                sys.executable, str(EXAMPLES / "embed_asgi.py"), relay_url,
                stderr=tmp_path / "asgi.err",
            ) as example:  # fmt: skip
                line = await example.readline()
                assert line.startswith(f"Serving the ASGI app at {relay_url}/session/"), line
                result = await trio.run_process(
                    ["curl", "-sS", "--max-time", "5", line.split()[-1] + "hi"],
                    capture_stdout=True,
                )
                assert result.stdout.startswith(b"Hello from an in-process ASGI app at /")
                assert await example.interrupt() == 0
            assert "Traceback" not in example.stderr(), example.stderr()
            assert await relay.interrupt() == 0


def test_trusted_proxy_is_repeatable() -> None:
    args = build_parser().parse_args(
        ["server", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"]
    )
    assert args.trusted_proxy == ["10.0.0.0/8", "::1"]
    assert build_parser().parse_args(["server"]).trusted_proxy == []


async def test_server_with_a_bad_trusted_proxy_exits_2() -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, "server", "--trusted-proxy", "10.0.0.0/33"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "'10.0.0.0/33' is not an IP network" in stderr
    assert "Traceback" not in stderr


def test_ctrl_c_before_a_commands_signal_handling_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # E.g. while `tunnel2 loadtest` prints its first line, before its run takes the signals.
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(tunnel2.loadtest.cli, "_loadtest_main", interrupted)
    try:
        status = main(["loadtest", "http://127.0.0.1:9/"])
    except KeyboardInterrupt:  # (it would stop pytest itself)
        pytest.fail("the KeyboardInterrupt left main(): a traceback for the user")
    assert status == 130
