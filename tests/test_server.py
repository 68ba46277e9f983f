"""SessionRegistry: claims, joins, resume keys, leases (sync, no I/O)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import pytest

from tunnel2 import frames
from tunnel2.server import ServerConfig, SessionRegistry, TunnelServer, _Refusal

if TYPE_CHECKING:
    from tunnel2.uplink import TunnelUplink


class FakeUplink:
    accepting = True


def uplink() -> TunnelUplink:
    return cast("TunnelUplink", FakeUplink())


def test_random_sessions_have_128_bits_and_a_resume_key() -> None:
    registry = SessionRegistry(grace_period=30)
    first, epoch = registry.claim(frames.Hello(), now=0)
    second, _ = registry.claim(frames.Hello(), now=0)
    assert len(first.id) == 32
    assert int(first.id, 16) >= 0
    assert first.id != second.id
    assert first.resume_key
    assert epoch == 1


def test_random_session_is_reclaimed_only_with_its_resume_key() -> None:
    registry = SessionRegistry(grace_period=30)
    session, _ = registry.claim(frames.Hello(), now=0)
    with pytest.raises(_Refusal, match="resume key"):
        registry.claim(frames.Hello(session_id=session.id), now=1)
    with pytest.raises(_Refusal):
        registry.claim(frames.Hello(session_id=session.id, resume_key="wrong"), now=1)
    again, epoch = registry.claim(
        frames.Hello(session_id=session.id, resume_key=session.resume_key), now=1
    )
    assert again is session
    assert epoch == 2


def test_fixed_session_is_joined_and_routed_round_robin() -> None:
    registry = SessionRegistry(grace_period=30)
    sid = "22222222-2222-2222-2222-222222222222"
    session, _ = registry.claim(frames.Hello(session_id=sid), now=0)
    joined, _ = registry.claim(frames.Hello(session_id=sid), now=0)
    assert joined is session
    a, b = uplink(), uplink()
    registry.attach(session, a)
    registry.attach(session, b)
    picks = {registry.route(sid, now=0) for _ in range(4)}
    assert picks == {a, b}


def test_a_stale_uplink_leaving_late_does_not_remove_the_new_one() -> None:
    registry = SessionRegistry(grace_period=30)
    session, _ = registry.claim(frames.Hello(session_id="s"), now=0)
    old, new = uplink(), uplink()
    registry.attach(session, old)
    registry.attach(session, new)
    registry.detach(session, old, now=1)
    registry.detach(session, old, now=2)  # a late second notice of the same departure
    assert registry.route("s", now=3) is new


def test_lease_holds_the_session_for_the_grace_period_then_it_is_gone() -> None:
    registry = SessionRegistry(grace_period=30)
    session, _ = registry.claim(frames.Hello(session_id="s"), now=0)
    link = uplink()
    registry.attach(session, link)
    registry.detach(session, link, now=10)
    assert registry.route("s", now=20) == "disconnected"
    assert registry.route("s", now=41) == "unknown"
    assert registry.route("nosuch", now=0) == "unknown"


def test_failed_handshake_claim_expires() -> None:
    registry = SessionRegistry(grace_period=5)
    session, _ = registry.claim(frames.Hello(), now=0)
    registry.detach(session, None, now=0)
    assert registry.route(session.id, now=1) == "disconnected"
    assert registry.route(session.id, now=6) == "unknown"
    assert len(registry) == 0


def test_public_urls_by_path_and_by_host() -> None:
    plain = TunnelServer(ServerConfig(), base_url="http://relay.example:8000/")
    assert plain.public_urls("abc") == ("http://relay.example:8000/session/abc/",)
    hosted = TunnelServer(ServerConfig(domain="t.example"), base_url="http://relay.example:8000")
    urls = hosted.public_urls("abc")
    assert urls == ("http://abc.t.example:8000/", "http://relay.example:8000/session/abc/")
