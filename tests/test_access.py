"""Visitor access control (PROTOCOL.md §3.1.1): the sans-IO policy in :mod:`tunnel2.access`
without trio, then its enforcement at the relay over memory transports and real sockets, the
HELLO refusal of a malformed policy, and the ``tunnel2 http`` flags.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_frames import disallowed_imports

import tunnel2
from tunnel2 import access as access_module
from tunnel2 import frames
from tunnel2.access import MIN_ITERATIONS, AccessPolicy
from tunnel2.agent import AgentConfig
from tunnel2.errors import ErrorCode
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.testing import memory_connector, open_memory_tunnel
from tunnel2.transports import memory_transport_pair
from tunnel2.uplink import receive_handshake_frame

ACCESS_PY: Final = Path(access_module.__file__)
CLI: Final = (sys.executable, "-m", "tunnel2.cli")
FAST: Final = MIN_ITERATIONS  # the cheapest hash the relay accepts keeps the tests quick


def basic(credential: str) -> bytes:
    return b"Basic " + base64.b64encode(credential.encode())


def policy(**options: Any) -> AccessPolicy:
    return AccessPolicy.from_options(iterations=FAST, **options)


# --- the module's own rules -------------------------------------------------------------------


def test_access_imports_only_stdlib_attrs_and_errors() -> None:
    source = ACCESS_PY.read_text(encoding="utf-8")
    assert disallowed_imports(source) == []
    assert "import h11" not in source  # allowed for frames, not needed here


def test_access_policy_is_public() -> None:
    assert tunnel2.AccessPolicy is AccessPolicy
    assert "AccessPolicy" in tunnel2.__all__


# --- building and validating ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"basic_auth": ["alice"]}, "USER:PASSWORD"),
        ({"basic_auth": [":pw"]}, "must not be empty"),
        ({"basic_auth": ["alice:"]}, "password of user 'alice' is empty"),
        ({"basic_auth": ["al\nice:pw"]}, "control character"),
        ({"bearer_token": "  "}, "bearer token is empty"),
        ({"allow_cidrs": ["10.0.0.0/33"]}, "invalid CIDR '10.0.0.0/33'"),
        ({"deny_cidrs": ["not-an-ip"]}, "invalid CIDR 'not-an-ip'"),
        ({"allow_cidrs": ["10.0.0.1/8"]}, "has host bits set"),
        ({"basic_auth": ["a:b"], "iterations": 1001}, "iterations 1001 is not within"),
    ],
)
def test_bad_options_are_value_errors_that_say_what(options: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccessPolicy.from_options(**options)


def test_a_credential_without_a_colon_is_not_echoed() -> None:
    # It is most likely a password typed without its user.
    with pytest.raises(ValueError, match="USER:PASSWORD") as info:
        AccessPolicy.from_options(basic_auth=["hunter2"])
    assert "hunter2" not in str(info.value)


def test_an_empty_policy_lets_everyone_in() -> None:
    empty = AccessPolicy.from_options()
    assert empty.check(None, "unknown") is None
    assert not empty.uses_credentials
    assert empty.to_json() == {}
    assert empty.describe() == "open to everyone"


def test_json_round_trip_keeps_no_secret() -> None:
    original = policy(
        basic_auth=["alice:s3cret-pw", "bob:other:pw"],
        bearer_token="tok-123456",
        allow_cidrs=["10.0.0.0/8", "::1"],
        deny_cidrs=["10.1.0.0/16"],
    )
    document = json.dumps(original.to_json())
    for secret in ("s3cret-pw", "other:pw", "tok-123456"):
        assert secret not in document
    assert '"user":"alice"' in document.replace(" ", "")
    again = AccessPolicy.from_json(json.loads(document))
    assert again == original
    assert again.check(basic("bob:other:pw"), "10.2.3.4") is None
    assert again.check(b"Bearer tok-123456", "10.2.3.4") is None
    assert again.check(basic("bob:other:pw"), "10.1.0.1") is not None  # denied address


@pytest.mark.parametrize(
    "options",
    [{"basic_auth": ["a:b"]}, {"bearer_token": "t"}, {"allow_cidrs": ["1.2.3.0/24"]}, {}],
)
def test_every_part_round_trips_on_its_own(options: Any) -> None:
    original = policy(**options)
    assert AccessPolicy.from_json(original.to_json()) == original


def test_repr_and_describe_name_no_hash_or_salt() -> None:
    pol = policy(basic_auth=["alice:pw"], bearer_token="tok", deny_cidrs=["192.0.2.0/24"])
    text = repr(pol)
    assert text == ("<AccessPolicy basic auth for alice; a bearer token; deny 192.0.2.0/24>")
    assert base64.b64encode(pol.salt).decode() not in text


_GOOD: Final = policy(basic_auth=["alice:pw"], bearer_token="tok").to_json()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({**_GOOD, "require_mtls": True}, "unknown access policy keys: require_mtls"),
        ({**_GOOD, "basic": "alice"}, "'basic' must be a list"),
        ({**_GOOD, "basic": [{"user": "alice"}]}, "'basic' must be a list"),
        ({**_GOOD, "basic": [{"user": 1, "hash": "AA=="}]}, "'basic' must be a list"),
        ({**_GOOD, "basic": [{"user": "a", "hash": "AA=="}]}, "is 1 bytes, expected 32"),
        ({**_GOOD, "basic": [{"user": "a", "hash": "!!"}]}, "not valid base64"),
        ({**_GOOD, "basic": [{"user": "a:b", "hash": _GOOD["bearer_sha256"]}]}, "':'"),
        ({**_GOOD, "salt": "AA=="}, "salt is 1 bytes"),
        ({**_GOOD, "salt": 5}, "'salt' must be a base64 string"),
        ({k: v for k, v in _GOOD.items() if k != "salt"}, "salt is 0 bytes"),
        ({**_GOOD, "iterations": 10**9}, "not within"),
        ({**_GOOD, "iterations": True}, "not within"),
        ({**_GOOD, "iterations": 1.0}, "not within"),
        ({**_GOOD, "bearer_sha256": "AAAA"}, "expected 32"),
        ({"allow_cidrs": "10.0.0.0/8"}, "must be a list of CIDR strings"),
        ({"allow_cidrs": [7]}, "a CIDR must be a string"),
        ({"deny_cidrs": ["10.0.0.0/99"]}, "invalid CIDR"),
        ({"deny_cidrs": ["10.0.0.0/8"] * 257}, "257 deny CIDRs, at most 256"),
        ({**_GOOD, "basic": _GOOD["basic"] * 65}, "65 basic-auth users, at most 64"),
    ],
)
def test_from_json_rejects_malformed_policies(fields: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccessPolicy.from_json(fields)


def test_from_json_rejects_a_non_object() -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        AccessPolicy.from_json([])  # type: ignore[arg-type]


# --- checking credentials ---------------------------------------------------------------------


def test_basic_auth() -> None:
    pol = policy(basic_auth=["alice:pw", "bob:pw2"])
    missing = pol.check(None, "unknown")
    assert missing is not None
    assert missing.status == 401
    assert missing.headers == ((b"WWW-Authenticate", b'Basic realm="tunnel2", charset="UTF-8"'),)
    assert "user name and password" in missing.message
    for good in ("alice:pw", "bob:pw2"):
        assert pol.check(basic(good), "unknown") is None
    assert pol.check(b"bAsIc  " + basic("alice:pw")[6:], "unknown") is None
    for bad in (
        basic("alice:pw2"),  # another user's password
        basic("alice:PW"),
        basic("alice"),
        basic(""),
        b"Basic !!!not-base64",
        b"Basic",
        b"Bearer pw",  # no bearer token in this policy
        basic("alice:pw")[6:],  # no scheme
    ):
        refusal = pol.check(bad, "unknown")
        assert refusal is not None, bad
        assert refusal.status == 401
        assert "not valid" in refusal.message
        assert b"pw" not in refusal.message.encode()


def test_bearer_token() -> None:
    pol = policy(bearer_token="tok-abc")
    missing = pol.check(None, "unknown")
    assert missing is not None
    assert (missing.status, missing.headers) == (
        401,
        ((b"WWW-Authenticate", b'Bearer realm="tunnel2"'),),
    )
    assert "Authorization: Bearer TOKEN" in missing.message
    assert pol.check(b"Bearer tok-abc", "unknown") is None
    assert pol.check(b"bearer tok-abc ", "unknown") is None
    for bad in (b"Bearer tok-ab", b"Bearer tok-abcd", b"Bearer ", b"Basic tok-abc", b"tok-abc"):
        refusal = pol.check(bad, "unknown")
        assert refusal is not None, bad
        assert refusal.status == 401
        assert "tok-abc" not in refusal.message


def test_basic_or_bearer_either_passes_and_both_are_challenged() -> None:
    pol = policy(basic_auth=["alice:pw"], bearer_token="tok")
    assert pol.check(basic("alice:pw"), "unknown") is None
    assert pol.check(b"Bearer tok", "unknown") is None
    refusal = pol.check(b"Bearer pw", "unknown")
    assert refusal is not None
    assert [value.split()[0] for _, value in refusal.headers] == [b"Basic", b"Bearer"]
    assert "or a bearer token" in refusal.message


def test_the_hash_runs_once_per_distinct_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real_kdf = access_module._kdf

    def counting_kdf(credential: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(credential)
        return real_kdf(credential, salt, iterations)

    pol = policy(basic_auth=["alice:pw"])
    monkeypatch.setattr(access_module, "_kdf", counting_kdf)
    for _ in range(3):
        assert pol.check(basic("alice:pw"), "unknown") is None
        assert pol.check(basic("alice:nope"), "unknown") is not None
    assert calls == [b"alice:pw", b"alice:nope"]
    # The cache is bounded: a flood of distinct guesses cannot grow it.
    for n in range(300):
        assert pol.check(basic(f"alice:{n}"), "unknown") is not None
    assert len(pol._verdicts) == 256
    assert b"alice:pw" not in b"".join(pol._verdicts)  # keyed by an HMAC, no cleartext


users = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=":"),
    min_size=1,
    max_size=20,
).filter(str.isprintable)
passwords = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(users, passwords, st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_hypothesis_only_the_right_credential_passes(
    user: str, password: str, guess: bytes
) -> None:
    pol = policy(basic_auth=[f"{user}:{password}"])
    assert pol.check(basic(f"{user}:{password}"), "unknown") is None
    right = f"{user}:{password}".encode()
    if guess != right:
        assert pol.check(b"Basic " + base64.b64encode(guess), "unknown") is not None
    assert pol.check(guess, "unknown") is not None  # raw bytes are never a valid header value


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(str.strip), st.binary(max_size=60))
def test_hypothesis_only_the_right_bearer_token_passes(token: str, guess: bytes) -> None:
    pol = policy(bearer_token=token)
    assert pol.check(b"Bearer " + token.strip().encode(), "unknown") is None
    if guess.strip() != token.strip().encode():
        assert pol.check(b"Bearer " + guess, "unknown") is not None


# --- checking addresses -----------------------------------------------------------------------


def test_deny_wins_and_any_allow_denies_the_rest() -> None:
    pol = policy(
        allow_cidrs=["10.0.0.0/8", "2001:db8::/32", "fe80::/10"], deny_cidrs=["10.9.0.0/16"]
    )
    assert pol.check(None, "10.1.2.3") is None
    assert pol.check(None, "fe80::1%eth0") is None  # a link-local peer keeps its scope
    assert pol.check(None, "2001:db8::1") is None
    assert pol.check(None, "::ffff:10.1.2.3") is None  # an IPv4 client on a dual-stack socket
    for refused in ("10.9.1.1", "192.0.2.1", "2001:db9::1", "::ffff:10.9.0.1", "::1"):
        refusal = pol.check(None, refused)
        assert refusal is not None, refused
        assert refusal.status == 403
        assert "may not reach this tunnel" in refusal.message
        assert refusal.headers == ()


def test_deny_only_lets_everyone_else_in() -> None:
    pol = policy(deny_cidrs=["127.0.0.0/8", "::1/128"])
    assert pol.check(None, "192.0.2.7") is None
    assert pol.check(None, "::2") is None
    refusal = pol.check(None, "127.0.0.1")
    assert refusal is not None
    assert refusal.message == "visitors from 127.0.0.1 may not reach this tunnel"


def test_an_unknown_address_passes_no_address_list() -> None:
    for pol in (policy(allow_cidrs=["0.0.0.0/0"]), policy(deny_cidrs=["192.0.2.0/24"])):
        refusal = pol.check(None, "unknown")
        assert refusal is not None
        assert (refusal.status, "address is unknown" in refusal.message) == (403, True)


def test_the_address_is_checked_before_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    pol = policy(basic_auth=["alice:pw"], deny_cidrs=["192.0.2.0/24"])
    monkeypatch.setattr(access_module, "_kdf", None)  # would raise if the hash ran
    refusal = pol.check(basic("alice:pw"), "192.0.2.1")
    assert refusal is not None
    assert refusal.status == 403


# --- HELLO ------------------------------------------------------------------------------------


def test_hello_carries_the_policy_as_a_json_object() -> None:
    pol = policy(basic_auth=["alice:pw"])
    hello = frames.Hello(access=pol.to_json())
    decoder = frames.FrameDecoder()
    decoder.receive_data(frames.encode(hello))
    decoded = decoder.next_frame()
    assert decoded == hello
    assert hash(decoded) == hash(hello)  # the JSON object does not make HELLO unhashable
    assert isinstance(decoded, frames.Hello)
    assert decoded.access is not None
    assert AccessPolicy.from_json(decoded.access) == pol


async def refusal_for(hello_payload: bytes) -> frames.Frame | None:
    """Send a hand-made HELLO frame to a relay; return its answer."""
    server = TunnelServer(ServerConfig(), base_url="http://relay.test")
    ours, theirs = memory_transport_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_agent, theirs)
        await ours.send(hello_payload)
        answer = await receive_handshake_frame(ours, frames.FrameDecoder())
    assert server.access_policies == {}
    return answer


@pytest.mark.parametrize(
    ("access", "reason"),
    [
        ({"basic": "nope"}, "malformed access policy: 'basic' must be a list"),
        ({"allow_cidrs": ["300.0.0.0/8"]}, "malformed access policy: invalid CIDR '300.0.0.0/8'"),
        ({"bouncer": True}, "malformed access policy: unknown access policy keys: bouncer"),
    ],
)
async def test_relay_refuses_a_malformed_policy(access: dict[str, Any], reason: str) -> None:
    with trio.fail_after(5):
        answer = await refusal_for(frames.encode(frames.Hello(access=access)))
    assert isinstance(answer, frames.Refuse)
    assert answer.code == ErrorCode.PROTOCOL_ERROR
    assert answer.reason.startswith(reason), answer.reason


async def test_relay_refuses_an_access_field_that_is_not_an_object() -> None:
    payload = b"\x00\x01" + json.dumps({"max_frame_size": 65536, "capabilities": [],
                                         "access": ["basic"]}).encode()  # fmt: skip
    wire = len(payload).to_bytes(4, "big") + b"\x01\x00" + b"\x00" * 4 + payload
    with trio.fail_after(5):
        answer = await refusal_for(wire)
    assert isinstance(answer, frames.Refuse)
    assert answer.code == ErrorCode.PROTOCOL_ERROR
    assert "access" in answer.reason


# --- enforcement at the relay, over memory ----------------------------------------------------


@attrs.define
class CountingApp:
    """An ASGI app that counts its requests and records the headers it saw."""

    seen: list[dict[bytes, bytes]] = attrs.Factory(list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.seen.append({n.lower(): v for n, v in scope["headers"]})
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"backend says hi"})


def memory(app: CountingApp, pol: AccessPolicy | None) -> Any:
    return open_memory_tunnel(app, agent_config=AgentConfig(access=pol), asgi_loop="trio")


async def test_basic_auth_over_memory() -> None:
    app = CountingApp()
    with trio.fail_after(10):
        async with memory(app, policy(basic_auth=["alice:pw"])) as tunnel:
            assert tunnel.server.policy_for(tunnel.agent.session_id) is not None
            missing = await tunnel.request("GET", "/")
            wrong = await tunnel.request("GET", "/", headers=[("Authorization", basic_s("a:x"))])
            assert app.seen == []  # refused at the relay: the agent never saw them
            right = await tunnel.request(
                "POST",
                "/",
                headers=[("aUTHORIZATION", basic_s("alice:pw")), ("X-Keep", "1")],
                body=b"data",
            )
    assert missing.status == 401
    assert missing.header("www-authenticate") == 'Basic realm="tunnel2", charset="UTF-8"'
    assert missing.header("content-type") == "text/plain; charset=utf-8"
    assert "requires a user name and password" in missing.text
    assert wrong.status == 401
    assert "not valid" in wrong.text
    assert (right.status, right.body) == (200, b"backend says hi")
    assert len(app.seen) == 1
    assert b"authorization" not in app.seen[0]
    assert app.seen[0][b"x-keep"] == b"1"


def basic_s(credential: str) -> str:
    return basic(credential).decode()


async def test_bearer_token_over_memory() -> None:
    app = CountingApp()
    with trio.fail_after(10):
        async with memory(app, policy(bearer_token="tok-1")) as tunnel:
            missing = await tunnel.request("GET", "/")
            wrong = await tunnel.request("GET", "/", headers=[("Authorization", "Bearer tok-2")])
            assert app.seen == []
            right = await tunnel.request("GET", "/", headers=[("Authorization", "Bearer tok-1")])
    assert missing.status == wrong.status == 401
    assert missing.header("www-authenticate") == 'Bearer realm="tunnel2"'
    assert "tok-1" not in wrong.text
    assert right.status == 200
    assert b"authorization" not in app.seen[0]


async def test_two_authorization_headers_are_a_400() -> None:
    app = CountingApp()
    with trio.fail_after(10):
        async with memory(app, policy(bearer_token="t")) as tunnel:
            response = await tunnel.request(
                "GET", "/", headers=[("Authorization", "Bearer t"), ("Authorization", "Bearer x")]
            )
    assert response.status == 400
    assert "more than one Authorization header" in response.text
    assert app.seen == []


async def test_an_address_policy_fails_closed_when_the_address_is_unknown() -> None:
    # Memory streams have no peer address; an address list must not then let everyone in.
    app = CountingApp()
    with trio.fail_after(10):
        async with memory(app, policy(allow_cidrs=["0.0.0.0/0", "::/0"])) as tunnel:
            response = await tunnel.request("GET", "/")
    assert response.status == 403
    assert "address is unknown" in response.text
    assert app.seen == []


async def test_no_policy_leaves_requests_unchanged() -> None:
    app = CountingApp()
    with trio.fail_after(10):
        async with memory(app, None) as tunnel:
            assert tunnel.server.policy_for(tunnel.agent.session_id) is None
            response = await tunnel.request("GET", "/", headers=[("Authorization", "Bearer x")])
    assert response.status == 200
    assert app.seen[0][b"authorization"] == b"Bearer x"


async def test_the_policy_goes_with_the_last_agent_and_the_newest_one_wins() -> None:
    app = CountingApp()
    fixed = "shared-session"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            first_policy = policy(bearer_token="one")
            # Only agents of one identity share a session (PROTOCOL.md §3.4).
            async with open_memory_tunnel(
                app,
                config=ServerConfig(tokens=frozenset({"team=team-token"})),
                agent_config=AgentConfig(session_id=fixed, access=first_policy, token="team-token"),
            ) as tunnel:
                server = tunnel.server
                assert server.policy_for(fixed) == first_policy
                # A second agent joins the same session with its own policy: it wins.
                second_policy = policy(bearer_token="two")
                agent = tunnel2.Agent(
                    memory_connector(server, nursery),
                    tunnel2.api.handler_for(app, asgi_loop="trio"),
                    AgentConfig(session_id=fixed, access=second_policy, token="team-token"),
                )
                scope = trio.CancelScope()

                async def run_second(task_status: trio.TaskStatus[tunnel2.Agent]) -> None:
                    with scope:
                        await agent.serve(task_status=task_status)

                await nursery.start(run_second)
                assert server.policy_for(fixed) == second_policy
                ok = await tunnel.request("GET", "/", headers=[("Authorization", "Bearer two")])
                old = await tunnel.request("GET", "/", headers=[("Authorization", "Bearer one")])
                scope.cancel()
            # Both agents gone: nothing is left behind for the session id.
            await wait_for(lambda: fixed not in server.access_policies)
    assert (ok.status, old.status) == (200, 401)


async def wait_for(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 - the relay offers no event for this
        await trio.sleep(0.01)


# --- enforcement at the relay, over real sockets ----------------------------------------------


@asynccontextmanager
async def socket_tunnel(app: CountingApp, pol: AccessPolicy | None) -> AsyncIterator[str]:
    """A real relay on 127.0.0.1 and an agent opened with ``open_tunnel(access=...)``; yields
    the public URL."""
    async with (
        tunnel2.open_tunnel_server(ServerConfig(port=0)) as server,
        tunnel2.open_tunnel(server.base_url, app, access=pol, asgi_loop="trio") as agent,
    ):
        yield agent.public_url


async def get(url: str, headers: Iterable[tuple[str, str]] = ()) -> tuple[int, dict[str, str], str]:
    """One ``Connection: close`` GET over a real socket; (status, headers, body)."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    lines = [f"GET /{path} HTTP/1.1", f"Host: {hostport}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    try:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    finally:
        await stream.aclose()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    parsed = {n.strip().lower(): v.strip() for n, _, v in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), parsed, body.decode()


async def test_deny_cidr_over_real_sockets() -> None:
    app = CountingApp()
    with trio.fail_after(15):
        async with socket_tunnel(app, policy(deny_cidrs=["127.0.0.0/8"])) as url:
            status, fields, body = await get(url)
    assert status == 403
    assert "www-authenticate" not in fields
    assert body == "403 Forbidden: visitors from 127.0.0.1 may not reach this tunnel\n"
    assert app.seen == []


async def test_allow_cidr_over_real_sockets_keeps_the_authorization_header() -> None:
    app = CountingApp()
    with trio.fail_after(15):
        async with socket_tunnel(app, policy(allow_cidrs=["127.0.0.1/32"])) as url:
            status, _, body = await get(url, [("Authorization", "Bearer for-the-backend")])
            twice, _, _ = await get(url, [("Authorization", "A"), ("Authorization", "B")])
    assert (status, body) == (200, "backend says hi")
    # The policy used no credential, so the backend's own Authorization passes through,
    # repeated or not: it is the backend's business.
    assert app.seen[0][b"authorization"] == b"Bearer for-the-backend"
    assert twice == 200


async def test_allow_other_network_over_real_sockets() -> None:
    app = CountingApp()
    with trio.fail_after(15):
        async with socket_tunnel(app, policy(allow_cidrs=["192.0.2.0/24"])) as url:
            status, _, _ = await get(url)
    assert status == 403
    assert app.seen == []


async def test_basic_auth_and_address_over_real_sockets() -> None:
    app = CountingApp()
    pol = policy(basic_auth=["alice:pw"], allow_cidrs=["127.0.0.1/32"])
    with trio.fail_after(15):
        async with socket_tunnel(app, pol) as url:
            refused, fields, body = await get(url)
            assert app.seen == []
            ok, _, _ = await get(url, [("Authorization", basic_s("alice:pw"))])
    assert refused == 401
    assert fields["www-authenticate"] == 'Basic realm="tunnel2", charset="UTF-8"'
    assert fields["connection"] == "close"
    assert body.startswith("401 Unauthorized: this tunnel requires a user name and password")
    assert ok == 200
    assert b"authorization" not in app.seen[0]


# --- tunnel2 http -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--basic-auth", "hunter2"], "USER:PASSWORD"),
        (["--allow-cidr", "10.0.0.0/40"], "invalid CIDR '10.0.0.0/40'"),
        (["--deny-cidr", "nope"], "invalid CIDR 'nope'"),
        (["--bearer-token", " "], "bearer token is empty"),
    ],
)
async def test_cli_bad_access_values_exit_2(args: list[str], message: str) -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, "http", "8080", *args], capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.startswith("tunnel2 http: ")
    assert message in stderr
    assert stderr.count("\n") == 1
    assert "hunter2" not in stderr


async def test_cli_reads_basic_auth_from_the_environment(tmp_path: Path) -> None:
    """``tunnel2 http`` with TUNNEL2_BASIC_AUTH: the relay asks visitors for a password."""
    env = {**os.environ, "TUNNEL2_BASIC_AUTH": "alice:from-env\nbob:second"}
    port = "9"  # nothing listens there: a request that gets past the relay is a 502
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server: TunnelServer = await nursery.start(
                tunnel2.serve_tunnel_server, ServerConfig(port=0)
            )
            with (tmp_path / "agent.err").open("wb") as err:
                process = await trio.lowlevel.open_process(
                    [*CLI, "http", port, "--server", server.base_url],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            try:
                assert process.stdout is not None
                out = bytearray()
                while b"\n" not in out:
                    chunk = await process.stdout.receive_some(4096)
                    assert chunk, (bytes(out), (tmp_path / "agent.err").read_text())
                    out += chunk
                public_url = out.decode().split()[1]
                log = (tmp_path / "agent.err").read_text()
                assert "visitors need: basic auth for alice, bob\n" in log, log
                missing, _, _ = await get(public_url)
                wrong, _, _ = await get(public_url, [("Authorization", basic_s("bob:from-env"))])
                passed, _, _ = await get(public_url, [("Authorization", basic_s("bob:second"))])
            finally:
                process.kill()
                await process.wait()
                assert process.stdout is not None
                await process.stdout.aclose()
            nursery.cancel_scope.cancel()
    assert (missing, wrong, passed) == (401, 401, 502)
    assert "from-env" not in (tmp_path / "agent.err").read_text()
