"""URLs that survive the path prefix (PROTOCOL.md §4.6), the Host header option, and Host
matching at the relay.

The rewriting function first (table-driven, then hypothesis), then real apps behind a real
relay and agent on 127.0.0.1: Flask and Django under real WSGI servers in threads, FastAPI
under uvicorn in a subprocess, each followed through redirects by httpx to a 200.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import trio
from embed_helpers import STEP_TIMEOUT, hello_app, sync_relay, wsgi_server
from httpbackend import Backend, decode_echo, serve_backend
from hypothesis import given
from hypothesis import strategies as st

import tunnel2
from tunnel2 import _http11 as http
from tunnel2._prefix import UrlRewrite, has_url_fields, url_rewrite_for
from tunnel2.agent import AgentConfig
from tunnel2.api import handler_for
from tunnel2.backend import (
    _HOST_FIELD_RE,
    BackendForwarder,
    _response_head_for_tunnel,
    _with_host_line,
)
from tunnel2.server import ServerConfig
from tunnel2.testing import open_memory_tunnel

PREFIX = b"/session/abc"


def request_head(
    *,
    host: bytes = b"relay.test:8000",
    public: bytes | None = None,
    prefix: bytes | None = PREFIX,
    proto: bytes = b"http",
) -> bytes:
    """A request head as the backend gets it from the agent."""
    lines = [b"GET /x HTTP/1.1", b"Host: " + host]
    if prefix is not None:
        lines.append(b"X-Forwarded-Prefix: " + prefix)
    lines += [
        b"X-Forwarded-For: 192.0.2.1",
        b"X-Forwarded-Proto: " + proto,
        b"X-Forwarded-Host: " + (public or host),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def rewrite_for(**options: Any) -> UrlRewrite:
    rewrite = url_rewrite_for(request_head(**options))
    assert rewrite is not None
    return rewrite


# --- the rewriting, value by value --------------------------------------------------------

PATH_FORM = rewrite_for()
# The backend was given its own Host (host_header="rewrite"), on the path form.
REWRITTEN_HOST = rewrite_for(host=b"127.0.0.1:5000", public=b"relay.test:8000")
# The Host form with a rewritten Host: no prefix, the backend's own URLs lead to the public.
HOST_FORM = rewrite_for(host=b"127.0.0.1:5000", public=b"abc.tunnels.test", prefix=None)


@pytest.mark.parametrize(
    ("rewrite", "given", "expected"),
    [
        # root-relative: under the prefix, query and fragment kept
        (PATH_FORM, b"/login", b"/session/abc/login"),
        (PATH_FORM, b"/", b"/session/abc/"),
        (PATH_FORM, b"/a/b?next=/c&x=1#top", b"/session/abc/a/b?next=/c&x=1#top"),
        (PATH_FORM, b"/?q", b"/session/abc/?q"),
        # already under the prefix: kept (no double prefix)
        (PATH_FORM, b"/session/abc", b"/session/abc"),
        (PATH_FORM, b"/session/abc/login", b"/session/abc/login"),
        (PATH_FORM, b"/session/abc?x", b"/session/abc?x"),
        (PATH_FORM, b"/session/abcdef", b"/session/abc/session/abcdef"),
        # absolute to the public host (any case, default port, either scheme): root-relative
        (PATH_FORM, b"http://relay.test:8000/login", b"/session/abc/login"),
        (PATH_FORM, b"HTTPS://RELAY.test:8000/a?b#c", b"/session/abc/a?b#c"),
        (PATH_FORM, b"http://relay.test:8000", b"/session/abc/"),
        (PATH_FORM, b"http://relay.test:8000?q=1", b"/session/abc/?q=1"),
        (PATH_FORM, b"http://relay.test:8000/session/abc/x", b"/session/abc/x"),
        # scheme-relative to an own host
        (PATH_FORM, b"//relay.test:8000/x", b"/session/abc/x"),
        # relative, external, other schemes, userinfo, odd values: untouched
        (PATH_FORM, b"login", b"login"),
        (PATH_FORM, b"../x", b"../x"),
        (PATH_FORM, b"?page=2", b"?page=2"),
        (PATH_FORM, b"#frag", b"#frag"),
        (PATH_FORM, b"https://example.com/login", b"https://example.com/login"),
        (PATH_FORM, b"//example.com/x", b"//example.com/x"),
        (PATH_FORM, b"http://relay.test:8001/x", b"http://relay.test:8001/x"),
        (PATH_FORM, b"http://user@relay.test:8000/x", b"http://user@relay.test:8000/x"),
        (PATH_FORM, b"mailto:a@relay.test", b"mailto:a@relay.test"),
        (PATH_FORM, b"ftp://relay.test:8000/x", b"ftp://relay.test:8000/x"),
        (PATH_FORM, b"/a b", b"/a b"),
        (PATH_FORM, b"/caf\xc3\xa9", b"/caf\xc3\xa9"),
        (PATH_FORM, b"", b""),
        (PATH_FORM, b"//", b"//"),
        # the Host the backend was given (rewrite mode) is its own too
        (REWRITTEN_HOST, b"http://127.0.0.1:5000/login", b"/session/abc/login"),
        (REWRITTEN_HOST, b"http://relay.test:8000/login", b"/session/abc/login"),
        (REWRITTEN_HOST, b"/login", b"/session/abc/login"),
        # the Host form: no prefix; the backend's own host leads to the public origin
        (HOST_FORM, b"http://127.0.0.1:5000/login?x", b"/login?x"),
        (HOST_FORM, b"/login", b"/login"),
        (HOST_FORM, b"http://abc.tunnels.test/login", b"/login"),
        (HOST_FORM, b"http://other.test/login", b"http://other.test/login"),
        # made root-relative, these would name another host (an open redirect): kept
        (HOST_FORM, b"http://127.0.0.1:5000//evil.test/x", b"http://127.0.0.1:5000//evil.test/x"),
        (HOST_FORM, b"https://abc.tunnels.test//evil.test", b"https://abc.tunnels.test//evil.test"),
        (HOST_FORM, b"http://127.0.0.1:5000/\\evil.test", b"http://127.0.0.1:5000/\\evil.test"),
        (PATH_FORM, b"http://relay.test:8000//evil.test/x", b"/session/abc//evil.test/x"),
    ],
)
def test_location_values(rewrite: UrlRewrite, given: bytes, expected: bytes) -> None:
    assert rewrite.url(given) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (b"5; url=/x", b"5; url=/session/abc/x"),
        (b"0;URL='/x?y'", b"0;URL='/session/abc/x?y'"),
        (b'3, url="http://relay.test:8000/x" ', b'3, url="/session/abc/x" '),
        (b"1; /x", b"1; /session/abc/x"),
        (b"5", b"5"),
        (b"5; url=", b"5; url="),
        (b"5; url=https://example.com/", b"5; url=https://example.com/"),
        (b"5; url=next", b"5; url=next"),
        (b"soon; url=/x", b"soon; url=/x"),
    ],
)
def test_refresh_values(given: bytes, expected: bytes) -> None:
    assert PATH_FORM.refresh(given) == expected


@pytest.mark.parametrize(
    ("rewrite", "given", "expected"),
    [
        (PATH_FORM, b"sid=1; Path=/", b"sid=1; Path=/session/abc"),
        (PATH_FORM, b"sid=1; Path=/app; HttpOnly", b"sid=1; Path=/session/abc/app; HttpOnly"),
        (PATH_FORM, b"sid=1; path = /app", b"sid=1; path =/session/abc/app"),
        (PATH_FORM, b"sid=1; Path=/session/abc/app", b"sid=1; Path=/session/abc/app"),
        (PATH_FORM, b"sid=1; Path=/session/abc", b"sid=1; Path=/session/abc"),
        # no Path: none added (the browser's default path is already under the prefix)
        (PATH_FORM, b"sid=1; HttpOnly", b"sid=1; HttpOnly"),
        (PATH_FORM, b"sid=1; Path=app", b"sid=1; Path=app"),
        # a Domain naming an own host is dropped; others are the browser's to judge
        (PATH_FORM, b"sid=1; Domain=relay.test; Path=/", b"sid=1; Path=/session/abc"),
        (PATH_FORM, b"sid=1; domain=.RELAY.TEST", b"sid=1"),
        (PATH_FORM, b"sid=1; Domain=example.com", b"sid=1; Domain=example.com"),
        (REWRITTEN_HOST, b"sid=1; Domain=127.0.0.1; Path=/", b"sid=1; Path=/session/abc"),
        # the Host form: Path kept; the backend's own Domain dropped, the public one kept
        (HOST_FORM, b"sid=1; Domain=127.0.0.1; Path=/", b"sid=1; Path=/"),
        (HOST_FORM, b"sid=1; Domain=abc.tunnels.test", b"sid=1; Domain=abc.tunnels.test"),
        # the cookie's own value is never looked into
        (PATH_FORM, b"Path=/x; Secure", b"Path=/x; Secure"),
        (PATH_FORM, b"", b""),
    ],
)
def test_set_cookie_values(rewrite: UrlRewrite, given: bytes, expected: bytes) -> None:
    assert rewrite.cookie(given) == expected


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (request_head(prefix=None), "the Host form with the public Host: nothing to do"),
        (request_head(prefix=b"/session/abc/"), "a prefix with a trailing slash is no prefix"),
        (request_head(prefix=b"session"), "a prefix must be a path"),
        (request_head(prefix=b"/a b"), "a prefix must be a plain path"),
        (b"nonsense\r\n\r\n", "a head with no fields"),
    ],
)
def test_no_rewriting_without_a_prefix_or_another_host(head: bytes, why: str) -> None:
    assert url_rewrite_for(head) is None, why


def response(*lines: bytes) -> tuple[http.ResponseHead, bytes]:
    head = b"\r\n".join([b"HTTP/1.1 302 Found", *lines]) + b"\r\n\r\n"
    return http.parse_response_head(head), head


def test_response_head_fields_are_rewritten_and_others_kept_byte_for_byte() -> None:
    parsed, head = response(
        b"location:   /login",
        b"X-Location: /not-this",
        b"Content-Location: /doc",
        b"Refresh: 5; url=/r",
        b"Set-Cookie: a=1; Path=/",
        b"Set-Cookie: b=2",
        b"Content-Length: 0",
    )
    tunnel_head, _ = _response_head_for_tunnel(parsed, http.Framing.LENGTH, request_head())
    assert tunnel_head == (
        b"HTTP/1.1 302 Found\r\nlocation: /session/abc/login\r\nX-Location: /not-this\r\n"
        b"Content-Location: /session/abc/doc\r\nRefresh: 5; url=/session/abc/r\r\n"
        b"Set-Cookie: a=1; Path=/session/abc\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"
    )
    # Without the request (the Host form with the public Host), the head is as it was.
    plain, _ = _response_head_for_tunnel(parsed, http.Framing.LENGTH)
    assert plain == head


def test_the_cheap_check_sees_only_the_url_fields() -> None:
    assert not has_url_fields(response(b"Content-Type: text/html", b"X-Location: /x")[0])
    for line in (b"Location: /", b"content-location: /", b"REFRESH: 1", b"Set-Cookie: a=1"):
        assert has_url_fields(response(line)[0]), line


# Field values as the parser admits them: visible bytes, obs-text, inner spaces and tabs.
_VALUE_BYTES = st.sampled_from(
    [bytes([b]) for b in range(0x21, 0x7F)] + [b" ", b"\t", b"\x80", b"\xff"]
)
_URLISH = st.sampled_from(
    [b"/", b"//", b"http://", b"HTTPS://", b"relay.test:8000", b"127.0.0.1:5000", b"/session/abc"]
)
_PUNCTUATION = st.sampled_from(
    [b"?", b"#", b";", b"=", b"Path=", b" Domain=", b"url=", b"'", b'"', b"5", b",", b"."]
)
_VALUES = st.lists(st.one_of(_VALUE_BYTES, _URLISH, _PUNCTUATION), max_size=12).map(b"".join)
_NAMES = st.sampled_from(
    [b"Location", b"content-location", b"Refresh", b"Set-Cookie", b"X-Other", b"location"]
)


@given(
    fields=st.lists(st.tuples(_NAMES, _VALUES), max_size=6),
    rewrite=st.sampled_from([PATH_FORM, REWRITTEN_HOST, HOST_FORM]),
)
def test_rewriting_never_fails_keeps_the_head_valid_and_is_idempotent(
    fields: list[tuple[bytes, bytes]], rewrite: UrlRewrite
) -> None:
    block = b"".join(b"%s: %s\r\n" % (name, value.strip(b" \t")) for name, value in fields)
    once = rewrite.fields(block)
    parsed = http.parse_response_head(b"HTTP/1.1 200 OK\r\n" + once + b"\r\n")
    assert [n for n, _ in parsed.headers] == [n for n, _ in fields]
    assert rewrite.fields(once) == once
    for (name, value), (_, new) in zip(fields, parsed.headers, strict=True):
        if name == b"X-Other":
            assert new == value.strip(b" \t")


@given(head=st.binary(max_size=300))
def test_any_request_head_gives_a_rewrite_or_none(head: bytes) -> None:
    rewrite = url_rewrite_for(head)
    assert rewrite is None or isinstance(rewrite, UrlRewrite)


# --- through a real relay and agent --------------------------------------------------------


def client() -> httpx.AsyncClient:
    """A client that follows redirects and keeps cookies, as a browser does."""
    return httpx.AsyncClient(follow_redirects=True, timeout=STEP_TIMEOUT)


def paths(answer: httpx.Response) -> list[str]:
    """The path of every URL a followed request went through, the last one included."""
    return [r.url.path for r in [*answer.history, answer]]


async def test_flask_redirect_and_cookie_path_survive_the_prefix() -> None:
    from apps.prefix_flask import app

    with trio.fail_after(30), wsgi_server(app) as port:
        async with (
            tunnel2.open_tunnel_server(ServerConfig(port=0)) as relay,
            tunnel2.open_tunnel(relay.base_url, port) as agent,
            client() as browser,
        ):
            base = agent.public_url  # http://127.0.0.1:PORT/session/ID/
            prefix = f"/session/{agent.session_id}"
            form = await browser.get(base)
            assert form.status_code == 200, form.text
            assert paths(form) == [prefix + "/", prefix + "/login"]
            assert 'action="/login"' in form.text  # the body is not rewritten
            welcome = await browser.post(base + "login", data={"user": "alice"})
            assert (welcome.status_code, welcome.text) == (200, "welcome alice")
            assert paths(welcome) == [prefix + "/login", prefix + "/home"]
            cookie = welcome.history[0].headers["set-cookie"]
            assert f"Path={prefix}/home" in cookie, cookie


async def test_flask_under_proxyfix_writes_prefixed_links_and_is_not_prefixed_twice() -> None:
    """The README's advice for links in bodies: ProxyFix(x_prefix=1) makes the prefix the
    app's SCRIPT_NAME; its redirects are then already prefixed and kept as they are."""
    from apps.prefix_flask import app
    from werkzeug.middleware.proxy_fix import ProxyFix

    with trio.fail_after(30), wsgi_server(ProxyFix(app.wsgi_app, x_prefix=1)) as port:
        async with (
            tunnel2.open_tunnel_server(ServerConfig(port=0)) as relay,
            tunnel2.open_tunnel(relay.base_url, port) as agent,
            client() as browser,
        ):
            prefix = f"/session/{agent.session_id}"
            form = await browser.get(agent.public_url)
            assert form.status_code == 200, form.text
            assert form.history[0].headers["location"] == prefix + "/login"
            assert f'action="{prefix}/login"' in form.text
            welcome = await browser.post(agent.public_url + "login", data={"user": "bob"})
            assert (welcome.status_code, welcome.text) == (200, "welcome bob")


async def test_host_header_rewrite_backend_urls_are_its_own() -> None:
    """With the target's own Host, the absolute URLs the app builds from it still lead
    back through the tunnel."""
    from apps.prefix_flask import app

    with trio.fail_after(30), wsgi_server(app) as port:
        async with (
            tunnel2.open_tunnel_server(ServerConfig(port=0)) as relay,
            tunnel2.open_tunnel(relay.base_url, port, host_header="rewrite") as agent,
            client() as browser,
        ):
            prefix = f"/session/{agent.session_id}"
            form = await browser.get(agent.public_url + "absolute")
            assert form.status_code == 200, form.text
            assert form.history[0].headers["location"] == prefix + "/login"
            assert form.url.host == "127.0.0.1"
            assert form.url.port == relay.port


@pytest.fixture(scope="module")
def django_app() -> Any:
    """The Django project's WSGI handler, serving its static files too (as runserver
    does)."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "apps.django_settings"
    import django
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.wsgi import get_wsgi_application

    django.setup()
    return StaticFilesHandler(get_wsgi_application())


async def test_django_admin_login_redirect_survives_the_prefix(django_app: Any) -> None:
    with trio.fail_after(30), wsgi_server(django_app, wsgiref=True) as port:
        async with (
            tunnel2.open_tunnel_server(ServerConfig(port=0)) as relay,
            tunnel2.open_tunnel(relay.base_url, port) as agent,
            client() as browser,
        ):
            prefix = f"/session/{agent.session_id}"
            login = await browser.get(agent.public_url + "admin/")
            assert login.status_code == 200, login.text
            assert paths(login) == [prefix + "/admin/", prefix + "/admin/login/"]
            assert 'name="csrfmiddlewaretoken"' in login.text
            assert browser.cookies.jar, "the CSRF cookie was kept for the prefixed path"
            assert {c.path for c in browser.cookies.jar} == {prefix}


_Address = (
    tuple[Literal[socket.AddressFamily.AF_INET], socket.SocketKind, int, str, tuple[str, int]]
    | tuple[
        Literal[socket.AddressFamily.AF_INET6],
        socket.SocketKind,
        int,
        str,
        tuple[str, int, int, int] | tuple[int, bytes],
    ]
)


class BrowserLikeResolver(trio.abc.HostnameResolver):
    """Resolves ``*.localhost`` to 127.0.0.1 as browsers do (RFC 6761, no DNS set-up);
    nothing else (numeric addresses never reach a custom resolver)."""

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[_Address]:
        await trio.lowlevel.checkpoint()
        if host is None or not host.lower().endswith(b".localhost") or port is None:
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r} is not under localhost")
        number = int(port.decode() if isinstance(port, bytes) else port)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", number))]

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


async def test_django_on_the_host_form_under_localhost_links_its_css(django_app: Any) -> None:
    """What the README advises for apps with links in HTML bodies: Host-based routing.
    ``--domain localhost`` gives ``http://{id}.localhost:PORT/``, which browsers resolve
    to loopback themselves; the admin's redirect and its CSS link work unchanged."""
    trio.socket.set_custom_hostname_resolver(BrowserLikeResolver())
    with trio.fail_after(30), wsgi_server(django_app, wsgiref=True) as port:
        async with (
            tunnel2.open_tunnel_server(ServerConfig(port=0, domain="localhost")) as relay,
            tunnel2.open_tunnel(relay.base_url, port) as agent,
            client() as browser,
        ):
            assert agent.public_url == f"http://{agent.session_id}.localhost:{relay.port}/"
            login = await browser.get(agent.public_url + "admin/")
            assert login.status_code == 200, login.text
            assert paths(login) == ["/admin/", "/admin/login/"]
            assert login.url.host == f"{agent.session_id}.localhost"
            links = re.findall(r'<link rel="stylesheet" href="([^"]+)"', login.text)
            assert links, login.text
            for link in links:
                css = await browser.get(agent.public_url.rstrip("/") + link)
                assert css.status_code == 200, (link, css.status_code)
                assert css.headers["content-type"].startswith("text/css")


@contextmanager
def uvicorn_backend(app: str, *options: str) -> Iterator[int]:
    """Run ``uvicorn APP --port 0 OPTIONS`` from the tests directory; yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "0", *options],
        cwd=Path(__file__).parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        timer = threading.Timer(STEP_TIMEOUT, process.kill)  # a uvicorn that never says
        timer.start()
        try:
            for line in process.stderr:
                lines.append(line)
                if match := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                    break
            else:
                raise AssertionError("uvicorn did not start:\n" + "".join(lines))
        finally:
            timer.cancel()
        yield int(match.group(1))
    finally:
        process.terminate()
        process.wait(STEP_TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()


async def test_fastapi_docs_and_redirects_under_uvicorn_root_path() -> None:
    """FastAPI's /docs page names its openapi.json in its body: it leads back through
    the tunnel when uvicorn is given the prefix as its root path (a fixed session id)."""
    session = "fastapi-docs"
    prefix = f"/session/{session}"
    with uvicorn_backend("apps.prefix_fastapi:app", "--root-path", prefix) as port:
        with trio.fail_after(30):
            async with (
                tunnel2.open_tunnel_server(ServerConfig(port=0)) as relay,
                tunnel2.open_tunnel(relay.base_url, port, session_id=session) as agent,
                client() as browser,
            ):
                assert agent.public_url == f"{relay.base_url}{prefix}/"
                docs = await browser.get(agent.public_url + "docs")
                assert docs.status_code == 200, docs.text
                found = re.search(r"url: '([^']+)'", docs.text)
                assert found is not None, docs.text
                assert found.group(1) == prefix + "/openapi.json"
                schema = await browser.get(f"{relay.base_url}{found.group(1)}")
                assert schema.status_code == 200, schema.text
                assert "/items/" in schema.json()["paths"]
                # Starlette's slash redirect is absolute, to the public host: kept once.
                items = await browser.get(agent.public_url + "items")
                assert (items.status_code, items.json()) == (200, [1, 2])
                assert paths(items) == [prefix + "/items", prefix + "/items/"]


# --- the Host header option ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host_header", "expected"),
    [
        (None, "{public}"),
        ("preserve", "{public}"),
        ("rewrite", "127.0.0.1:{backend}"),
        ("myapp.test:8080", "myapp.test:8080"),
    ],
)
async def test_host_header_modes_through_the_tunnel(
    nursery: trio.Nursery, host_header: str | None, expected: str
) -> None:
    backend: Backend = await nursery.start(serve_backend, "echo")
    with trio.fail_after(20):
        async with (
            tunnel2.open_tunnel_server(ServerConfig(port=0)) as relay,
            tunnel2.open_tunnel(relay.base_url, backend.port, host_header=host_header) as agent,
            httpx.AsyncClient(timeout=STEP_TIMEOUT) as browser,
        ):
            answer = await browser.get(agent.public_url + "x")
    fields = [(n.lower(), v.decode()) for n, v in decode_echo(answer.content).headers]
    public = f"127.0.0.1:{relay.port}"
    assert [v for n, v in fields if n == b"host"] == [
        expected.format(public=public, backend=backend.port)
    ]
    assert [v for n, v in fields if n == b"x-forwarded-host"] == [public]
    assert [f'host="{public}"' in v for n, v in fields if n == b"forwarded"] == [True]


def test_host_header_through_the_sync_api() -> None:
    with (
        wsgi_server(_host_app) as port,
        sync_relay() as relay,
        tunnel2.connect(port, server=relay.base_url, host_header="rewrite") as tunnel,
    ):
        answer = httpx.get(tunnel.public_url, timeout=STEP_TIMEOUT)
    assert answer.json() == {"host": f"127.0.0.1:{port}", "public": f"127.0.0.1:{relay.port}"}


def test_host_header_through_the_asyncio_api() -> None:
    async def main(port: int) -> httpx.Response:
        async with (
            tunnel2.aio.open_tunnel_server(ServerConfig(port=0)) as relay,
            tunnel2.aio.open_tunnel(relay.base_url, port, host_header="app.test") as tunnel,
            httpx.AsyncClient(timeout=STEP_TIMEOUT) as browser,
        ):
            return await browser.get(tunnel.public_url)

    with wsgi_server(_host_app) as port:
        answer = asyncio.run(asyncio.wait_for(main(port), STEP_TIMEOUT))
    assert answer.json()["host"] == "app.test"


def _host_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = json.dumps(
        {"host": environ["HTTP_HOST"], "public": environ["HTTP_X_FORWARDED_HOST"]}
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


@pytest.mark.parametrize(
    ("mode", "tls", "line"),
    [
        ("preserve", False, None),
        ("rewrite", False, b"Host: backend.test:5000\r\n"),
        ("rewrite", True, b"Host: backend.test:5000\r\n"),
        ("my.app", False, b"Host: my.app\r\n"),
        ("[::1]:8080", False, b"Host: [::1]:8080\r\n"),
    ],
)
def test_host_lines(mode: str, tls: bool, line: bytes | None) -> None:
    context = ssl.create_default_context() if tls else None
    forwarder = BackendForwarder("backend.test", 5000, ssl_context=context, host_header=mode)
    assert forwarder._host_line == line


def _host_line_by_regex(head: bytes, line: bytes) -> bytes:
    """What the agent did before its search: every Host line cut by the case-insensitive
    multi-line regex, the new one after the start line."""
    start = head.find(b"\r\n") + 2
    return head[:start] + line + _HOST_FIELD_RE.sub(b"", head[start:])


_LINE = b"Host: backend.test:5000\r\n"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (b"Host: relay.test\r\nAccept: */*\r\n", _LINE + b"Accept: */*\r\n"),
        (b"Accept: */*\r\nhost: relay.test\r\nX: y\r\n", _LINE + b"Accept: */*\r\nX: y\r\n"),
        (b"Accept: */*\r\nHOST:relay.test\r\n", _LINE + b"Accept: */*\r\n"),
        (b"Accept: */*\r\n", _LINE + b"Accept: */*\r\n"),  # HTTP/1.0 without Host
        (b"", _LINE),
        # Look-alikes stay: other names ending in "host", and "host" inside a value.
        (
            b"X-Forwarded-Host: a\r\nHost: b\r\nForwarded: host=c\r\nXhost: d\r\n",
            _LINE + b"X-Forwarded-Host: a\r\nForwarded: host=c\r\nXhost: d\r\n",
        ),
        # Two Host lines (no relay of ours sends them): both go, the general way.
        (b"Host: a\r\nX: y\r\nhost: b\r\n", _LINE + b"X: y\r\n"),
    ],
)
@pytest.mark.parametrize("target", [b"/", b"/host:/x?host:=1"])
def test_the_host_line_is_replaced_and_only_it(
    fields: bytes, expected: bytes, target: bytes
) -> None:
    head = b"GET " + target + b" HTTP/1.1\r\n" + fields + b"\r\n"
    start = b"GET " + target + b" HTTP/1.1\r\n"
    assert _with_host_line(head, _LINE) == start + expected + b"\r\n"
    assert _with_host_line(head, _LINE) == _host_line_by_regex(head, _LINE)


_FIELD_NAME = st.sampled_from([b"Host", b"host", b"HoSt", b"X-Host", b"Hostname", b"Accept"])
_FIELD_VALUE = st.binary(max_size=12).map(
    lambda v: bytes(b for b in v if b not in b"\r\n\x00").strip(b" \t") or b"v"
)


@given(st.lists(st.tuples(_FIELD_NAME, _FIELD_VALUE), max_size=6))
def test_the_host_line_search_agrees_with_the_regex(fields: list[tuple[bytes, bytes]]) -> None:
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"%s: %s\r\n" % f for f in fields) + b"\r\n"
    assert _with_host_line(head, _LINE) == _host_line_by_regex(head, _LINE)


def test_default_ports_are_left_out_of_a_rewritten_host() -> None:
    plain = BackendForwarder("backend.test", 80, host_header="rewrite")
    tls = BackendForwarder("backend.test", 443, ssl_context=ssl.create_default_context())
    assert (plain._host_line, tls._host_line) == (b"Host: backend.test\r\n",) * 2
    assert BackendForwarder("::1", 8080, host_header="rewrite")._host_line == (
        b"Host: [::1]:8080\r\n"
    )


@pytest.mark.parametrize("bad", ["", "a b", "host:port", "a\r\nX: y", "-x.test", "x/y", "ä.test"])
def test_bad_host_header_values_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="must be 'preserve', 'rewrite' or a host"):
        handler_for(8080, host_header=bad)
    with pytest.raises(ValueError, match="must be 'preserve', 'rewrite' or a host"):
        BackendForwarder("127.0.0.1", 8080, host_header=bad)


def test_host_header_is_refused_for_an_asgi_app() -> None:
    assert isinstance(handler_for(hello_app, host_header="preserve"), object)
    with pytest.raises(ValueError, match="not an ASGI app"):
        handler_for(hello_app, host_header="rewrite")


def test_agent_config_carries_the_host_header() -> None:
    assert AgentConfig().host_header is None
    assert AgentConfig(host_header="rewrite").host_header == "rewrite"


async def test_cli_bad_host_header_is_one_line_and_exit_2() -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [sys.executable, "-m", "tunnel2.cli", "http", "8080", "--host-header", "a b"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "must be 'preserve', 'rewrite' or a host[:port]" in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("tunnel2")]) == 1
    assert result.stdout == b""


# --- Host matching at the relay ----------------------------------------------------------------


async def test_host_routing_ignores_case_and_ids_with_capitals_get_no_host_url() -> None:
    config = ServerConfig(domain="Tunnels.test".lower())
    with trio.fail_after(10):
        async with open_memory_tunnel(hello_app, config=config) as tunnel:
            session = tunnel.agent.session_id
            assert session is not None
            for host in (f"{session.upper()}.TUNNELS.test", f"{session}.tunnels.TEST:8000"):
                answer = await tunnel.request("GET", "/x", headers=[("Host", host)], raw_path=True)
                assert (answer.status, answer.text) == (200, "hello /x"), host
        async with open_memory_tunnel(
            hello_app, config=config, agent_config=AgentConfig(session_id="MyApp")
        ) as capitals:
            assert capitals.agent.public_urls == ("http://relay.test/session/MyApp/",)
            by_path = await capitals.request("GET", "/y")
            by_host = await capitals.request(
                "GET", "/y", headers=[("Host", "MyApp.tunnels.test")], raw_path=True
            )
    assert (by_path.status, by_path.text) == (200, "hello /y")
    assert by_host.status == 404
    assert "myapp" in by_host.text


async def test_domain_localhost_gives_id_localhost_urls_on_real_sockets() -> None:
    with trio.fail_after(20):
        async with (
            tunnel2.open_tunnel_server(ServerConfig(port=0, domain="localhost")) as relay,
            tunnel2.open_tunnel(relay.base_url, hello_app) as agent,
            httpx.AsyncClient(timeout=STEP_TIMEOUT) as browser,
        ):
            public = f"{agent.session_id}.localhost:{relay.port}"
            assert agent.public_urls == (
                f"http://{public}/",
                f"{relay.base_url}/session/{agent.session_id}/",
            )
            # What a browser sends for http://{id}.localhost:PORT/ (it resolves the name
            # to loopback itself).
            answer = await browser.get(relay.base_url + "/z", headers={"Host": public})
    assert (answer.status_code, answer.text) == (200, "hello /z")


def test_long_runs_of_spaces_in_a_value_cost_linear_time() -> None:
    """A pattern that backtracks over a value's spaces would take quadratic time on this
    head (a backend can send 64 KiB of them); it passes through unchanged here."""
    value = b"/a" + b" " * 60000 + b"b"
    block = b"Location: %s\r\n" % value
    assert PATH_FORM.fields(block) == block
    assert PATH_FORM.fields(b"Location: /x   \r\n") == b"Location: /session/abc/x\r\n"


async def _redirecting_app(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"location", b"/login"), (b"set-cookie", b"a=1; Path=/")]
    await send({"type": "http.response.start", "status": 302, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def test_an_in_process_asgi_apps_head_is_rewritten_on_the_path_form_only() -> None:
    config = ServerConfig(domain="tunnels.test")
    with trio.fail_after(10):
        async with open_memory_tunnel(_redirecting_app, config=config) as tunnel:
            session = tunnel.agent.session_id
            by_path = await tunnel.request("GET", "/")
            by_host = await tunnel.request(
                "GET", "/", headers=[("Host", f"{session}.tunnels.test")], raw_path=True
            )
    assert by_path.header("location") == f"/session/{session}/login"
    assert by_path.header("set-cookie") == f"a=1; Path=/session/{session}"
    assert (by_host.header("location"), by_host.header("set-cookie")) == ("/login", "a=1; Path=/")
