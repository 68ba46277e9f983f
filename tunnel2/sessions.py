"""Sessions: who holds which session (a store that may be shared), and where to route it.

Layer: above uplink (the route table holds uplinks). May import trio, attrs, errors; the
store itself uses no uplink, so a store shared by several relay nodes can implement
:class:`SessionStore` with nothing else of tunnel2.

Two halves, split on purpose (STYLE.md §10):

* :class:`SessionStore` is **async**: claim, release and look-up may go to a remote store
  (Redis, for several relay nodes), so every call is awaited and decides atomically inside the
  store. Claims carry an **epoch** (a fencing token): a release removes only its own claim, so a
  stale connection that ends late never removes a newer one (PROTOCOL.md §3.4).
  :class:`MemorySessionStore` is the in-process one; it can persist who owns which fixed id to
  a file so that ownership survives a relay restart.
* :class:`RouteTable` is **local and synchronous**: the hot-path map from session id to the
  uplinks connected to *this* relay, with typed results (:class:`Routed`, :data:`UNKNOWN`,
  :data:`DISCONNECTED`). It changes with no ``await`` between a decision and its bookkeeping.
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import trio

if TYPE_CHECKING:
    from tunnel2.uplink import TunnelUplink

__all__ = [
    "DISCONNECTED",
    "UNKNOWN",
    "Disconnected",
    "Lease",
    "MemorySessionStore",
    "Route",
    "RouteTable",
    "Routed",
    "SessionLimit",
    "SessionStore",
    "SessionTaken",
    "Unknown",
]

logger = logging.getLogger(__name__)

_OWNERS_VERSION: Final = 1


@final
@attrs.frozen
class Lease:
    """One accepted claim on a session.

    Attributes:
        session_id: the session.
        owner: the identity that holds it (``""`` on an open relay).
        epoch: this claim's fencing token; larger than every earlier claim's.
        nonce: random, fixed for the life of the session record: a key derived from it stops
            working once the record is gone and a new one is made (PROTOCOL.md §3.4).
    """

    session_id: str
    owner: str
    epoch: int
    nonce: str


class SessionTaken(Exception):
    """The store refused a claim; ``reason`` says why, for the REFUSE frame."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionLimit(SessionTaken):
    """The claim would give its owner more sessions than ``max_per_owner``."""


class SessionStore(Protocol):
    """Where claims on sessions are decided; may be shared by several relay nodes."""

    async def claim(
        self,
        session_id: str,
        owner: str,
        *,
        now: float,
        exclusive: bool,
        keep_owner: bool,
        nonce: str | None = None,
        max_per_owner: int | None = None,
    ) -> Lease:
        """Take or join ``session_id`` for ``owner``, atomically.

        Args:
            session_id: the session.
            owner: the claiming identity.
            now: the relay's clock.
            exclusive: refuse if the session is held (claimed, or leased after its last
                claim left) — by anyone.
            keep_owner: the owner stays recorded after the session's lease runs out (a fixed
                id, which nobody else may take later).
            nonce: the claimant proved it knows the record's nonce (a resume key): the
                record must still have it; ``exclusive`` is then waived.
            max_per_owner: a claim that would make a new session record refuses if
                ``owner`` already has this many (held, leased, or fixed ids it owns for
                good); joining one it has is never refused for this.

        Raises:
            SessionLimit: ``owner`` has ``max_per_owner`` sessions already.
            SessionTaken: another owner holds it, or it is held and ``exclusive``, or the
                ``nonce`` is stale.
        """
        ...

    async def release(self, lease: Lease, *, now: float) -> None:
        """End the claim ``lease``; the last claim to go starts the session's lease (its
        grace period). Idempotent; a stale lease changes nothing."""
        ...

    async def get(self, session_id: str, *, now: float) -> Lease | None:
        """The newest claim on ``session_id`` while the session is held, else ``None``."""
        ...


@attrs.define
class _Record:
    owner: str
    nonce: str
    keep_owner: bool
    epoch: int = 0
    claims: set[int] = attrs.Factory(set)
    deadline: float | None = None  # set while leased: no claim left

    def held(self, now: float) -> bool:
        return bool(self.claims) or (self.deadline is not None and self.deadline > now)


@final
class MemorySessionStore:
    """A :class:`SessionStore` in this process.

    Args:
        grace_period: seconds a session stays held after its last claim is released.
        owners_file: if set, the owners of fixed ids are kept in this JSON file (written
            atomically on each change, read at start), so they survive a restart.

    Records whose lease ran out are forgotten as the clock passes their deadline (a heap of
    deadlines, swept on each call: the cost is in proportion to what expires), so sessions
    that are never asked for again do not pile up.
    """

    def __init__(self, *, grace_period: float, owners_file: str | Path | None = None) -> None:
        self.grace_period = grace_period
        self._records: dict[str, _Record] = {}
        self._per_owner: collections.Counter[str] = collections.Counter()
        self._expiry: list[tuple[float, str]] = []  # (deadline, session id), a heap
        self._owners_file = Path(owners_file) if owners_file is not None else None
        if self._owners_file is not None and self._owners_file.exists():
            for session_id, owner in _read_owners(self._owners_file).items():
                self._records[session_id] = _Record(owner, secrets.token_hex(8), True)
                self._per_owner[owner] += 1

    def __repr__(self) -> str:
        return f"<MemorySessionStore records={len(self._records)}>"

    def __len__(self) -> int:
        return len(self._records)

    def sessions_of(self, owner: str) -> int:
        """How many session records ``owner`` has (held, leased, or fixed ids it owns)."""
        return self._per_owner[owner]

    def owner_of(self, session_id: str) -> str | None:
        """Who holds ``session_id`` or owns it for good, if anyone (for tests, status)."""
        record = self._records.get(session_id)
        return record.owner if record is not None else None

    async def claim(
        self,
        session_id: str,
        owner: str,
        *,
        now: float,
        exclusive: bool,
        keep_owner: bool,
        nonce: str | None = None,
        max_per_owner: int | None = None,
    ) -> Lease:
        await trio.lowlevel.checkpoint()
        self._sweep(now)
        record = self._current(session_id, now)
        if record is not None and record.owner != owner:
            raise SessionTaken(f"session {session_id} belongs to another identity")
        if nonce is not None:
            if record is None or not secrets.compare_digest(record.nonce, nonce):
                raise SessionTaken(f"the resume key for session {session_id} is no longer valid")
        elif exclusive and record is not None and record.held(now):
            raise SessionTaken(f"session {session_id} is held by another agent")
        if record is None:
            if max_per_owner is not None and self._per_owner[owner] >= max_per_owner:
                raise SessionLimit(
                    f"{'this identity has' if owner else 'this open relay has'} "
                    f"{self._per_owner[owner]} sessions, the most it may have; sessions "
                    "no agent holds any more are forgotten after their grace period"
                )
            record = _Record(owner, secrets.token_hex(8), keep_owner)
            self._records[session_id] = record
            self._per_owner[owner] += 1
            if keep_owner:
                self._save()
        elif keep_owner and not record.keep_owner:
            record.keep_owner = True
            self._save()
        record.epoch += 1
        record.claims.add(record.epoch)
        record.deadline = None
        return Lease(session_id, owner, record.epoch, record.nonce)

    async def release(self, lease: Lease, *, now: float) -> None:
        await trio.lowlevel.checkpoint()
        record = self._records.get(lease.session_id)
        if record is None or record.nonce != lease.nonce or lease.epoch not in record.claims:
            return
        record.claims.discard(lease.epoch)
        if not record.claims:
            record.deadline = now + self.grace_period
            heapq.heappush(self._expiry, (record.deadline, lease.session_id))
        self._sweep(now)

    async def get(self, session_id: str, *, now: float) -> Lease | None:
        await trio.lowlevel.checkpoint()
        self._sweep(now)
        record = self._current(session_id, now)
        if record is None:
            return None
        return Lease(session_id, record.owner, record.epoch, record.nonce)

    def _current(self, session_id: str, now: float) -> _Record | None:
        """The record, once an expired lease is forgotten (a kept owner stays, unheld)."""
        record = self._records.get(session_id)
        if record is None or record.held(now) or record.deadline is None:
            return record
        if record.keep_owner:
            # The session is gone, its owner is not: a fresh record for the next claim.
            fresh = _Record(record.owner, secrets.token_hex(8), True, epoch=record.epoch)
            self._records[session_id] = fresh
            return fresh
        del self._records[session_id]
        self._per_owner[record.owner] -= 1
        if not self._per_owner[record.owner]:
            del self._per_owner[record.owner]
        return None

    def _sweep(self, now: float) -> None:
        """Forget the records whose lease ran out by ``now`` (a deadline in the heap may be
        stale: the session was claimed again, or leased again later; _current decides)."""
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, session_id = heapq.heappop(expiry)
            self._current(session_id, now)

    def _save(self) -> None:
        if self._owners_file is None:
            return
        owners = {sid: r.owner for sid, r in self._records.items() if r.keep_owner}
        _write_atomically(
            self._owners_file, json.dumps({"version": _OWNERS_VERSION, "owners": owners})
        )


def _read_owners(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        owners = data["owners"]
        if not isinstance(owners, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in owners.items()
        ):
            raise ValueError("owners is not a map of strings")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read session owners from {path}: {exc}") from exc
    return dict(owners)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the local route table --------------------------------------------------------------


@final
@attrs.frozen
class Routed:
    """A request for the session goes to ``uplink``."""

    uplink: TunnelUplink


@final
@attrs.frozen
class Unknown:
    """No such session here (never claimed, or its lease ran out)."""


@final
@attrs.frozen
class Disconnected:
    """The session is held, but none of its agents is connected (or accepting) now."""


UNKNOWN: Final = Unknown()
DISCONNECTED: Final = Disconnected()
Route = Routed | Unknown | Disconnected


@attrs.define
class _Entry:
    uplinks: list[TunnelUplink] = attrs.Factory(list)
    # routed[i] is Routed(uplinks[i]): made at attach, so a request allocates no result.
    routed: list[Routed] = attrs.Factory(list)
    turn: int = 0
    deadline: float | None = None
    hold_until: float = -math.inf  # a draining agent left: wait for its replacement
    attached: trio.Event | None = None  # made by attached_event, set by attach


@final
class RouteTable:
    """Session id → the uplinks of this relay that serve it; synchronous, hot path."""

    def __init__(self, *, grace_period: float, drain_hold: float = 0.0) -> None:
        self.grace_period = grace_period
        self.drain_hold = drain_hold
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def attach(self, session_id: str, uplink: TunnelUplink) -> None:
        """Route ``session_id``'s requests to ``uplink`` too (several agents share it)."""
        entry = self._entries.setdefault(session_id, _Entry())
        entry.uplinks.append(uplink)
        entry.routed.append(Routed(uplink))
        entry.deadline = None
        if entry.attached is not None:
            entry.attached.set()
            entry.attached = None

    def detach(self, session_id: str, uplink: TunnelUplink, now: float) -> None:
        """Forget ``uplink``; the last to leave keeps the session routable as
        :data:`DISCONNECTED` for the grace period. Idempotent."""
        entry = self._entries.get(session_id)
        if entry is None:
            return
        if uplink in entry.uplinks:
            del entry.routed[entry.uplinks.index(uplink)]
            entry.uplinks.remove(uplink)
            if uplink.peer_draining:
                entry.hold_until = now + self.drain_hold
        if not entry.uplinks:
            entry.deadline = now + self.grace_period

    def holding(self, session_id: str, now: float) -> bool:
        """True if requests for ``session_id`` should wait for an agent to attach: one of
        its agents is draining or left draining less than ``drain_hold`` seconds ago (a
        rolling restart: its replacement is on the way)."""
        entry = self._entries.get(session_id)
        if entry is None or self.drain_hold <= 0:
            return False
        return entry.hold_until > now or any(u.peer_draining for u in entry.uplinks)

    def attached_event(self, session_id: str) -> trio.Event | None:
        """An event set when the next uplink attaches for ``session_id`` (``None`` for a
        session that is not in the table)."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        if entry.attached is None:
            entry.attached = trio.Event()
        return entry.attached

    def uplinks_of(self, session_id: str) -> tuple[TunnelUplink, ...]:
        """The uplinks attached for ``session_id``."""
        entry = self._entries.get(session_id)
        return tuple(entry.uplinks) if entry is not None else ()

    def route(self, session_id: str, now: float) -> Route:
        """Pick the session's accepting uplink with the fewest streams in flight, or say why
        there is none.

        An uplink whose heartbeat is late (a frozen or cut-off agent,
        :meth:`~tunnel2.uplink.TunnelUplink.heartbeat_late`) is chosen only if every
        accepting uplink of the session is late. Ties go round robin. One pass over the
        session's uplinks, allocating nothing (each uplink's result is made at attach).
        """
        entry = self._entries.get(session_id)
        if entry is None:
            return UNKNOWN
        if entry.deadline is not None and entry.deadline <= now:
            del self._entries[session_id]
            return UNKNOWN
        uplinks = entry.uplinks
        count = len(uplinks)
        if count == 1:  # the common case: no choice to make, late or not
            return entry.routed[0] if uplinks[0].accepting else DISCONNECTED
        best = -1
        best_late = True
        best_load = 0
        start = entry.turn = (entry.turn + 1) % count if count else 0
        for i in range(count):
            index = (start + i) % count
            uplink = uplinks[index]
            if not uplink.accepting:
                continue
            late = uplink.heartbeat_late(now)
            load = uplink.open_streams
            if best < 0 or (best_late and not late) or (late == best_late and load < best_load):
                best, best_late, best_load = index, late, load
        return DISCONNECTED if best < 0 else entry.routed[best]
