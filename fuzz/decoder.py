"""Fuzz target 1: the frame decoder (:class:`tunnel2.frames.FrameDecoder`).

Inputs are random bytes, valid frame batches with a few bytes mutated, inserted or cut, and
valid batches; each is fed whole and again in random pieces. Invariants:

* only :class:`~tunnel2.errors.RemoteProtocolError` escapes, with a known code, and a decoder
  that raised stays failed (the same error from every later call);
* feeding in pieces gives the same frames and the same error as feeding whole;
* the decoder never waits on a frame longer than ``max_frame_size``: after draining, fewer
  than ``HEADER_SIZE + max_frame_size`` bytes are buffered, and a header declaring more is
  refused as soon as its 10 bytes are in;
* every decoded frame re-encodes to one that decodes equal; binary frames re-encode to the
  exact bytes they came from; frames before the first mutated byte come out unchanged;
* valid batches round-trip exactly, whatever the split.

Run: ``python -m fuzz.decoder --seconds 300``.
"""

from __future__ import annotations

import itertools
import struct
import sys
from typing import Final

import attrs
import pytest
from hypothesis import strategies as st

from fuzz._campaign import Property, main
from tunnel2 import frames
from tunnel2.errors import ErrorCode, ProtocolError, RemoteProtocolError

ERROR_CODES: Final = frozenset(
    value for name, value in vars(ErrorCode).items() if name.isupper() and isinstance(value, int)
)
_HEADER: Final = struct.Struct("!IBBI")
_JSON_TYPES: Final = (frames.Hello, frames.Welcome)

# --- strategies -----------------------------------------------------------------------------

stream_ids = st.sampled_from([1, 2, 3, frames.MAX_STREAM_ID]) | st.integers(1, frames.MAX_STREAM_ID)
codes = st.integers(0, 0xFFFF)
reasons = st.text(max_size=60)
# Surrogates and odd code points where the codec must carry them as JSON escapes.
wild_text = st.text(max_size=30) | st.sampled_from(["\ud800", "x\udc80y", "\U0010ffff", "\x00"])
session_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=64,
)
windows = st.integers(1, frames.MAX_WINDOW)
opaque = st.binary(min_size=8, max_size=8)

valid_frames: st.SearchStrategy[frames.Frame] = st.one_of(
    st.builds(
        frames.Hello,
        token=st.none() | wild_text,
        session_id=st.none() | session_ids,
        resume_key=st.none() | wild_text,
        max_frame_size=st.integers(frames.MIN_MAX_FRAME_SIZE, 2**64),
        capabilities=st.lists(wild_text, max_size=3).map(tuple),
    ),
    st.builds(
        frames.Welcome,
        session_id=session_ids,
        public_urls=st.lists(wild_text, min_size=1, max_size=2).map(tuple),
        resume_key=wild_text,
        max_frame_size=st.integers(frames.MIN_MAX_FRAME_SIZE, 2**40),
        initial_window=windows,
        connection_window=windows,
        ping_interval=st.floats(0, 86400),
    ),
    st.builds(frames.Refuse, codes, reasons),
    st.builds(frames.Open, stream_ids, st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n")),
    st.builds(frames.Data, stream_ids, st.binary(min_size=1, max_size=3000)),
    st.builds(frames.End, stream_ids),
    st.builds(frames.Reset, stream_ids, codes, reasons),
    st.builds(frames.Window, st.integers(0, frames.MAX_STREAM_ID), windows),
    st.builds(frames.Ping, opaque),
    st.builds(frames.Pong, opaque),
    st.builds(frames.GoAway, st.integers(0, frames.MAX_STREAM_ID), codes, reasons),
)
max_frame_sizes = st.sampled_from([frames.MIN_MAX_FRAME_SIZE, 2048, frames.DEFAULT_MAX_FRAME_SIZE])

# A header with chosen fields, so lengths near and past the limit and unknown types are common.
headers = st.builds(
    _HEADER.pack,
    st.sampled_from([0, 1, 8, 1023, 1024, 1025, 65536, 65537, 2**32 - 1])
    | st.integers(0, 2**32 - 1),
    st.sampled_from([0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x13, 0x14, 0x20, 0x21, 0x22, 0, 0xFF]),
    st.sampled_from([0, 0, 0, 1, 0x80]),
    st.sampled_from([0, 1, 2, frames.MAX_STREAM_ID]),
)


@attrs.frozen
class Mutation:
    """Change ``wire[at:at + cut]`` into ``insert``."""

    at: int
    cut: int
    insert: bytes


@attrs.frozen
class StreamCase:
    """Bytes to decode, the frames they were made from (if any), and how to split them."""

    original: tuple[frames.Frame, ...]
    mutations: tuple[Mutation, ...]
    tail: bytes
    cuts: tuple[int, ...]
    max_frame_size: int
    eof: bool

    def wire(self) -> tuple[bytes, int]:
        """The bytes, and the offset of the first byte that differs from the valid batch."""
        data = bytearray(b"".join(frames.encode(f) for f in self.original))
        first = len(data)
        for m in self.mutations:
            at = min(m.at, len(data))
            data[at : at + m.cut] = m.insert
            first = min(first, at)
        return bytes(data) + self.tail, first


mutations = st.builds(
    Mutation,
    st.integers(0, 4000),
    st.integers(0, 4),
    st.binary(max_size=4) | headers | st.sampled_from([b"\x00", b"\xff", b"\x7f\xff\xff\xff"]),
)


@st.composite
def stream_cases(draw: st.DrawFn) -> StreamCase:
    kind = draw(st.integers(0, 9))
    original = tuple(draw(st.lists(valid_frames, max_size=6))) if kind else ()
    muts = tuple(draw(st.lists(mutations, max_size=3))) if kind < 7 else ()
    tail = draw(st.binary(max_size=400) if kind == 0 else st.just(b"") | st.binary(max_size=30))
    if kind in (1, 2):
        tail = draw(headers) + tail
    total = sum(len(frames.encode(f)) for f in original) + len(tail) + 8 * len(muts)
    cuts = tuple(sorted(draw(st.lists(st.integers(0, total), max_size=8))))
    return StreamCase(original, muts, tail, cuts, draw(max_frame_sizes), draw(st.booleans()))


# --- checks ---------------------------------------------------------------------------------


def _pieces(wire: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *(min(c, len(wire)) for c in cuts), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _decode(
    pieces: list[bytes], max_frame_size: int, eof: bool
) -> tuple[list[frames.Frame], RemoteProtocolError | None]:
    """Feed ``pieces`` (then EOF if asked), draining after each; check the invariants that
    hold at every step, and return the frames and the error, if any."""
    decoder = frames.FrameDecoder(max_frame_size=max_frame_size)
    got: list[frames.Frame] = []
    error: RemoteProtocolError | None = None
    try:
        for piece in [*pieces, b""] if eof else pieces:
            decoder.receive_data(piece)
            while (frame := decoder.next_frame()) is not None:
                got.append(frame)
            # Never waiting on a frame over the limit: what is left is less than one.
            assert decoder.buffered < frames.HEADER_SIZE + max_frame_size, decoder
    except RemoteProtocolError as exc:
        error = exc
    except ProtocolError as exc:  # pragma: no cover - a finding
        raise AssertionError(
            f"{type(exc).__name__} escaped instead of RemoteProtocolError"
        ) from exc
    if error is None:
        assert decoder.at_eof == eof, decoder
        return got, None
    assert error.code in ERROR_CODES, error.code
    assert str(error)
    for call in (decoder.next_frame, lambda: decoder.receive_data(b"x")):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value is error, (again.value, error)
    return got, error


def check_stream(case: StreamCase) -> None:
    """Random and mutated-valid streams, whole and split: see the module docstring."""
    wire, first_changed = case.wire()
    whole, whole_error = _decode([wire] if wire else [], case.max_frame_size, case.eof)
    split, split_error = _decode(_pieces(wire, case.cuts), case.max_frame_size, case.eof)
    assert split == whole
    assert str(split_error) == str(whole_error)
    offset = 0
    for frame in whole:
        encoded = frames.encode(frame)
        again, again_error = _decode([encoded], max(case.max_frame_size, len(encoded)), True)
        assert again_error is None, (frame, again_error)
        assert again == [frame]
        if not isinstance(frame, _JSON_TYPES):
            assert encoded == wire[offset : offset + len(encoded)]
        offset += _HEADER.unpack_from(wire, offset)[0] + frames.HEADER_SIZE
    # Frames wholly before the first changed byte decode exactly as they were sent.
    end = 0
    for index, frame in enumerate(case.original):
        end += len(frames.encode(frame))
        if end > first_changed:
            break
        if len(frames.encode(frame)) - frames.HEADER_SIZE > case.max_frame_size:
            break
        assert whole[index] == frame


def check_round_trip(case: StreamCase) -> None:
    """Valid batches (no mutation, no tail) decode to exactly what was encoded."""
    wire = b"".join(frames.encode(f) for f in case.original)
    limit = max([case.max_frame_size, *(len(frames.encode(f)) for f in case.original)])
    got, error = _decode(_pieces(wire, case.cuts), limit, True)
    assert error is None, error
    assert got == list(case.original)


def check_oversized_header(header: tuple[int, int, int, int]) -> None:
    """A header declaring more than the limit is refused once its 10 bytes are in."""
    length, ftype, flags, sid = header
    max_frame_size = frames.MIN_MAX_FRAME_SIZE
    decoder = frames.FrameDecoder(max_frame_size=max_frame_size)
    decoder.receive_data(_HEADER.pack(length, ftype, flags, sid))
    if length <= max_frame_size:
        return
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR, info.value


round_trip_cases = st.builds(
    StreamCase,
    st.lists(valid_frames, min_size=1, max_size=8).map(tuple),
    st.just(()),
    st.just(b""),
    st.lists(st.integers(0, 20000), max_size=8).map(lambda c: tuple(sorted(c))),
    max_frame_sizes,
    st.just(True),
)
oversized_headers = st.tuples(
    st.integers(frames.MIN_MAX_FRAME_SIZE - 2, 2**32 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
)

PROPERTIES: Final = (
    Property("stream", stream_cases(), check_stream),
    Property("round_trip", round_trip_cases, check_round_trip),
    Property("oversized_header", oversized_headers, check_oversized_header),
)

if __name__ == "__main__":
    sys.exit(main("decoder", PROPERTIES))
