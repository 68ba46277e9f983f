"""Who may hold a session: tokens with identities, the session store, the route table, and
the relay's handshake decisions (memory transports)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
import trio
import trio.testing

from tunnel2 import frames
from tunnel2.entry import ProxyEntry
from tunnel2.errors import ErrorCode
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.sessions import (
    DISCONNECTED,
    UNKNOWN,
    MemorySessionStore,
    Routed,
    RouteTable,
    SessionLimit,
    SessionTaken,
)
from tunnel2.tokens import Identity, TokenError, TokenTable
from tunnel2.transports import FrameTransport, memory_transport_pair
from tunnel2.uplink import receive_handshake_frame

if TYPE_CHECKING:
    from tunnel2.uplink import TunnelUplink

ALICE = "alice-token-0001"
ALICE_2 = "alice-token-0002"
BOB = "bob-token-0001"
MALLORY = "mallory-token-01"
TOKEN_FILE = f"""
# token            name     may claim
{ALICE}            alice    alice alice-*
{ALICE_2}          alice    shared
{BOB}              bob
{MALLORY}          mallory
"""


class FakeUplink:
    accepting = True
    open_streams = 0
    peer_draining = False

    def heartbeat_late(self, now: float) -> bool:
        return False


def uplink() -> TunnelUplink:
    return cast("TunnelUplink", FakeUplink())


# --- tokens --------------------------------------------------------------------------------


def test_token_file_names_identities_and_merges_grants() -> None:
    table = TokenTable.from_lines(TOKEN_FILE.splitlines())
    assert table.identities == {"alice", "bob", "mallory"}
    alice = table.identify(ALICE)
    assert alice == table.identify(ALICE_2)
    assert alice is not None
    assert alice.name == "alice"
    assert set(alice.patterns) == {"alice", "alice-*", "shared"}
    assert table.identify("alice-token-0003") is None
    assert table.identify(None) is None


def test_patterns_decide_who_may_claim_a_fixed_id() -> None:
    table = TokenTable.from_lines(TOKEN_FILE.splitlines())
    alice, bob = table.identify(ALICE), table.identify(BOB)
    assert alice is not None
    assert bob is not None
    assert table.may_claim(alice, "alice-web")
    assert not table.may_claim(alice, "bobs-app")  # patterns limit their holder
    assert table.may_claim(bob, "bobs-app")  # no patterns: what nobody else's covers
    assert not table.may_claim(bob, "alice-web")  # granted to alice: bob may never take it
    assert not table.may_claim(bob, "shared")


def test_bare_tokens_are_identities_named_by_digest_or_by_name() -> None:
    table = TokenTable.from_tokens(["s3cret", "ci=another-one"])
    first, second = table.identify("s3cret"), table.identify("another-one")
    assert first is not None
    assert first.name.startswith("token-")
    assert "s3cret" not in first.name
    assert second == Identity("ci")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lonely-token", "line 1: expected 'TOKEN NAME"),
        ("tok bad/name", "name 'bad/name'"),
        ("tok name bad/pattern", "pattern 'bad/pattern'"),
        ("tok a\ntok b", "line 2: this token is listed twice"),
    ],
)
def test_malformed_token_files_say_which_line(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        TokenTable.from_lines(text.splitlines())


def test_empty_or_spaced_tokens_are_refused() -> None:
    with pytest.raises(TokenError):
        TokenTable.from_tokens([""])
    with pytest.raises(TokenError):
        TokenTable.from_tokens(["has space"])


# --- the store -------------------------------------------------------------------------------


async def test_store_claims_are_fenced_by_epoch() -> None:
    store = MemorySessionStore(grace_period=30)
    first = await store.claim("s", "alice", now=0, exclusive=False, keep_owner=True)
    second = await store.claim("s", "alice", now=0, exclusive=False, keep_owner=True)
    assert second.epoch > first.epoch
    await store.release(first, now=1)
    await store.release(first, now=2)  # a late second notice of the same departure
    assert await store.get("s", now=100) is not None  # still held by the second claim
    await store.release(second, now=3)
    assert await store.get("s", now=30) is not None  # leased
    with pytest.raises(SessionTaken, match="another identity"):
        await store.claim("s", "mallory", now=40, exclusive=False, keep_owner=True)
    assert store.owner_of("s") == "alice"  # a kept owner outlives the lease


async def test_store_exclusive_claims_and_stale_nonces() -> None:
    store = MemorySessionStore(grace_period=5)
    lease = await store.claim("x", "", now=0, exclusive=True, keep_owner=False)
    with pytest.raises(SessionTaken, match="held by another agent"):
        await store.claim("x", "", now=0, exclusive=True, keep_owner=False)
    again = await store.claim("x", "", now=0, exclusive=True, keep_owner=False, nonce=lease.nonce)
    await store.release(lease, now=1)
    await store.release(again, now=1)
    with pytest.raises(SessionTaken):  # leased: still nobody else's
        await store.claim("x", "", now=3, exclusive=True, keep_owner=False)
    fresh = await store.claim("x", "", now=7, exclusive=True, keep_owner=False)  # ran out
    assert fresh.nonce != lease.nonce
    await store.release(fresh, now=7)
    with pytest.raises(SessionTaken, match="no longer valid"):
        await store.claim("x", "", now=8, exclusive=False, keep_owner=False, nonce=lease.nonce)


async def test_store_keeps_owners_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "owners.json"
    store = MemorySessionStore(grace_period=1, owners_file=path)
    await store.claim("web", "alice", now=0, exclusive=False, keep_owner=True)
    await store.claim("tmp", "alice", now=0, exclusive=False, keep_owner=False)
    assert json.loads(path.read_text())["owners"] == {"web": "alice"}
    reborn = MemorySessionStore(grace_period=1, owners_file=path)
    with pytest.raises(SessionTaken, match="another identity"):
        await reborn.claim("web", "mallory", now=0, exclusive=False, keep_owner=True)
    await reborn.claim("web", "alice", now=0, exclusive=False, keep_owner=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read session owners"):
        MemorySessionStore(grace_period=1, owners_file=path)


async def test_store_forgets_sessions_whose_lease_ran_out_unasked() -> None:
    # A token holder re-dialling without its resume key makes a new random session each
    # time; ones nobody asks for again must not pile up (nor count against it).
    store = MemorySessionStore(grace_period=5)
    for n in range(50):
        lease = await store.claim(f"r{n}", "bob", now=n, exclusive=True, keep_owner=False)
        await store.release(lease, now=n)
    assert len(store) <= 6
    assert store.sessions_of("bob") == len(store)
    await store.get("other", now=1000)
    assert len(store) == 0
    assert store.sessions_of("bob") == 0
    # A stale deadline (the session was claimed again) forgets nothing.
    lease = await store.claim("s", "bob", now=0, exclusive=True, keep_owner=False)
    await store.release(lease, now=0)
    again = await store.claim("s", "bob", now=1, exclusive=False, keep_owner=False)
    assert await store.get("s", now=100) is not None
    await store.release(again, now=100)
    assert await store.get("s", now=104) is not None
    assert await store.get("s", now=106) is None


async def test_store_caps_the_sessions_of_one_owner() -> None:
    store = MemorySessionStore(grace_period=5)
    web = await store.claim("web", "bob", now=0, exclusive=False, keep_owner=True, max_per_owner=2)
    tmp = await store.claim("tmp", "bob", now=0, exclusive=True, keep_owner=False, max_per_owner=2)
    with pytest.raises(SessionLimit, match="has 2 sessions, the most it may have") as caught:
        await store.claim(
            "one-more", "bob", now=0, exclusive=True, keep_owner=False, max_per_owner=2
        )
    assert isinstance(caught.value, SessionTaken)
    # Joining a session it has is never refused; another owner has its own count.
    await store.claim("web", "bob", now=0, exclusive=False, keep_owner=True, max_per_owner=2)
    await store.claim("a", "alice", now=0, exclusive=True, keep_owner=False, max_per_owner=2)
    # A fixed id it owns counts after its lease; a random one is forgotten, freeing a seat.
    await store.release(web, now=1)
    await store.release(tmp, now=1)
    await store.claim("new", "bob", now=10, exclusive=True, keep_owner=False, max_per_owner=2)
    assert store.sessions_of("bob") == 2  # web (owned for good) and new


# --- the route table -------------------------------------------------------------------------


def test_routes_ties_round_robin_over_a_sessions_uplinks() -> None:
    routes = RouteTable(grace_period=30)
    a, b = uplink(), uplink()
    routes.attach("s", a)
    routes.attach("s", b)
    picks = {cast("Routed", routes.route("s", now=0)).uplink for _ in range(4)}
    assert picks == {a, b}


def test_a_late_departure_does_not_remove_a_newer_uplink() -> None:
    routes = RouteTable(grace_period=30)
    old, new = uplink(), uplink()
    routes.attach("s", old)
    routes.attach("s", new)
    routes.detach("s", old, now=1)
    routes.detach("s", old, now=2)
    assert routes.route("s", now=3) == Routed(new)


def test_a_session_without_agents_is_disconnected_then_unknown() -> None:
    routes = RouteTable(grace_period=30)
    link = uplink()
    routes.attach("s", link)
    routes.detach("s", link, now=10)
    assert routes.route("s", now=20) is DISCONNECTED
    assert routes.route("s", now=41) is UNKNOWN
    assert routes.route("nosuch", now=0) is UNKNOWN
    assert len(routes) == 0


async def test_public_urls_by_path_and_by_host() -> None:
    plain = TunnelServer(ServerConfig(), base_url="http://relay.example:8000/")
    assert plain.public_urls("abc") == ("http://relay.example:8000/session/abc/",)
    hosted = TunnelServer(ServerConfig(domain="t.example"), base_url="http://relay.example:8000")
    urls = hosted.public_urls("abc")
    assert urls == ("http://abc.t.example:8000/", "http://relay.example:8000/session/abc/")


# --- handshakes: who may hold what --------------------------------------------------------------


class Relay:
    """A TunnelServer whose agents are raw HELLOs over memory transports."""

    def __init__(self, server: TunnelServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery

    @asynccontextmanager
    async def agent(self, **hello: object) -> AsyncIterator[frames.Frame]:
        """Say HELLO; yield the answer while the connection stays open."""
        ours, theirs = memory_transport_pair()
        self.nursery.start_soon(self.server.handle_agent, theirs)
        try:
            yield await self.hello(ours, **hello)
        finally:
            await ours.aclose()

    async def hello(self, transport: FrameTransport, **hello: object) -> frames.Frame:
        await transport.send(frames.encode(frames.Hello(**hello)))  # type: ignore[arg-type]
        return await receive_handshake_frame(transport, frames.FrameDecoder())

    async def agents_of(self, session_id: str, count: int) -> None:
        # The route table offers no event to wait on.
        while len(self.server.routes.uplinks_of(session_id)) != count:  # noqa: ASYNC110
            await trio.sleep(0.01)


@asynccontextmanager
async def relay(tmp_path: Path | None = None, **config: object) -> AsyncIterator[Relay]:
    if tmp_path is not None:
        token_file = tmp_path / "tokens"
        if not token_file.exists():
            token_file.write_text(TOKEN_FILE)
        config.setdefault("token_file", str(token_file))
    server = TunnelServer(ServerConfig(**config), base_url="http://relay.test")  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        yield Relay(server, nursery)
        nursery.cancel_scope.cancel()


def welcome(frame: frames.Frame) -> frames.Welcome:
    assert isinstance(frame, frames.Welcome), frame
    return frame


def refused(frame: frames.Frame, reason: str) -> None:
    assert isinstance(frame, frames.Refuse), frame
    assert frame.code == ErrorCode.UNAUTHORIZED
    assert reason in frame.reason


async def test_another_identity_cannot_join_a_fixed_session(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with relay(tmp_path) as r:
            async with r.agent(token=BOB, session_id="bobs-app") as answer:
                welcome(answer)
                async with r.agent(token=MALLORY, session_id="bobs-app") as intruder:
                    refused(intruder, "belongs to another identity")
                async with r.agent(token=BOB, session_id="bobs-app") as second:
                    welcome(second)  # the same identity joins
                    await r.agents_of("bobs-app", 2)
            await r.agents_of("bobs-app", 0)
            # Leased, and after the lease ran out: still bob's.
            async with r.agent(token=MALLORY, session_id="bobs-app") as intruder:
                refused(intruder, "belongs to another identity")


async def test_a_fixed_session_stays_its_owners_after_the_lease(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with relay(tmp_path, grace_period=5) as r:
        async with r.agent(token=BOB, session_id="bobs-app") as answer:
            welcome(answer)
        await trio.sleep(60)
        async with r.agent(token=MALLORY, session_id="bobs-app") as intruder:
            refused(intruder, "belongs to another identity")


async def test_token_file_grants_ids_before_anyone_claims_them(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with relay(tmp_path) as r:
            async with r.agent(token=BOB, session_id="alice-web") as answer:
                refused(answer, "may not hold session alice-web")
            async with r.agent(token=ALICE, session_id="other") as answer:
                refused(answer, "may not hold session other")
            async with r.agent(token=ALICE_2, session_id="alice-web") as answer:
                assert welcome(answer).session_id == "alice-web"  # a second token of alice


async def test_a_random_session_is_reclaimed_only_by_its_own_agent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with relay(tmp_path, grace_period=5) as r:
        async with r.agent(token=BOB) as answer:
            first = welcome(answer)
        sid, key = first.session_id, first.resume_key
        # Another identity, with the session id and even with the resume key: refused.
        async with r.agent(token=MALLORY, session_id=sid, resume_key=key) as intruder:
            refused(intruder, "only its own agent can reclaim it")
        async with r.agent(token=MALLORY, session_id=sid) as intruder:
            refused(intruder, "only its own agent can reclaim it")
        async with r.agent(token=BOB, session_id=sid, resume_key="guessed") as wrong:
            refused(wrong, "only its own agent can reclaim it")
        await trio.sleep(60)  # the lease ran out
        async with r.agent(token=MALLORY, session_id=sid, resume_key=key) as intruder:
            refused(intruder, "only its own agent can reclaim it")
        async with r.agent(token=BOB, session_id=sid, resume_key=key) as back:
            assert welcome(back).session_id == sid
            assert welcome(back).resume_key == key


async def test_sessions_survive_a_relay_restart_without_becoming_claimable(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    with trio.fail_after(10):
        async with relay(tmp_path, state_dir=str(state)) as r:
            async with r.agent(token=BOB) as answer:
                random = welcome(answer)
            async with r.agent(token=BOB, session_id="bobs-app") as answer:
                welcome(answer)
        async with relay(tmp_path, state_dir=str(state)) as restarted:
            sid, key = random.session_id, random.resume_key
            async with restarted.agent(token=MALLORY, session_id=sid, resume_key=key) as a:
                refused(a, "only its own agent can reclaim it")
            async with restarted.agent(token=MALLORY, session_id="bobs-app") as a:
                refused(a, "belongs to another identity")
            async with restarted.agent(token=BOB, session_id=sid, resume_key=key) as a:
                assert welcome(a).session_id == sid
            async with restarted.agent(token=BOB, session_id="bobs-app") as a:
                welcome(a)
        # Without the state, the old keys are worth nothing.
        async with (
            relay(tmp_path) as forgetful,
            forgetful.agent(token=BOB, session_id=sid, resume_key=key) as a,
        ):
            refused(a, "only its own agent can reclaim it")


async def test_an_open_relay_never_lets_one_agent_join_anothers_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with relay(grace_period=5) as r:
        async with r.agent(session_id="app") as answer:
            first = welcome(answer)
            async with r.agent(session_id="app") as intruder:
                refused(intruder, "held by another agent")
            # Its own re-dial (a stale connection may linger) carries the resume key.
            async with r.agent(session_id="app", resume_key=first.resume_key) as again:
                welcome(again)
        await r.agents_of("app", 0)
        async with r.agent(session_id="app") as intruder:
            refused(intruder, "held by another agent")  # leased for its agent
        await trio.sleep(60)
        async with r.agent(session_id="app") as newcomer:
            taken = welcome(newcomer)
        # The first agent's key died with its lease: it cannot join the newcomer.
        async with r.agent(session_id="app", resume_key=first.resume_key) as late:
            refused(late, "held by another agent")
        assert taken.resume_key != first.resume_key


async def test_reloading_tokens_revokes_only_removed_identities(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with relay(tmp_path) as r:
            async with (
                r.agent(token=BOB, session_id="bobs-app") as bob,
                r.agent(token=MALLORY, session_id="mallorys") as mallory,
            ):
                welcome(bob)
                welcome(mallory)
                await r.agents_of("mallorys", 1)
                (tmp_path / "tokens").write_text(
                    TOKEN_FILE.replace(MALLORY, "#") + "new-token-0001 carol\n"
                )
                r.server.reload_tokens()
                await r.agents_of("mallorys", 0)
                assert len(r.server.routes.uplinks_of("bobs-app")) == 1
                async with r.agent(token="new-token-0001") as carol:
                    welcome(carol)
                async with r.agent(token=MALLORY) as gone:
                    refused(gone, "invalid or missing token")
            (tmp_path / "tokens").write_text("broken-line-with-no-name\n")
            with pytest.raises(TokenError):
                r.server.reload_tokens()
            async with r.agent(token=BOB) as still:
                welcome(still)  # the table in force was kept


async def test_restarted_relay_answers_503_for_unknown_sessions_then_404(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    state = str(tmp_path / "state")
    TunnelServer(ServerConfig(state_dir=state), base_url="http://relay.test").mark_stopped()
    server = TunnelServer(ServerConfig(state_dir=state, grace_period=20), base_url="http://x")
    entry = ProxyEntry(server)

    async def get() -> bytes:
        client, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entry.handle_connection, server_side)
            await client.send_all(b"GET /session/nosuch/ HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := await client.receive_some():
                data += chunk
        return data

    answer = await get()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 20\r\n" in answer
    assert b"the relay restarted" in answer
    await trio.sleep(21)
    assert (await get()).startswith(b"HTTP/1.1 404 ")
    fresh = TunnelServer(ServerConfig(), base_url="http://x")  # no state: not a restart
    assert fresh.restart_grace_left(trio.current_time()) == 0


async def test_one_identity_cannot_hold_more_sessions_than_its_cap(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with relay(tmp_path, grace_period=5, max_sessions_per_identity=2) as r:
        async with r.agent(token=BOB) as first, r.agent(token=BOB) as second:
            welcome(first)
            welcome(second)
            async with r.agent(token=BOB) as third:
                assert isinstance(third, frames.Refuse), third
                assert third.code == ErrorCode.OVERLOADED
                assert "has 2 sessions, the most it may have" in third.reason
            async with r.agent(token=MALLORY) as other:
                welcome(other)  # another identity is not held back by bob's
            # bob's own agent coming back with its resume key is a join, not one more.
            async with r.agent(
                token=BOB,
                session_id=welcome(first).session_id,
                resume_key=welcome(first).resume_key,
            ) as back:
                welcome(back)
        await trio.sleep(10)  # both sessions' grace periods ran out: bob's seats are free
        async with r.agent(token=BOB) as later:
            welcome(later)
