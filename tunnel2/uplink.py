"""TunnelUplink: many concurrent streams over one frame transport.

Layer: above frames and transports; below server, entry and agent. May import trio, attrs,
:mod:`tunnel2.frames`, :mod:`tunnel2.transports` and :mod:`tunnel2.errors`.

Tasks (all in the nursery of :func:`open_uplink`):

* ``_reader_task`` is the only caller of ``transport.receive()``. It decodes and dispatches
  every frame synchronously: stream tables and credit change with no ``await`` in between.
* ``_writer_task`` is the only caller of ``transport.send()``. Other code encodes frames into
  ``_out`` without awaiting and wakes it; it puts everything pending into one transport write,
  so frames coalesce under load without timers (DESIGN.md, performance model). A task that
  has finished a message (a bodiless request, a small complete response, an END) while the
  writer is idle and nothing is queued writes it itself with ``transport.send_nowait()``
  (``_send_now``): no task switch for the common small exchange; under load, when the
  writer is busy, frames queue and coalesce as before. With more than one stream open, a
  direct write now and then is a probe instead: it queues for the writer and, if frames of
  other streams were queued in the same scheduler pass too (many requests at once), the
  uplink keeps coalescing, one write per pass for all of them; a probe whose stream was the
  only one to send in its pass switches back to direct writes, the next probe waiting twice
  as long (``_check_coalescing``).
* ``_keepalive_task`` pings a peer it has heard nothing from for ``ping_interval`` and closes
  the uplink when nothing arrived for ``heartbeat_timeout`` (PROTOCOL.md §6.2).
* ``_watchdog_task`` closes the uplink when a write makes no progress for
  ``UplinkLimits.write_timeout`` (a peer that stopped reading).

Memory is bounded by flow control: DATA waits for stream and connection credit before it is
queued, so ``_out`` holds at most the peer's connection window of DATA plus small control
frames and one head per stream; per-stream receive buffers hold at most ``initial_window``.
Replies the peer provokes (PONG, RESET for OPENs we refuse) are bounded too: one PONG at a
time, and at most ``UplinkLimits.max_unsent_replies`` unsent (PROTOCOL.md §7.1).

One peer cannot hurt the others (PROTOCOL.md §7.1): the reader yields to other tasks after
at most ``_FRAMES_PER_CHECKPOINT`` frames or ~256 KiB however fast they arrive, and frames
that do no useful work (PINGs, WINDOWs returning no credit we used, frames for streams that
are gone) draw on token buckets; an empty bucket closes the uplink with
``ENHANCE_YOUR_CALM``. Taking a batch off ``_out`` costs O(frames taken), so draining any
backlog is linear.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, Literal, final

import attrs
import trio

from tunnel2 import frames
from tunnel2._ratelimit import TokenBucket
from tunnel2.errors import (
    ErrorCode,
    HandshakeError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamReset,
    UplinkClosed,
)

if TYPE_CHECKING:
    from tunnel2.transports import FrameTransport

__all__ = [
    "TunnelStream",
    "TunnelUplink",
    "UplinkLimits",
    "UplinkStatistics",
    "open_uplink",
    "receive_handshake_frame",
]

logger = logging.getLogger(__name__)

Role = Literal["relay", "agent"]

# One transport write carries at most this many bytes (one WebSocket message).
_MAX_BATCH: Final = 1024 * 1024
_CLOSE_FLUSH_TIMEOUT: Final = 2.0
_EARLY_FLUSH_FRAMES: Final = 16
# Write coalescing under load (TunnelUplink._send_now): with more than one stream open, every
# this many direct writes (doubling after each failed probe, up to the maximum) one waits for
# the writer instead, to see whether other streams queue frames in the same scheduler pass.
_PROBE_AFTER_MIN: Final = 4
_PROBE_AFTER_MAX: Final = 64
# A heartbeat is late (the uplink takes no new streams while its session has others) once
# nothing arrived for this many ping intervals: a PING went out after one interval of
# silence and its PONG has not come back within half an interval more (PROTOCOL.md §6.2).
_LATE_AFTER_INTERVALS: Final = 1.5
# The default heartbeat timeout, in ping intervals: a live peer answers a PING within one.
DEAD_AFTER_INTERVALS: Final = 2.0
_CREDIT_RETURN_FRACTION: Final = 2
# The reader yields to other tasks after this much work (PROTOCOL.md §7.1): a frame is one
# unit, a receive one unit per started 2 KiB. So a message of thousands of tiny frames, or a
# peer streaming huge frames, cannot hold the event loop (at most 128 frames or ~256 KiB per
# turn), and the common case (a few frames per message) pays one checkpoint in ~100
# messages. FastSocketStream's receive returns without a checkpoint when data is ready, so
# the count runs across receives.
_FRAMES_PER_CHECKPOINT: Final = 128
_RECEIVE_BYTES_PER_UNIT_SHIFT: Final = 11
# Frames for a stream that is gone which each stream opened lets through without charge: the
# peer's OPEN, END and RESET may cross our RESET or our close (PROTOCOL.md §4.1, §7).
_STRAY_FRAMES_PER_STREAM: Final = 3
# WINDOWs each DATA frame we send lets through without charge: the peer returns its credit
# on the stream and on the connection (PROTOCOL.md §6.1).
_WINDOWS_PER_DATA_FRAME: Final = 2
_TYPE_DATA: Final = frames.TYPE_DATA
_TYPE_END: Final = frames.TYPE_END


@final
@attrs.frozen
class UplinkLimits:
    """What one peer may make an uplink do before it is closed (PROTOCOL.md §7.1).

    The defaults are far above what a busy legitimate peer sends: only frames that do no
    useful work are counted (see each attribute), and they never reach the rates below.

    Attributes:
        ping_rate: PING and PONG frames per second the peer may send on average. Our
            keepalive sends at most two per ``ping_interval``.
        ping_burst: PING and PONG frames it may send at once.
        control_rate: per second, on average: WINDOW frames beyond two per DATA frame we
            sent (credit we did not use cannot come back), frames (OPEN, END, RESET) for
            streams that are gone beyond three per stream opened, and GOAWAY frames.
        control_burst: such frames at once.
        max_unsent_replies: replies the peer provokes (PONG, RESET refusing its OPEN) that may
            wait unsent because it does not read; one more closes the uplink.
        write_timeout: seconds one transport write (at most 1 MiB) may take; past it the
            peer is taken to have stopped reading and the uplink closes. ``math.inf``
            disables it.
    """

    ping_rate: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    ping_burst: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    control_rate: float = attrs.field(default=1000.0, validator=attrs.validators.gt(0))
    control_burst: int = attrs.field(default=10000, validator=attrs.validators.ge(1))
    max_unsent_replies: int = attrs.field(default=4096, validator=attrs.validators.ge(1))
    write_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))


@final
@attrs.frozen
class UplinkStatistics:
    """A snapshot of an uplink's state.

    Attributes:
        open_streams: streams not yet finished in both directions.
        local_window: connection credit we still grant the peer.
        remote_window: connection credit the peer still grants us.
        queued_bytes: encoded bytes waiting for the writer task.
        incoming_queued: streams opened by the peer waiting for a handler (agent side).
    """

    open_streams: int
    local_window: int
    remote_window: int
    queued_bytes: int
    incoming_queued: int


# The direct wake-ups (a task parks itself, another reschedules it) must not be split by a
# KeyboardInterrupt, which trio raises at any bytecode of unprotected code: a task that set
# itself as a stream's waiter and was interrupted before it parked would later be
# rescheduled while blocked somewhere else (a TrioInternalError). Everything that records or
# pops a waiter runs protected, as trio's own Event and channels do.
_ki_protected = trio.lowlevel.enable_ki_protection


@final
class TunnelStream:
    """One request/response exchange on an uplink (PROTOCOL.md §4).

    The relay side gets one from :meth:`TunnelUplink.open_stream`; the agent side from
    :meth:`TunnelUplink.accept_stream`. Whoever holds a stream must finish it (send END after
    its body and read the peer's END) or call :meth:`close`; until then it counts as open.
    """

    def __init__(self, uplink: TunnelUplink, stream_id: int, head: bytes | None) -> None:
        self.id = stream_id
        self._uplink = uplink
        self._head = head
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        # The task waiting for the peer's next frame on this stream, if one is (one at a
        # time: the stream's reader); woken directly, with no Event made per wait.
        self._waiter: trio.lowlevel.Task | None = None
        self._remote_ended = False
        self._local_ended = False
        self._error: StreamReset | UplinkClosed | None = None
        self._send_window = uplink._initial_window
        self._recv_window = uplink._initial_window
        self._unacked = 0
        self._closed = False
        self._cancel_scope: trio.CancelScope | None = None
        self._send_error: StreamReset | None = None

    def __repr__(self) -> str:
        return (
            f"<TunnelStream {self.id} buffered={self._buffered} send_window={self._send_window}"
            f"{' LOCAL_ENDED' if self._local_ended else ''}"
            f"{' REMOTE_ENDED' if self._remote_ended else ''}"
            f"{' CLOSED' if self._closed else ''}>"
        )

    @property
    def head(self) -> bytes | None:
        """The peer's head if it has arrived (the request head, for agent streams)."""
        return self._head

    @property
    def data_ready(self) -> bool:
        """True if :meth:`receive_data` would return without waiting."""
        return bool(self._buffer) or self._remote_ended or self._error is not None

    def cancel_on_reset(self, scope: trio.CancelScope | None) -> None:
        """Cancel ``scope`` when the stream is reset or its uplink closes, so the task
        serving it stops waiting on things (a backend, an app) whose answer nobody wants.
        ``None`` detaches the scope given before."""
        self._cancel_scope = scope
        if scope is not None and self._error is not None:
            scope.cancel()

    @property
    def local_ended(self) -> bool:
        """True once we sent END or the stream was reset."""
        return self._local_ended

    # --- receiving ---------------------------------------------------------------------

    @_ki_protected
    async def receive_head(self) -> bytes:
        """Wait for the peer's OPEN and return its head.

        Raises:
            StreamReset: the peer reset the stream.
            UplinkClosed: the uplink closed first.
        """
        if self._head is None:
            while self._head is None:
                if self._error is not None:
                    await trio.lowlevel.checkpoint()
                    raise self._error
                if self._waiter is not None:
                    await self._wait()  # raises: one reader at a time
                # _wait inlined (once a request on the relay: a coroutine less, ~-1,100).
                self._waiter = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
        else:
            await trio.lowlevel.checkpoint()
        return self._head

    async def receive_data(self) -> bytes:
        """Return the next body bytes, or ``b""`` once the peer sent END.

        Returns credit to the peer as data is taken (PROTOCOL.md §6). Cancellation leaves the
        stream as it was; no data is lost.

        Raises:
            StreamReset: the peer reset the stream.
            UplinkClosed: the uplink closed first.
        """
        # As trio's channels: a cancellation can only land before data is taken.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = self.receive_data_nowait()
        except trio.WouldBlock:
            while True:
                await self._wait()
                try:
                    return self.receive_data_nowait()
                except trio.WouldBlock:
                    continue  # woken by the head, not by data
        except BaseException:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def receive_data_nowait(self) -> bytes:
        """Like :meth:`receive_data`, but never waits.

        Raises:
            trio.WouldBlock: nothing has arrived yet.
            StreamReset, UplinkClosed: as :meth:`receive_data`.
        """
        if self._buffer:
            data = self._buffer.popleft()
            self._buffered -= len(data)
            self._uplink._consumed(self, len(data))
            return data
        if self._error is not None:
            raise self._error
        if self._remote_ended:
            if self._local_ended:  # _maybe_finish (the buffer is empty)
                self._finish()
            return b""
        raise trio.WouldBlock

    @_ki_protected
    async def _wait(self) -> None:
        if self._waiter is not None:  # as trio's streams: one reader at a time
            await trio.lowlevel.checkpoint()
            raise trio.BusyResourceError(f"another task is already reading stream {self.id}")
        self._waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_wait)

    def _abort_wait(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    # --- sending -----------------------------------------------------------------------

    def send_head(self, head: bytes, body: bytes = b"", *, end: bool = False) -> None:
        """Send our OPEN (the agent's response head), and ``body`` and END with it if given,
        in one transport write. Does not block.

        Raises:
            LocalProtocolError: ``head`` is not a complete HTTP head, or is larger than the
                negotiated frame size (``code`` FRAME_SIZE_ERROR, ``status_hint`` 502); the
                stream is unchanged, so it can still be reset with a reason.
            trio.WouldBlock: ``body`` does not fit the credit or one frame; nothing was sent.
            StreamReset, UplinkClosed: the stream is gone.
        """
        if self._error is not None or self._send_error is not None or self._local_ended:
            self._check_sendable()  # raises
        uplink = self._uplink
        if len(head) > uplink._max_frame_size:
            uplink._check_head_size(head, 502)
        if body:
            wire = frames.encode_open(self.id, head) + self._data_frame_nowait(body, end)
        else:
            wire = frames.encode_open(self.id, head, end and uplink._end_stream)
        if end:
            self._local_ended = True
            if not uplink._end_stream:
                wire += frames.encode_end(self.id)
        uplink._send_now(wire, self.id)
        if end:
            self._maybe_finish()

    async def send_data(self, data: bytes, *, end: bool = False) -> None:
        """Send body bytes, waiting for stream and connection credit as needed.

        Large ``data`` is split into frames of at most the negotiated frame size. If this is
        cancelled, a prefix of ``data`` may have been queued; the stream stays usable.

        Args:
            data: the bytes (may be empty).
            end: also send END right after the last byte, with no checkpoint in between, so a
                whole small response leaves in one transport write.

        Raises:
            StreamReset: the peer reset the stream.
            UplinkClosed: the uplink closed.
        """
        uplink = self._uplink
        view = memoryview(data)
        sent = 0
        while sent < len(data):
            self._check_sendable()
            credit = min(self._send_window, uplink._remote_window)
            if credit <= 0:
                await uplink._wait_credit()
                continue
            size = min(credit, uplink._max_frame_size, len(data) - sent)
            chunk = data if size == len(data) else bytes(view[sent : sent + size])
            self._send_window -= size
            uplink._remote_window -= size
            uplink._window_allowance += _WINDOWS_PER_DATA_FRAME
            uplink._queue(frames.encode_data(self.id, chunk))
            sent += size
            if sent < len(data):
                await trio.lowlevel.checkpoint()
        if end:
            self.send_end()
        await uplink._wait_writable()

    def send_data_nowait(self, data: bytes, *, end: bool = False) -> None:
        """Queue ``data`` (and END if ``end``) at once, or nothing.

        Raises:
            trio.WouldBlock: not enough credit for all of ``data`` in one frame, or the write
                queue is full; nothing was queued.
            StreamReset, UplinkClosed: as :meth:`send_data`.
        """
        self._check_sendable()
        wire = self._data_frame_nowait(data, end) if data else b""
        if end:
            self._local_ended = True
            if not data or not self._uplink._end_stream:
                wire += frames.encode_end(self.id)
        if wire:
            self._uplink._send_now(wire, self.id)
        if end:
            self._maybe_finish()

    def _data_frame_nowait(self, data: bytes, end: bool = False) -> bytes:
        # A DATA frame for all of ``data``, its credit taken; or WouldBlock, nothing taken.
        # ``end``: flagged END_STREAM if the uplink agreed on it (the caller sends END if not).
        uplink = self._uplink
        size = len(data)
        if (
            size > self._send_window
            or size > uplink._remote_window
            or size > uplink._max_frame_size
            or uplink._out_size > _MAX_BATCH
        ):
            raise trio.WouldBlock
        self._send_window -= size
        uplink._remote_window -= size
        uplink._window_allowance += _WINDOWS_PER_DATA_FRAME
        return frames.encode_data(self.id, data, end and uplink._end_stream)

    def send_end(self) -> None:
        """Queue END: we send nothing more. Does not block; idempotent."""
        if self._local_ended:
            return
        self._check_sendable()
        self._local_ended = True
        self._uplink._send_now(frames.encode_end(self.id), self.id)
        self._maybe_finish()

    def reset(self, code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream both ways and tell the peer. Does not block; idempotent."""
        if self._closed:
            return
        self._error = StreamReset(stream_id=self.id, code=code, reason=reason or "reset locally")
        if not self._uplink._closing:
            self._uplink._queue(frames.encode(frames.Reset(self.id, code, reason)))
        self._finish()

    def close(self) -> None:
        """Reset the stream with CANCEL unless it finished normally. Idempotent; never blocks.

        Call it in a ``finally`` so a cancelled or failed handler leaves no stream behind.
        """
        if not self._closed:
            if self._local_ended and self._remote_ended:
                self._finish()
            elif self._local_ended and self._error is None:
                # We said all we had to say; stop the peer sending (h2's early response).
                self.reset(ErrorCode.NO_ERROR, "response complete")
            else:
                self.reset(ErrorCode.CANCEL, "abandoned")

    def _check_sendable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._send_error is not None:
            raise self._send_error
        if self._local_ended:
            raise StreamReset(stream_id=self.id, code=ErrorCode.PROTOCOL_ERROR, reason="ended")

    # --- driven by the uplink -------------------------------------------------------------

    @_ki_protected
    def _wake(self) -> None:
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def _maybe_finish(self) -> None:
        if self._local_ended and self._remote_ended and not self._buffer:
            self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._local_ended = True
        uplink = self._uplink
        uplink._streams.pop(self.id, None)
        if self._buffered:
            # Credit for data nobody will read goes back to the connection.
            uplink._consumed(None, self._buffered)
            self._buffer.clear()
            self._buffered = 0
        if self._waiter is not None:
            self._wake()
        if self._cancel_scope is not None and self._error is not None:
            self._cancel_scope.cancel()
        if uplink._credit_waiters:
            uplink._wake_credit()
        if not uplink._streams:
            if uplink._idle_event is not None:
                uplink._idle_event.set()
            if uplink._peer_goaway is not None:
                uplink.close(f"peer sent GOAWAY: {uplink._peer_goaway.reason}")


@final
class _Acceptor:
    """A task waiting in :meth:`TunnelUplink.accept_stream`, and the stream handed to it."""

    __slots__ = ("stream", "task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.stream: TunnelStream | None = None


@final
class TunnelUplink:
    """Multiplexes :class:`TunnelStream` objects over one :class:`FrameTransport`.

    Built by :func:`open_uplink` once the handshake is done; the constructor only stores.
    """

    def __init__(
        self,
        transport: FrameTransport,
        decoder: frames.FrameDecoder,
        settings: frames.Welcome,
        *,
        role: Role,
        max_incoming: int = 1024,
        name: str = "uplink",
        limits: UplinkLimits = UplinkLimits(),
        heartbeat_timeout: float | None = None,
    ) -> None:
        self.transport = transport
        self.limits = limits
        self.settings = settings
        self.role: Role = role
        self.name = name
        self._decoder = decoder
        decoder.max_frame_size = settings.max_frame_size
        self._max_frame_size = settings.max_frame_size
        # OPEN and DATA carry END_STREAM instead of an END frame after them, both ways, if
        # WELCOME agreed on it (PROTOCOL.md §2.1): a frame less per direction of an exchange.
        self._end_stream = decoder.end_stream = frames.END_STREAM in settings.capabilities
        self._initial_window = settings.initial_window
        self._connection_window = settings.connection_window
        self._local_window = settings.connection_window
        self._remote_window = settings.connection_window
        self._conn_unacked = 0
        self._streams: dict[int, TunnelStream] = {}
        self._last_stream_id = 0
        self._out: collections.deque[bytes] = collections.deque()
        self._out_size = 0
        # Positions in the sequence of everything ever queued: items before _taken left _out,
        # items before _sent were handed to the transport (PONG and reply bookkeeping).
        self._taken = 0
        self._sent = 0
        self._pong_at = -1
        self._unsent_replies: collections.deque[int] = collections.deque()
        self._out_event = trio.Event()
        self._drained_event = trio.Event()
        self._drained_waiters = 0
        self._credit_event = trio.Event()
        self._credit_waiters = 0
        self._idle_event: trio.Event | None = None  # made by drain() only, set once idle
        self._closed_event = trio.Event()
        self._writer_done = trio.Event()
        self._writer_sending = False
        # Coalescing (_send_now, _check_coalescing): while on, frames wait for the writer,
        # which sends everything the tasks of one scheduler pass queued in one write.
        self._coalescing = False
        self._probe_after = _PROBE_AFTER_MIN
        self._probe_in = _PROBE_AFTER_MIN
        # Streams whose frames _send_now queued since the last batch (several frames of one
        # stream, from one task or two, are one exchange), and the latest of them.
        self._senders = 0
        self._last_sender = 0
        self._closing = False
        self._close_error: UplinkClosed | None = None
        self._peer_goaway: frames.GoAway | None = None
        self._draining = False
        # An agent's drain waits for the PONG to the PING behind its GOAWAY (drain()).
        self._drain_pong: trio.Event | None = None
        self._drain_ping = b""
        # Streams opened by the peer that wait for a handler, and the handlers that wait for
        # a stream (agent side); a stream is handed straight to a waiting handler.
        self._incoming: collections.deque[TunnelStream] = collections.deque()
        self._max_incoming = max_incoming
        self._acceptors: collections.deque[_Acceptor] = collections.deque()
        self._last_received = trio.current_time()
        # The run's clock, read directly: trio.current_time() is four Python calls deep and
        # the reader reads the time once per receive.
        self._now = trio.lowlevel.current_clock().current_time
        interval = settings.ping_interval
        self.heartbeat_timeout = (
            heartbeat_timeout if heartbeat_timeout is not None else DEAD_AFTER_INTERVALS * interval
        )
        # Past this silence the heartbeat is late; math.inf without keepalive.
        self._late_after = _LATE_AFTER_INTERVALS * interval if interval > 0 else math.inf
        self._ping_sent_at = -math.inf
        self._sends = 0  # writes started; the watchdog sees a stuck one by it
        self._aux_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        # Flood accounting (PROTOCOL.md §7.1): free allowances earned by our own traffic, then
        # the buckets.
        self._window_allowance = 0
        self._stray_allowance = 0
        self._ping_bucket = TokenBucket(
            limits.ping_rate, limits.ping_burst, now=self._last_received
        )
        self._control_bucket = TokenBucket(
            limits.control_rate, limits.control_burst, now=self._last_received
        )

    def __repr__(self) -> str:
        state = "CLOSED" if self._closing else "DRAINING" if self._draining else "OPEN"
        return (
            f"<TunnelUplink {self.name} session={self.settings.session_id[:8]} "
            f"streams={len(self._streams)} {state}>"
        )

    def __str__(self) -> str:
        return self.name

    # --- public -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the uplink began closing; no new stream can be opened."""
        return self._closing

    @property
    def accepting(self) -> bool:
        """True while new streams may be opened on this uplink (not closing or draining)."""
        return not (self._closing or self._draining or self._peer_goaway is not None)

    def heartbeat_late(self, now: float) -> bool:
        """True if the peer has been silent past its PING's answer (PROTOCOL.md §6.2): it may
        be frozen or cut off. The relay then routes new requests to the session's other
        agents, if it has any."""
        return now - self._last_received > self._late_after

    @property
    def peer_draining(self) -> bool:
        """True once the peer sent a graceful GOAWAY (it is draining or shutting down)."""
        return self._peer_goaway is not None and self._peer_goaway.code == ErrorCode.NO_ERROR

    @property
    def max_frame_size(self) -> int:
        """The negotiated frame size limit (WELCOME), both directions: a head must fit in
        one OPEN frame of at most this many payload bytes (PROTOCOL.md §4.2)."""
        return self._max_frame_size

    @property
    def open_streams(self) -> int:
        """Streams not yet finished in both directions."""
        return len(self._streams)

    @property
    def close_reason(self) -> str:
        """Why the uplink closed, or ``""`` while it is open."""
        return self._close_error.reason if self._close_error else ""

    def statistics(self) -> UplinkStatistics:
        """Return a snapshot of streams, credit and queues."""
        return UplinkStatistics(
            open_streams=len(self._streams),
            local_window=self._local_window,
            remote_window=self._remote_window,
            queued_bytes=self._out_size,
            incoming_queued=len(self._incoming),
        )

    def open_stream(self, head: bytes, *, end: bool = False) -> TunnelStream:
        """Open a stream carrying the request ``head`` (relay side). Does not block.

        With ``end`` (a request without a body), END goes out with the OPEN, in one write.

        Raises:
            UplinkClosed: the uplink is closing or draining.
            LocalProtocolError: ``head`` is not a complete HTTP head, or is larger than the
                negotiated frame size (``code`` FRAME_SIZE_ERROR, ``status_hint`` 431); no
                stream was opened.
        """
        if self._closing or self._draining or self._peer_goaway is not None:  # not accepting
            raise self._close_error or UplinkClosed("uplink is draining")
        if len(head) > self._max_frame_size:
            self._check_head_size(head, 431)
        stream_id = self._last_stream_id + 2 if self._last_stream_id else 1
        end_stream = end and self._end_stream
        wire = frames.encode_open(stream_id, head, end_stream)
        self._last_stream_id = stream_id
        self._stray_allowance += _STRAY_FRAMES_PER_STREAM
        stream = TunnelStream(self, stream_id, None)
        self._streams[stream_id] = stream
        if end:
            stream._local_ended = True
            if not end_stream:
                wire += frames.encode_end(stream_id)
        self._send_now(wire, stream_id)
        return stream

    @_ki_protected
    async def accept_stream(self) -> TunnelStream:
        """Wait for the next stream the relay opened (agent side).

        Raises:
            UplinkClosed: the uplink closed; streams still queued were reset.
        """
        if self._incoming or self._closing:
            # As trio's channels: a cancellation can only land before a stream is taken.
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._incoming:
                stream = self._incoming.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return stream
            if self._closing:
                await trio.lowlevel.cancel_shielded_checkpoint()
                raise self._close_error or UplinkClosed("uplink closed")
        # Nothing to take: park (a checkpoint of its own, so a cancellation already pending
        # lands there, with nothing taken; no checkpoint_if_cancelled coroutine before it).
        acceptor = _Acceptor(trio.lowlevel.current_task())
        acceptors = self._acceptors
        acceptors.append(acceptor)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            acceptors.remove(acceptor)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if acceptor.stream is None:  # woken by close()
            raise self._close_error or UplinkClosed("uplink closed")
        return acceptor.stream

    async def wait_closed(self) -> None:
        """Block until the uplink has closed."""
        await self._closed_event.wait()

    async def drain(self, grace_period: float) -> None:
        """Send GOAWAY, wait up to ``grace_period`` seconds for open streams, then close.

        Works from either side (PROTOCOL.md §6.3): the relay opens no stream after it; an
        agent's GOAWAY tells the relay to route new requests elsewhere. The agent cannot
        know which OPENs are on their way, so it does as HTTP/2 servers do (RFC 9113 §6.8):
        its GOAWAY names the largest stream id, a PING follows, and every stream the relay
        opened before its PONG is served. Streams still open at the deadline are reset when
        the uplink closes.
        """
        with trio.move_on_after(grace_period):
            if not self._closing and not self._draining and self._drain_pong is None:
                logger.info("%s draining (%d streams open)", self, len(self._streams))
                if self.role == "agent":
                    self._drain_pong = trio.Event()
                    self._drain_ping = os.urandom(8)
                    self._queue(
                        frames.encode(frames.GoAway(frames.MAX_STREAM_ID, reason="draining"))
                        + frames.encode(frames.Ping(self._drain_ping))
                    )
                    await self._drain_pong.wait()
                else:
                    self._queue(
                        frames.encode(frames.GoAway(self._last_stream_id, reason="draining"))
                    )
                self._draining = True
            if self._streams:
                self._idle_event = trio.Event()
                await self._idle_event.wait()
            if self.role == "agent":
                # The relay closes once its side of the last stream is done (it read our
                # GOAWAY): closing first could reset the connection under the tail of a
                # response it has not read yet.
                with trio.move_on_after(_CLOSE_FLUSH_TIMEOUT):
                    await self._closed_event.wait()
        self.close("drained")
        await trio.lowlevel.checkpoint()

    @_ki_protected
    def close(self, reason: str, code: int = ErrorCode.NO_ERROR) -> None:
        """Begin closing: fail every stream, queue GOAWAY, stop reading. Idempotent.

        The writer flushes what is queued (bounded by a short timeout) and the transport is
        closed when :func:`open_uplink` exits.
        """
        if self._closing:
            return
        logger.info("%s closing: %s", self, reason)
        self._close_error = UplinkClosed(reason)
        self._queue(frames.encode(frames.GoAway(self._last_stream_id, code, reason[:200])))
        self._closing = True
        for stream in list(self._streams.values()):
            if stream._remote_ended and stream._local_ended:
                # Both sides said all they had to; what is buffered may still be read.
                stream._wake()
                stream._maybe_finish()
            else:
                stream._error = self._close_error
                stream._finish()
        while self._incoming:
            self._incoming.popleft()._finish()
        while self._acceptors:
            trio.lowlevel.reschedule(self._acceptors.popleft().task)
        self._aux_scope.cancel()
        self._out_event.set()
        self._wake_credit()
        self._wake_drained()
        if self._drain_pong is not None:
            self._drain_pong.set()
        self._closed_event.set()

    # --- internals called by TunnelStream ---------------------------------------------------

    def _check_head_size(self, head: bytes, status_hint: int) -> None:
        # Checked where the frame is built: the peer's decoder would close the whole uplink
        # on an oversized frame (PROTOCOL.md §2), failing every other stream on it.
        if len(head) > self._max_frame_size:
            raise LocalProtocolError(
                f"head is {len(head)} bytes, over the tunnel's frame limit of "
                f"{self._max_frame_size}",
                code=ErrorCode.FRAME_SIZE_ERROR,
                status_hint=status_hint,
            )

    def _queue(self, data: bytes) -> None:
        if self._closing:
            raise self._close_error or UplinkClosed("uplink closed")
        out = self._out
        out.append(data)
        self._out_size += len(data)
        self._out_event.set()
        if len(out) >= _EARLY_FLUSH_FRAMES and not self._writer_sending:
            # A burst is being queued (many requests in one scheduler pass): send what we
            # have now, so the peer starts on it while we queue the rest, instead of the
            # whole burst waiting for the writer's turn (the pipeline overlaps).
            data = b"".join(out)
            try:
                sent = self.transport.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # Left for the writer, whose send fails the same way and closes the uplink:
                # raising here would fail a caller that only queued (or close() midway).
                return
            if sent:
                self._taken += len(out)
                self._sent = self._taken
                out.clear()
                self._out_size = 0
                if self._coalescing:
                    self._check_coalescing()

    def _send_now(self, data: bytes, stream_id: int) -> None:
        # What a task that holds frames (of stream ``stream_id``) does when it is done for
        # now: if the writer is idle with nothing queued, write them from this task, without
        # waking the writer (one task switch less per message); else queue them behind the
        # rest. While coalescing (see _check_coalescing), queue them anyway.
        if self._coalescing:
            if stream_id != self._last_sender:  # (the writer counts streams, not frames)
                self._last_sender = stream_id
                self._senders += 1
            self._queue(data)
            return
        if self._out or self._writer_sending or self._closing:
            self._queue(data)
            return
        if len(self._streams) > 1:
            self._probe_in -= 1
            if self._probe_in <= 0:
                self._coalescing = True
                self._senders = 1
                self._last_sender = stream_id
                self._queue(data)
                return
        try:
            sent = self.transport.send_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close(f"connection lost while sending: {exc}")
            raise self._close_error or UplinkClosed("uplink closed") from None
        if not sent:
            self._queue(data)
            return
        self._taken += 1
        self._sent = self._taken
        if self.transport.pending:  # the socket took part of it: the writer flushes the rest
            self._out_event.set()

    async def _wait_writable(self) -> None:
        # Backpressure on the writer's queue: a sender waits while more than one batch is
        # pending (flow control already bounds it; this keeps latency low).
        if self._out_size > _MAX_BATCH:
            while self._out_size > _MAX_BATCH and not self._closing:
                self._drained_waiters += 1
                try:
                    await self._drained_event.wait()
                finally:
                    self._drained_waiters -= 1
            if self._closing:
                raise self._close_error or UplinkClosed("uplink closed")
        else:
            await trio.lowlevel.checkpoint()

    async def _wait_credit(self) -> None:
        if self._closing:
            raise self._close_error or UplinkClosed("uplink closed")
        self._credit_waiters += 1
        try:
            await self._credit_event.wait()
        finally:
            self._credit_waiters -= 1

    def _wake_credit(self) -> None:
        # Every waiter waits on the current event; waking sets it and starts a new one
        # (only when someone waits: this runs for every finished stream).
        if self._credit_waiters:
            self._credit_event.set()
            self._credit_event = trio.Event()

    def _wake_drained(self) -> None:
        if self._drained_waiters:
            self._drained_event.set()
            self._drained_event = trio.Event()

    def _consumed(self, stream: TunnelStream | None, size: int) -> None:
        # Return credit once half a window has been consumed (PROTOCOL.md §6).
        if self._closing:
            return
        if stream is not None and not stream._remote_ended:
            stream._unacked += size
            if stream._unacked * _CREDIT_RETURN_FRACTION >= self._initial_window:
                stream._recv_window += stream._unacked
                self._queue(frames.encode(frames.Window(stream.id, stream._unacked)))
                stream._unacked = 0
        self._conn_unacked += size
        window = self._connection_window
        if (
            self._conn_unacked * _CREDIT_RETURN_FRACTION >= window
            # Unread streams may hold most of the window: return what was read at once
            # rather than stall the streams that are being read (h2's WindowManager).
            or self._local_window * _CREDIT_RETURN_FRACTION < window
        ):
            self._local_window += self._conn_unacked
            self._queue(frames.encode(frames.Window(0, self._conn_unacked)))
            self._conn_unacked = 0

    # --- tasks ------------------------------------------------------------------------

    async def _writer_task(self) -> None:
        try:
            # _watchdog_task cancels this scope when a write makes no progress; the write it
            # interrupts leaves the transport broken, so nothing is sent after it.
            with self._writer_scope:
                await self._write_loop()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close(f"connection lost while sending: {exc}")
        finally:
            self._writer_done.set()

    async def _write_loop(self) -> None:
        transport = self.transport
        while True:
            if transport.pending:
                self._sends += 1
                self._writer_sending = True
                await transport.flush()
                self._writer_sending = False
            if not self._out:
                if self._closing:
                    return
                self._out_event = trio.Event()
                await self._out_event.wait()
                continue
            if self._out_size <= _MAX_BATCH:
                batch, self._out = self._out, collections.deque()
                self._out_size = 0
            else:
                batch = self._take_batch()
            self._taken += len(batch)
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            if self._coalescing:
                self._check_coalescing()
            self._wake_drained()
            self._sends += 1
            self._writer_sending = True
            if self._closing:
                with trio.move_on_after(_CLOSE_FLUSH_TIMEOUT):
                    await transport.send(data)
                return
            await transport.send(data)
            self._writer_sending = False
            self._sent = self._taken

    def _check_coalescing(self) -> None:
        # A batch left while coalescing. If one stream at most sent in that scheduler
        # pass, waiting for the writer cost a pass (~50,000 instructions) and
        # saved no system call: write directly again, and probe later, each failed probe
        # doubling the wait (a stream that stays open, like a WebSocket or an event
        # stream, keeps two open and would otherwise make every lone request probe).
        if self._senders > 1:
            self._probe_after = _PROBE_AFTER_MIN
        else:
            self._coalescing = False
            self._probe_in = self._probe_after
            self._probe_after = min(self._probe_after * 2, _PROBE_AFTER_MAX)
        self._senders = 0
        self._last_sender = 0

    def _take_batch(self) -> collections.deque[bytes]:
        # O(frames taken), however long the backlog (a list's del out[:n] is not).
        batch: collections.deque[bytes] = collections.deque()
        out = self._out
        size = len(out[0])
        batch.append(out.popleft())
        while out and size + len(out[0]) <= _MAX_BATCH:
            size += len(out[0])
            batch.append(out.popleft())
        self._out_size -= size
        return batch

    def _queue_reply(self, data: bytes) -> None:
        # A frame the peer's frame obliges us to send. A peer that makes us reply but does
        # not read could grow _out without bound: cap what waits unsent (PROTOCOL.md §7.1).
        replies = self._unsent_replies
        while replies and replies[0] < self._sent:
            replies.popleft()
        if len(replies) >= self.limits.max_unsent_replies:
            raise RemoteProtocolError(
                f"peer is not reading: {len(replies)} replies to its frames wait unsent",
                code=ErrorCode.ENHANCE_YOUR_CALM,
            )
        replies.append(self._taken + len(self._out))
        self._queue(data)

    def _charge(self, bucket: TokenBucket, kind: str) -> None:
        # A frame that does no useful work draws a token; none left is a flood (§7.1).
        if not bucket.take(self._last_received):
            raise RemoteProtocolError(
                f"{kind} flood: more than {bucket.burst:g} at once or {bucket.rate:g}/s",
                code=ErrorCode.ENHANCE_YOUR_CALM,
            )

    def _charge_stray(self, kind: str) -> None:
        if self._stray_allowance > 0:
            self._stray_allowance -= 1
        else:
            self._charge(self._control_bucket, f"{kind} for unknown streams")

    async def _reader_task(self) -> None:
        transport = self.transport
        decoder = self._decoder
        streams = self._streams
        budget = _FRAMES_PER_CHECKPOINT
        try:
            while True:
                # First round: frames the peer sent right behind its handshake frame. All the
                # frames of one receive come in one list (one decoder call per receive, not
                # one per frame); OPEN, DATA and END are handled inline (no call per frame).
                for item in decoder.next_items():
                    if isinstance(item, tuple):  # OPEN, DATA, END: no frame objects
                        kind, stream_id, payload = item
                        if kind == _TYPE_DATA:
                            size = len(payload)
                            self._local_window -= size
                            stream = streams.get(stream_id)
                            if (
                                self._local_window < 0
                                or stream is None
                                or stream._remote_ended
                                or stream._recv_window < size
                            ):
                                self._on_stray_data(stream, stream_id, size)
                            else:
                                stream._recv_window -= size
                                stream._buffer.append(payload)
                                stream._buffered += size
                                if stream._waiter is not None:
                                    stream._wake()
                        elif kind == _TYPE_END:
                            stream = streams.get(stream_id)
                            if stream is None or stream._remote_ended:
                                self._charge_stray("END")
                            else:
                                stream._remote_ended = True
                                if stream._waiter is not None:
                                    stream._wake()
                                if stream._local_ended and not stream._buffer:
                                    stream._finish()
                        else:
                            self._dispatch_open(stream_id, payload)
                    else:
                        self._dispatch(item)
                    if self._closing:
                        return
                    budget -= 1
                    if budget <= 0:
                        # Let other uplinks and streams run however fast frames arrive (§7.1).
                        budget = _FRAMES_PER_CHECKPOINT
                        await trio.lowlevel.checkpoint()
                if decoder.error is not None:  # a bad frame behind the ones just handled
                    raise decoder.error
                if decoder.at_eof:
                    self.close("peer closed the connection")
                    return
                if budget <= 0:
                    budget = _FRAMES_PER_CHECKPOINT
                    await trio.lowlevel.checkpoint()
                data = await transport.receive()
                self._last_received = self._now()
                budget -= 1 + (len(data) >> _RECEIVE_BYTES_PER_UNIT_SHIFT)
                decoder.receive_data(data)
        except ProtocolError as exc:
            logger.warning("%s protocol error: %s", self, exc)
            self.close(f"protocol error: {exc}", exc.code)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close(f"connection lost: {exc}")

    def _on_stray_data(self, stream: TunnelStream | None, stream_id: int, size: int) -> None:
        # The reader's DATA path for what is not a DATA frame for an open stream within its
        # credit; the connection's credit was already taken.
        if self._local_window < 0:
            raise RemoteProtocolError(
                f"peer overran the connection window by {-self._local_window} bytes",
                code=ErrorCode.FLOW_CONTROL_ERROR,
            )
        if stream is None or stream._remote_ended:
            self._consumed(None, size)  # a late frame for a finished stream
            return
        raise RemoteProtocolError(
            f"peer overran stream {stream_id}'s window by {size - stream._recv_window} bytes",
            code=ErrorCode.FLOW_CONTROL_ERROR,
        )

    def _dispatch(self, frame: frames.Frame) -> None:
        # The frames other than OPEN, DATA and END (the reader handles those itself).
        kind = type(frame)
        if kind is frames.Window:
            assert isinstance(frame, frames.Window)
            # Credit comes back for DATA we sent; a WINDOW beyond that returns nothing we
            # used (PROTOCOL.md §7.1).
            if self._window_allowance > 0:
                self._window_allowance -= 1
            else:
                self._charge(self._control_bucket, "WINDOW")
            if frame.stream_id == 0:
                self._remote_window += frame.increment
                if self._remote_window > frames.MAX_WINDOW:
                    raise RemoteProtocolError(
                        "connection window exceeds 2^31-1", code=ErrorCode.FLOW_CONTROL_ERROR
                    )
            else:
                stream = self._streams.get(frame.stream_id)
                if stream is None:
                    return
                stream._send_window += frame.increment
                if stream._send_window > frames.MAX_WINDOW:
                    raise RemoteProtocolError(
                        f"stream {frame.stream_id} window exceeds 2^31-1",
                        code=ErrorCode.FLOW_CONTROL_ERROR,
                    )
            self._wake_credit()
        elif kind is frames.Reset:
            assert isinstance(frame, frames.Reset)
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                self._charge_stray("RESET")
            else:
                error = StreamReset(stream_id=frame.stream_id, code=frame.code, reason=frame.reason)
                if stream._remote_ended and frame.code == ErrorCode.NO_ERROR:
                    # The peer finished its direction, then stopped ours (an early
                    # response): what it sent stays readable (PROTOCOL.md §4).
                    stream._local_ended = True
                    stream._send_error = error
                    stream._wake()
                    self._wake_credit()
                    stream._maybe_finish()
                else:
                    stream._error = error
                    stream._finish()
        elif kind is frames.Ping:
            assert isinstance(frame, frames.Ping)
            self._charge(self._ping_bucket, "PING")
            # One PONG at a time: while one waits unsent, a PING gets none (liveness is any
            # frame, PROTOCOL.md §6.2), so a peer that does not read cannot pile them up.
            if self._pong_at < self._sent:
                self._pong_at = self._taken + len(self._out)
                self._queue_reply(frames.encode(frames.Pong(frame.opaque)))
        elif kind is frames.Pong:
            assert isinstance(frame, frames.Pong)
            self._charge(self._ping_bucket, "PONG")  # liveness was recorded on arrival
            if self._drain_pong is not None and frame.opaque == self._drain_ping:
                self._drain_pong.set()
        elif kind is frames.GoAway:
            assert isinstance(frame, frames.GoAway)
            self._charge(self._control_bucket, "GOAWAY")
            logger.info("%s peer sent GOAWAY: %s", self, frame.reason or "no reason")
            self._peer_goaway = frame
            if frame.code != ErrorCode.NO_ERROR:
                self.close(f"peer closed with {ErrorCode.name_of(frame.code)}: {frame.reason}")
            elif not self._streams:
                self.close(f"peer sent GOAWAY: {frame.reason}")
        else:
            raise RemoteProtocolError(f"unexpected {kind.__name__} frame after the handshake")

    @_ki_protected
    def _dispatch_open(self, stream_id: int, head: bytes) -> None:
        if self.role == "relay":
            stream = self._streams.get(stream_id)
            if stream is None:
                self._charge_stray("OPEN")  # an answer to a stream we already gave up on
                return
            if stream._head is not None:
                # A stream error, not a connection one (PROTOCOL.md §4.1): the agent's
                # other streams live on; this one fails as a RESET would make it fail.
                logger.warning("%s second OPEN on stream %d; stream reset", self, stream_id)
                stream.reset(ErrorCode.PROTOCOL_ERROR, "the agent sent a second response head")
                return
            stream._head = head
            stream._wake()
            return
        if stream_id <= self._last_stream_id or stream_id % 2 == 0:
            raise RemoteProtocolError(
                f"OPEN on stream {stream_id} after stream {self._last_stream_id}; "
                "relay streams are odd and increasing"
            )
        self._last_stream_id = stream_id
        self._stray_allowance += _STRAY_FRAMES_PER_STREAM
        stream = TunnelStream(self, stream_id, head)
        if self._draining:
            self._queue_reply(
                frames.encode(frames.Reset(stream_id, ErrorCode.REFUSED_STREAM, "draining"))
            )
            return
        if self._acceptors:
            acceptor = self._acceptors.popleft()
            acceptor.stream = stream
            trio.lowlevel.reschedule(acceptor.task)
        elif len(self._incoming) < self._max_incoming:
            self._incoming.append(stream)
        else:
            self._queue_reply(
                frames.encode(
                    frames.Reset(stream_id, ErrorCode.OVERLOADED, "agent request queue is full")
                )
            )
            return
        self._streams[stream_id] = stream

    async def _keepalive_task(self, interval: float) -> None:
        # Heartbeat (PROTOCOL.md §6.2): a PING once the peer was silent for an interval, and
        # a PONG answers it, so a live peer is never silent for much more than an interval;
        # silence for heartbeat_timeout means a frozen or cut-off peer. Sleeps until the
        # next moment something is due, so a busy uplink costs one wake-up per interval.
        timeout = self.heartbeat_timeout
        while True:
            now = trio.current_time()
            last = self._last_received
            if now - last >= timeout:
                self.close(f"no frame from the peer for {now - last:.1f}s (heartbeat timeout)")
                return
            # A PING is outstanding until something arrives after it (at the same instant
            # counts: a mock clock does not move while frames cross).
            outstanding = self._ping_sent_at > last
            if now - last >= interval and not outstanding:
                self._ping_sent_at = now
                outstanding = now > last
                self._queue(frames.encode(frames.Ping(os.urandom(8))))
            due = last + (timeout if outstanding else interval)
            await trio.sleep_until(max(due, now + interval / 64))

    async def _watchdog_task(self) -> None:
        # Polls rather than arming a deadline per write: the writer's hot path only counts
        # the writes it starts. A stuck write is caught between timeout and 1.25 x timeout.
        timeout = self.limits.write_timeout
        watched = -1  # the write in progress at the last poll
        since = 0.0  # when a poll first saw it in progress
        while True:
            await trio.sleep(timeout / 4)
            now = trio.current_time()
            if not self._writer_sending:
                watched = -1
            elif self._sends != watched:
                watched, since = self._sends, now
            elif now - since >= timeout:
                self.close(
                    f"peer is not reading: a write made no progress for {timeout:g}s",
                    ErrorCode.ENHANCE_YOUR_CALM,
                )
                self._writer_scope.cancel()
                return


async def receive_handshake_frame(
    transport: FrameTransport, decoder: frames.FrameDecoder
) -> frames.Frame:
    """Read one frame before the uplink exists (HELLO, WELCOME or REFUSE).

    Takes no timeout: callers wrap it in :func:`trio.fail_after`.

    Raises:
        RemoteProtocolError: the bytes are not a frame.
        HandshakeError: the peer closed before a whole frame arrived.
    """
    while (frame := decoder.next_frame()) is None:
        data = await transport.receive()
        decoder.receive_data(data)
        if not data:
            try:
                frame = decoder.next_frame()
            except RemoteProtocolError as exc:
                raise HandshakeError(
                    f"the peer closed the connection during the handshake: {exc}"
                ) from exc
            if frame is None:
                raise HandshakeError("the peer closed the connection during the handshake")
            return frame
    return frame


@asynccontextmanager
async def open_uplink(
    transport: FrameTransport,
    decoder: frames.FrameDecoder,
    settings: frames.Welcome,
    *,
    role: Role,
    max_incoming: int = 1024,
    name: str = "uplink",
    limits: UplinkLimits = UplinkLimits(),
    heartbeat_timeout: float | None = None,
) -> AsyncIterator[TunnelUplink]:
    """Run an uplink over a transport whose handshake is done.

    Starts the reader, writer and keepalive tasks in a nursery this manager owns, yields the
    uplink, and on exit closes it: streams still open are failed with
    :class:`~tunnel2.errors.UplinkClosed`, GOAWAY is flushed (bounded by a short shielded
    timeout), and the transport is closed. No task outlives the block.

    Args:
        transport: the connected transport.
        decoder: the decoder that read the handshake (it may hold frames behind it).
        settings: the WELCOME both sides agreed on.
        role: ``"relay"`` opens streams; ``"agent"`` accepts them.
        max_incoming: agent side: streams that may wait for a handler before new ones are
            reset with OVERLOADED.
        name: the short id used in log lines.
        limits: what the peer may make this uplink do before it is closed
            (:class:`UplinkLimits`, PROTOCOL.md §7.1).
        heartbeat_timeout: seconds of silence from the peer after which the uplink is
            closed as dead (its streams fail); default twice ``settings.ping_interval``.
            Unused when ``ping_interval`` is 0.
    """
    uplink = TunnelUplink(
        transport,
        decoder,
        settings,
        role=role,
        max_incoming=max_incoming,
        name=name,
        limits=limits,
        heartbeat_timeout=heartbeat_timeout,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uplink._writer_task)
            nursery.start_soon(_run_aux, uplink)
            try:
                yield uplink
            finally:
                uplink.close("closed locally")
                with trio.move_on_after(_CLOSE_FLUSH_TIMEOUT) as scope:
                    scope.shield = True
                    await uplink._writer_done.wait()
                nursery.cancel_scope.cancel()
    finally:
        uplink.close("closed locally")
        await trio.aclose_forcefully(transport)


async def _run_aux(uplink: TunnelUplink) -> None:
    with uplink._aux_scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uplink._reader_task)
            if uplink.settings.ping_interval > 0:
                nursery.start_soon(uplink._keepalive_task, uplink.settings.ping_interval)
            if not math.isinf(uplink.limits.write_timeout):
                nursery.start_soon(uplink._watchdog_task)
