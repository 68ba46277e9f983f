"""Tests for the sans-IO frame codec, :mod:`tunnel2.frames` (PROTOCOL.md §2, §3, §5).

Sync tests only, in h11's manner: round-trip every frame type, feed each encoding whole, one
byte at a time and with trailing bytes (:func:`tr`), check every malformed input raises
:class:`RemoteProtocolError` with the right code, and fuzz the decoder with hypothesis.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import struct
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel2 import frames
from tunnel2._util import compiled_modules
from tunnel2.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError

# A TUNNEL2_COMPILE=1 build: see the README's "A compiled build".
COMPILED: Final = "tunnel2.frames" in compiled_modules()

_FAST: Final = settings(max_examples=200, deadline=None)

# Frame type codes, as PROTOCOL.md §2 lists them.
TYPE_CODES: Final[dict[type[Any], int]] = {
    frames.Hello: 0x01,
    frames.Welcome: 0x02,
    frames.Refuse: 0x03,
    frames.Open: 0x10,
    frames.Data: 0x11,
    frames.End: 0x12,
    frames.Reset: 0x13,
    frames.Window: 0x14,
    frames.Ping: 0x20,
    frames.Pong: 0x21,
    frames.GoAway: 0x22,
}
ALL_FRAME_TYPES: Final = typing.get_args(frames.Frame)
CONNECTION_TYPES: Final = (0x01, 0x02, 0x03, 0x20, 0x21, 0x22)
STREAM_TYPES: Final = (0x10, 0x11, 0x12, 0x13)
ERROR_CODES: Final = frozenset(
    value for name, value in vars(ErrorCode).items() if name.isupper() and isinstance(value, int)
)

REQUEST_HEAD: Final = (
    b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
)
RESPONSE_HEAD: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"

SAMPLES: Final[list[frames.Frame]] = [
    frames.Hello(),
    frames.Hello(
        token="s3cret",
        session_id="my-app_1",
        resume_key="rk",
        max_frame_size=16384,
        capabilities=("upgrade", "h2"),
    ),
    frames.Hello(access={}),
    frames.Hello(
        access={"salt": "c2FsdHNhbHQ=", "bearer_sha256": "x", "allow_cidrs": ["10.0.0.0/8"]}
    ),
    frames.Welcome(session_id="ab12", public_urls=("http://ab12.example.com/",)),
    frames.Welcome(
        session_id="A" * 64,
        public_urls=("https://x.example.com/", "https://example.com/session/x/"),
        resume_key="k3y",
        max_frame_size=1024,
        initial_window=1,
        connection_window=2**31 - 1,
        ping_interval=0.5,
    ),
    frames.Refuse(ErrorCode.UNAUTHORIZED, "bad token"),
    frames.Refuse(ErrorCode.UNSUPPORTED_VERSION),
    frames.Open(1, REQUEST_HEAD),
    frames.Open(2**32 - 1, RESPONSE_HEAD),
    frames.Data(1, b"hello"),
    frames.Data(3, bytes(range(256)) * 8),
    frames.End(1),
    frames.Reset(5, ErrorCode.CANCEL, "client went away \N{SNOWMAN}"),
    frames.Reset(7, ErrorCode.BACKEND_UNAVAILABLE),
    frames.Window(0, 65536),
    frames.Window(9, 2**31 - 1),
    frames.Ping(b"\x00\x01\x02\x03\x04\x05\x06\x07"),
    frames.Pong(b"\xff" * 8),
    frames.GoAway(0),
    frames.GoAway(2**32 - 1, ErrorCode.PROTOCOL_ERROR, "frame length 70000 exceeds max 65536"),
]

# A frame to follow each sample (the "trailing bytes" of h11's tr()).
NEXT_FRAME: Final = frames.Data(11, b"next frame")
NEXT_WIRE: Final = frames.encode(NEXT_FRAME)


def _sample_id(frame: frames.Frame) -> str:
    return type(frame).__name__


def header(length: int, ftype: int, flags: int = 0, stream_id: int = 0) -> bytes:
    """A raw frame header (PROTOCOL.md §2)."""
    return struct.pack("!IBBI", length, ftype, flags, stream_id)


def raw(ftype: int, payload: bytes = b"", *, stream_id: int = 0, flags: int = 0) -> bytes:
    """A raw frame, valid or not."""
    return header(len(payload), ftype, flags, stream_id) + payload


def drain(decoder: frames.FrameDecoder) -> list[frames.Frame]:
    """Every complete frame the decoder holds."""
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def decode_all(data: bytes, *, max_frame_size: int = frames.DEFAULT_MAX_FRAME_SIZE) -> list[Any]:
    decoder = frames.FrameDecoder(max_frame_size=max_frame_size)
    decoder.receive_data(data)
    return drain(decoder)


def decode_error(data: bytes, *, eof: bool = False, **kwargs: int) -> RemoteProtocolError:
    """Feed ``data`` (then EOF if asked) and return the error the decoder raised."""
    decoder = frames.FrameDecoder(**kwargs)
    decoder.receive_data(data)
    if eof:
        decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        drain(decoder)
    return info.value


def feed_bytewise(decoder: frames.FrameDecoder, wire: bytes) -> list[frames.Frame]:
    """Feed ``wire`` one byte at a time, collecting frames as they complete."""
    got = []
    for byte in wire:
        decoder.receive_data(bytes([byte]))
        got.extend(drain(decoder))
    return got


def at_eof(decoder: frames.FrameDecoder) -> bool:
    # A function, so mypy does not narrow the property across calls that change it.
    return decoder.at_eof


def tr(frame: frames.Frame) -> None:
    """Decode ``frame``'s encoding whole, one byte at a time, and with trailing bytes."""
    wire = frames.encode(frame)

    decoder = frames.FrameDecoder()
    decoder.receive_data(wire)
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered == 0

    decoder = frames.FrameDecoder()
    for byte in wire:
        assert decoder.next_frame() is None
        decoder.receive_data(bytes([byte]))
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered == 0

    for cut in (1, frames.HEADER_SIZE - 1, frames.HEADER_SIZE, len(NEXT_WIRE) - 1):
        decoder = frames.FrameDecoder()
        decoder.receive_data(wire + NEXT_WIRE[:cut])
        assert decoder.next_frame() == frame
        assert decoder.next_frame() is None
        assert decoder.buffered == cut
        decoder.receive_data(NEXT_WIRE[cut:])
        assert decoder.next_frame() == NEXT_FRAME
        assert decoder.buffered == 0


Side = Literal["agent", "relay"]


@attrs.define
class FramePair:
    """Both ends of one connection: what one side encodes the other decodes (h11's
    ConnectionPair). ``send`` checks every frame arrives intact and nothing is left over."""

    decoders: dict[Side, frames.FrameDecoder] = attrs.Factory(
        lambda: {"agent": frames.FrameDecoder(), "relay": frames.FrameDecoder()}
    )

    def receiver(self, sender: Side) -> frames.FrameDecoder:
        return self.decoders["relay" if sender == "agent" else "agent"]

    def send(self, sender: Side, *batch: frames.Frame, chunk: int = 0) -> list[frames.Frame]:
        """Encode ``batch`` as one write and feed it to the peer, in ``chunk``-byte pieces."""
        decoder = self.receiver(sender)
        wire = b"".join(frames.encode(frame) for frame in batch)
        step = chunk or len(wire)
        got: list[frames.Frame] = []
        for start in range(0, len(wire), step):
            decoder.receive_data(wire[start : start + step])
            got.extend(drain(decoder))
        assert got == list(batch)
        assert decoder.buffered == 0
        return got

    def handshake(self, hello: frames.Hello, welcome: frames.Welcome) -> int:
        """Exchange HELLO and WELCOME and apply the negotiated limit (PROTOCOL.md §3)."""
        self.send("agent", hello)
        self.send("relay", welcome)
        negotiated = min(hello.max_frame_size, welcome.max_frame_size)
        for decoder in self.decoders.values():
            decoder.max_frame_size = negotiated
        return negotiated


# --- round trips ---------------------------------------------------------------------------


def test_samples_cover_every_frame_type() -> None:
    assert {type(frame) for frame in SAMPLES} == set(ALL_FRAME_TYPES) == set(TYPE_CODES)


@pytest.mark.parametrize("frame", SAMPLES, ids=_sample_id)
def test_round_trip(frame: frames.Frame) -> None:
    tr(frame)


@pytest.mark.parametrize("frame", SAMPLES, ids=_sample_id)
def test_header_layout(frame: frames.Frame) -> None:
    wire = frames.encode(frame)
    length, ftype, flags, stream_id = struct.unpack_from("!IBBI", wire)
    assert length == len(wire) - frames.HEADER_SIZE
    assert ftype == TYPE_CODES[type(frame)]
    assert flags == 0
    assert stream_id == frame.stream_id


def test_worked_example_from_protocol_md() -> None:
    # PROTOCOL.md §2: DATA carrying b"hello" on stream 1.
    wire = bytes.fromhex("00000005 11 00 00000001 68656c6c6f")
    assert frames.encode(frames.Data(1, b"hello")) == wire
    assert decode_all(wire) == [frames.Data(1, b"hello")]


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (frames.End(3), "00000000 12 00 00000003"),
        (frames.Open(1, b"\r\n\r\n"), "00000004 10 00 00000001 0d0a0d0a"),
        (frames.Reset(5, ErrorCode.CANCEL, "x"), "00000003 13 00 00000005 0006 78"),
        (frames.Window(0, 0x10000), "00000004 14 00 00000000 00010000"),
        (frames.Ping(b"ABCDEFGH"), "00000008 20 00 00000000 4142434445464748"),
        (frames.Pong(b"ABCDEFGH"), "00000008 21 00 00000000 4142434445464748"),
        (frames.GoAway(7, ErrorCode.NO_ERROR), "00000006 22 00 00000000 00000007 0000"),
        (frames.Refuse(ErrorCode.UNAUTHORIZED, "no"), "00000004 03 00 00000000 000a 6e6f"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else "",
)
def test_binary_payload_layouts(frame: frames.Frame, wire: str) -> None:
    assert frames.encode(frame) == bytes.fromhex(wire)


def test_hello_payload_is_version_then_json_object() -> None:
    hello = frames.Hello(token="t", session_id="s", resume_key="r", capabilities=("c",))
    payload = frames.encode(hello)[frames.HEADER_SIZE :]
    assert payload[:2] == b"\x00\x01"
    assert json.loads(payload[2:]) == {
        "token": "t",
        "session_id": "s",
        "resume_key": "r",
        "max_frame_size": 65536,
        "capabilities": ["c"],
    }


def test_welcome_payload_is_version_then_json_object() -> None:
    welcome = frames.Welcome(
        session_id="s", public_urls=("u1", "u2"), resume_key="r", capabilities=("end_stream",)
    )
    payload = frames.encode(welcome)[frames.HEADER_SIZE :]
    assert payload[:2] == b"\x00\x01"
    assert json.loads(payload[2:]) == {
        "session_id": "s",
        "public_urls": ["u1", "u2"],
        "resume_key": "r",
        "max_frame_size": 65536,
        "initial_window": 262144,
        "connection_window": 4194304,
        "ping_interval": 15.0,
        "capabilities": ["end_stream"],
    }
    assert welcome.public_url == "u1"


def test_decoder_ignores_unknown_json_fields_and_accepts_absent_optionals() -> None:
    fields = {"max_frame_size": 2048, "capabilities": [], "future": {"x": 1}}
    payload = b"\x00\x01" + json.dumps(fields).encode()
    assert decode_all(raw(0x01, payload)) == [frames.Hello(max_frame_size=2048)]


def test_welcome_integer_ping_interval_decodes_as_float() -> None:
    fields = {
        "session_id": "s",
        "public_urls": ["u"],
        "resume_key": "",
        "max_frame_size": 1024,
        "initial_window": 1,
        "connection_window": 1,
        "ping_interval": 20,
    }
    (welcome,) = decode_all(raw(0x02, b"\x00\x01" + json.dumps(fields).encode()))
    assert isinstance(welcome.ping_interval, float)
    assert welcome.ping_interval == 20.0


def test_several_frames_in_one_receive_data() -> None:
    wire = b"".join(frames.encode(frame) for frame in SAMPLES)
    assert decode_all(wire) == SAMPLES


def test_several_frames_split_across_receive_data_calls() -> None:
    wire = b"".join(frames.encode(frame) for frame in SAMPLES)
    for step in (1, 7, frames.HEADER_SIZE, 1000):
        decoder = frames.FrameDecoder()
        got: list[frames.Frame] = []
        for start in range(0, len(wire), step):
            decoder.receive_data(wire[start : start + step])
            got.extend(drain(decoder))
        assert got == SAMPLES, step


@pytest.mark.parametrize("kind", [bytes, bytearray])  # the declared types (mypyc checks them)
def test_any_buffer_is_taken_and_the_payloads_are_bytes_of_their_own(kind: type) -> None:
    wire = frames.encode(frames.Data(1, b"hello")) + frames.encode(frames.End(1))
    source = bytearray(wire)
    decoder = frames.FrameDecoder()
    decoder.receive_data(kind(source))
    source[:] = b"\x00" * len(source)  # the caller reuses its buffer
    items = decoder.next_items()
    assert items == [(frames.TYPE_DATA, 1, b"hello"), (frames.TYPE_END, 1, b"")]
    assert all(type(item[2]) is bytes for item in items if isinstance(item, tuple))


def test_a_frame_trickled_in_is_gathered_in_one_growing_buffer() -> None:
    # A receive that ends inside a frame is kept until the rest comes. The rest is appended
    # to one bytearray (amortised), never copied again per receive: a peer sending a frame
    # a byte at a time costs linear work, not a frame's worth per byte. (White-box: the
    # buffer's identity is the property.)
    frame = frames.Data(1, b"x" * 5000)
    wire = frames.encode(frame)
    decoder = frames.FrameDecoder()
    decoder.receive_data(wire[:1])
    assert decoder.next_items() == []
    decoder.receive_data(wire[1:2])
    gathering = decoder._buffer
    assert isinstance(gathering, bytearray)
    for index in range(2, len(wire) - 1):
        decoder.receive_data(wire[index : index + 1])
        assert decoder.next_items() == []
        assert decoder._buffer is gathering
    decoder.receive_data(wire[-1:])
    assert decoder.next_frame() == frame
    assert decoder.buffered == 0
    decoder.receive_data(NEXT_WIRE)  # gathering is over: the next receive is kept as it came
    assert decoder._buffer is NEXT_WIRE
    assert decoder.next_frame() is not None
    assert decoder._buffer == b""  # and let go once read: an idle decoder holds no message


def test_large_batches_survive_buffer_compaction() -> None:
    # Over 64 KiB of frames plus a partial one, then the rest: the unread tail must survive
    # whatever the decoder does to drop consumed bytes.
    batch = [frames.Data(2 * i + 1, bytes([i % 256]) * 1000) for i in range(100)]
    wire = b"".join(frames.encode(frame) for frame in batch)
    decoder = frames.FrameDecoder()
    decoder.receive_data(wire + NEXT_WIRE[:5])
    assert drain(decoder) == batch
    assert decoder.buffered == 5
    decoder.receive_data(NEXT_WIRE[5:] + wire)
    assert drain(decoder) == [NEXT_FRAME, *batch]
    assert decoder.buffered == 0


def test_frame_pair_exchange() -> None:
    pair = FramePair()
    negotiated = pair.handshake(
        frames.Hello(token="t", max_frame_size=4096),
        frames.Welcome(session_id="ab", public_urls=("http://ab.example/",), resume_key="k"),
    )
    assert negotiated == 4096
    pair.send("relay", frames.Open(1, REQUEST_HEAD), frames.End(1))
    pair.send("agent", frames.Open(1, RESPONSE_HEAD), frames.Data(1, b"hello"), frames.End(1))
    pair.send("relay", frames.Window(1, 5), frames.Window(0, 5), chunk=3)
    pair.send("agent", frames.Ping(b"12345678"))
    pair.send("relay", frames.Pong(b"12345678"))
    pair.send("relay", frames.Open(3, REQUEST_HEAD), frames.Reset(3, ErrorCode.CANCEL), chunk=1)
    pair.send("agent", frames.GoAway(3), frames.Data(3, b"x" * 4096))
    # The negotiated limit now holds in both directions.
    for sender in ("agent", "relay"):
        with pytest.raises(RemoteProtocolError) as info:
            pair.send(sender, frames.Data(5, b"x" * 4097))
        assert info.value.code == ErrorCode.FRAME_SIZE_ERROR


# --- hypothesis ----------------------------------------------------------------------------

stream_ids = st.integers(1, frames.MAX_STREAM_ID)
codes = st.integers(0, 0xFFFF)
reasons = st.text(max_size=200)  # at most 800 UTF-8 bytes; hypothesis text has no surrogates
session_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=64,
)
short_text = st.text(max_size=40)
windows = st.integers(1, frames.MAX_WINDOW)
opaque = st.binary(min_size=8, max_size=8)

hellos = st.builds(
    frames.Hello,
    token=st.none() | short_text,
    session_id=st.none() | session_ids,
    resume_key=st.none() | short_text,
    max_frame_size=st.integers(frames.MIN_MAX_FRAME_SIZE, 2**32 - 1),
    capabilities=st.lists(short_text, max_size=4).map(tuple),
    access=st.none() | st.dictionaries(short_text, short_text | st.lists(short_text), max_size=3),
)
welcomes = st.builds(
    frames.Welcome,
    session_id=session_ids,
    public_urls=st.lists(short_text, min_size=1, max_size=3).map(tuple),
    resume_key=short_text,
    max_frame_size=st.integers(frames.MIN_MAX_FRAME_SIZE, 2**32 - 1),
    initial_window=windows,
    connection_window=windows,
    ping_interval=st.floats(0, 3600) | st.integers(0, 3600).map(float),
)
any_frame: st.SearchStrategy[frames.Frame] = st.one_of(
    hellos,
    welcomes,
    st.builds(frames.Refuse, codes, reasons),
    st.builds(frames.Open, stream_ids, st.binary(max_size=300).map(lambda b: b + b"\r\n\r\n")),
    st.builds(frames.Data, stream_ids, st.binary(min_size=1, max_size=2000)),
    st.builds(frames.End, stream_ids),
    st.builds(frames.Reset, stream_ids, codes, reasons),
    st.builds(frames.Window, st.integers(0, frames.MAX_STREAM_ID), windows),
    st.builds(frames.Ping, opaque),
    st.builds(frames.Pong, opaque),
    st.builds(frames.GoAway, st.integers(0, frames.MAX_STREAM_ID), codes, reasons),
)


def _split(data: st.DataObject, wire: bytes) -> list[bytes]:
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6).map(sorted))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


@_FAST
@given(any_frame)
def test_hypothesis_single_frame_round_trip(frame: frames.Frame) -> None:
    assert decode_all(frames.encode(frame)) == [frame]


@_FAST
@given(st.lists(any_frame, min_size=1, max_size=8), st.data())
def test_hypothesis_batch_round_trip_any_split(
    batch: list[frames.Frame], data: st.DataObject
) -> None:
    wire = b"".join(frames.encode(frame) for frame in batch)
    decoder = frames.FrameDecoder()
    got: list[frames.Frame] = []
    for piece in _split(data, wire):
        if piece:  # b"" would mean EOF
            decoder.receive_data(piece)
        got.extend(drain(decoder))
    assert got == batch
    decoder.receive_data(b"")
    assert decoder.next_frame() is None
    assert decoder.at_eof


def _decode_garbage(decoder: frames.FrameDecoder, pieces: list[bytes]) -> list[frames.Frame]:
    """Feed ``pieces`` then EOF; only RemoteProtocolError may escape, with a known code."""
    got: list[frames.Frame] = []
    error: RemoteProtocolError | None = None
    try:
        for piece in [*pieces, b""]:  # b"" = EOF
            decoder.receive_data(piece)
            while (frame := decoder.next_frame()) is not None:
                got.append(frame)
    except RemoteProtocolError as exc:
        error = exc
    if error is None:
        assert decoder.at_eof
    else:
        assert error.code in ERROR_CODES
        assert str(error)
        # And it stays failed.
        with pytest.raises(RemoteProtocolError) as again:
            decoder.next_frame()
        assert again.value is error
    assert all(isinstance(frame, ALL_FRAME_TYPES) for frame in got)
    return got


@_FAST
@given(st.binary(max_size=500), st.data())
def test_hypothesis_random_bytes_raise_only_protocol_errors(
    blob: bytes, data: st.DataObject
) -> None:
    _decode_garbage(frames.FrameDecoder(), [piece for piece in _split(data, blob) if piece])


@_FAST
@given(st.lists(any_frame, max_size=4), st.binary(min_size=1, max_size=300))
def test_hypothesis_garbage_after_valid_frames(batch: list[frames.Frame], blob: bytes) -> None:
    prefix = b"".join(frames.encode(frame) for frame in batch)
    got = _decode_garbage(frames.FrameDecoder(), [prefix + blob])
    # Every frame before the garbage comes out, in order, before anything goes wrong.
    assert got[: len(batch)] == batch


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | short_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=8,
)
_JSON_KEYS: Final = (
    "token",
    "session_id",
    "resume_key",
    "max_frame_size",
    "capabilities",
    "access",
    "public_urls",
    "initial_window",
    "connection_window",
    "ping_interval",
)
json_payloads = st.builds(
    lambda version, fields: struct.pack("!H", version) + json.dumps(fields).encode(),
    st.sampled_from([1, 1, 1, 0, 2]),
    st.fixed_dictionaries({}, optional=dict.fromkeys(_JSON_KEYS, json_values)),
)
# Frames with a plausible header and a random payload, to reach every payload parser.
plausible_frames = st.builds(
    lambda ftype, flags, sid, payload: raw(ftype, payload, stream_id=sid, flags=flags),
    st.sampled_from([*TYPE_CODES.values(), 0x00, 0x15, 0x23, 0xFF]),
    st.sampled_from([0, 0, 0, 0, 1, 0x80]),
    st.sampled_from([0, 0, 1, 2, 3, frames.MAX_STREAM_ID]),
    st.binary(max_size=40) | json_payloads,
)


@_FAST
@given(st.lists(plausible_frames, min_size=1, max_size=6))
def test_hypothesis_plausible_frames_raise_only_protocol_errors(batch: list[bytes]) -> None:
    got = _decode_garbage(frames.FrameDecoder(), batch)
    for frame, wire in zip(got, batch, strict=False):
        # Binary frames have one encoding: whatever decodes re-encodes to the same bytes.
        if not isinstance(frame, frames.Hello | frames.Welcome):
            assert frames.encode(frame) == wire


# --- malformed input -----------------------------------------------------------------------


def test_oversized_frame_is_rejected_from_its_header_alone() -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(header(65537, 0x11, 0, 1))  # no payload at all
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR
    assert "65537" in str(info.value)
    assert "65536" in str(info.value)


def test_oversized_frame_respects_a_custom_limit() -> None:
    exc = decode_error(header(2001, 0x11, 0, 1), max_frame_size=2000)
    assert exc.code == ErrorCode.FRAME_SIZE_ERROR
    assert "2001" in str(exc)
    assert "2000" in str(exc)
    assert decode_all(raw(0x11, b"x" * 2000, stream_id=1), max_frame_size=2000) == [
        frames.Data(1, b"x" * 2000)
    ]


def test_header_at_exactly_the_limit_waits_for_payload() -> None:
    decoder = frames.FrameDecoder(max_frame_size=1024)
    decoder.receive_data(header(1024, 0x11, 0, 1))
    assert decoder.next_frame() is None
    decoder.receive_data(b"y" * 1024)
    assert decoder.next_frame() == frames.Data(1, b"y" * 1024)


def _json_frame(ftype: int, fields: object, version: int = 1) -> bytes:
    return raw(ftype, struct.pack("!H", version) + json.dumps(fields).encode())


_HELLO_FIELDS: Final[dict[str, object]] = {
    "token": None,
    "session_id": None,
    "resume_key": None,
    "max_frame_size": 65536,
    "capabilities": [],
}
_WELCOME_FIELDS: Final[dict[str, object]] = {
    "session_id": "s",
    "public_urls": ["http://s.example/"],
    "resume_key": "",
    "max_frame_size": 65536,
    "initial_window": 262144,
    "connection_window": 4194304,
    "ping_interval": 15.0,
}


def hello_with(**fields: object) -> bytes:
    return _json_frame(0x01, {**_HELLO_FIELDS, **fields})


def welcome_with(**fields: object) -> bytes:
    return _json_frame(0x02, {**_WELCOME_FIELDS, **fields})


def test_json_field_helpers_build_valid_frames() -> None:
    # The malformed cases below are these frames with one thing wrong.
    assert decode_all(hello_with()) == [frames.Hello()]
    assert decode_all(welcome_with()) == [frames.Welcome("s", ("http://s.example/",))]


PE, FC, FS, UV = (
    ErrorCode.PROTOCOL_ERROR,
    ErrorCode.FLOW_CONTROL_ERROR,
    ErrorCode.FRAME_SIZE_ERROR,
    ErrorCode.UNSUPPORTED_VERSION,
)

MALFORMED: Final[list[tuple[str, bytes, int, str]]] = [
    ("unknown-type", raw(0x7F), PE, "unknown frame type 0x7f"),
    ("type-zero", raw(0x00), PE, "unknown frame type 0x00"),
    ("flags-on-data", raw(0x11, b"x", stream_id=1, flags=0x01), PE, "unknown flags 0x01"),
    ("flags-on-ping", raw(0x20, b"12345678", flags=0x80), PE, "unknown flags 0x80"),
    *[
        (f"type-{t:#04x}-on-stream-3", raw(t, b"\x00" * 8, stream_id=3), PE, "on stream 3")
        for t in CONNECTION_TYPES
    ],
    ("open-on-stream-0", raw(0x10, b"\r\n\r\n"), PE, "stream id 0"),
    ("data-on-stream-0", raw(0x11, b"x"), PE, "stream id 0"),
    ("end-on-stream-0", raw(0x12), PE, "stream id 0"),
    ("reset-on-stream-0", raw(0x13, b"\x00\x01"), PE, "stream id 0"),
    ("end-with-payload", raw(0x12, b"x", stream_id=1), PE, "END frame with a 1-byte payload"),
    ("window-3-bytes", raw(0x14, b"\x00\x00\x01", stream_id=1), PE, "WINDOW payload is 3"),
    ("window-5-bytes", raw(0x14, b"\x00" * 4 + b"\x01"), PE, "WINDOW payload is 5"),
    ("window-zero", raw(0x14, b"\x00" * 4, stream_id=1), FC, "increment 0"),
    ("window-zero-conn", raw(0x14, b"\x00" * 4), FC, "increment 0"),
    ("window-over-max", raw(0x14, b"\x80\x00\x00\x00"), FC, "increment 2147483648"),
    ("ping-7-bytes", raw(0x20, b"1234567"), PE, "PING payload is 7 bytes, expected 8"),
    ("ping-9-bytes", raw(0x20, b"123456789"), PE, "PING payload is 9 bytes"),
    ("pong-empty", raw(0x21), PE, "PONG payload is 0 bytes"),
    ("reset-short", raw(0x13, b"\x00", stream_id=1), PE, "RESET payload is 1 bytes"),
    ("reset-bad-utf8", raw(0x13, b"\x00\x01\xff", stream_id=1), PE, "not valid UTF-8"),
    ("reset-long-reason", raw(0x13, b"\x00\x01" + b"r" * 1025, stream_id=1), PE, "1024"),
    ("refuse-short", raw(0x03), PE, "REFUSE payload is 0 bytes"),
    ("refuse-bad-utf8", raw(0x03, b"\x00\x0a\xc3\x28"), PE, "not valid UTF-8"),
    ("goaway-short", raw(0x22, b"\x00" * 5), PE, "GOAWAY payload is 5 bytes"),
    ("goaway-bad-utf8", raw(0x22, b"\x00" * 6 + b"\xed\xa0\x80"), PE, "not valid UTF-8"),
    ("open-no-crlfcrlf", raw(0x10, b"GET / HTTP/1.1\r\n", stream_id=1), PE, "CRLF CRLF"),
    ("open-empty", raw(0x10, stream_id=1), PE, "CRLF CRLF"),
    ("data-empty", raw(0x11, stream_id=1), PE, "empty payload"),
    ("hello-version-2", _json_frame(0x01, _HELLO_FIELDS, version=2), UV, "version 2"),
    ("hello-version-0", _json_frame(0x01, _HELLO_FIELDS, version=0), UV, "version 0"),
    ("welcome-version-2", _json_frame(0x02, _WELCOME_FIELDS, version=2), UV, "version 2"),
    ("hello-no-version", raw(0x01, b"\x00"), PE, "too short for a version"),
    ("welcome-empty", raw(0x02), PE, "too short for a version"),
    ("hello-bad-json", raw(0x01, b"\x00\x01{"), PE, "not valid JSON"),
    ("welcome-bad-json", raw(0x02, b"\x00\x01{'a': 1}"), PE, "not valid JSON"),
    ("hello-bad-utf8", raw(0x01, b'\x00\x01{"token": "\xff"}'), PE, "not valid UTF-8"),
    ("hello-json-list", _json_frame(0x01, []), PE, "not a JSON object"),
    ("welcome-json-string", _json_frame(0x02, "x"), PE, "not a JSON object"),
    ("hello-mfs-string", hello_with(max_frame_size="65536"), PE, "'max_frame_size'"),
    ("hello-mfs-bool", hello_with(max_frame_size=True), PE, "'max_frame_size'"),
    ("hello-mfs-float", hello_with(max_frame_size=65536.0), PE, "'max_frame_size'"),
    ("hello-mfs-missing", _json_frame(0x01, {"capabilities": []}), PE, "'max_frame_size'"),
    ("hello-mfs-too-small", hello_with(max_frame_size=1023), PE, "below 1024"),
    ("hello-token-int", hello_with(token=5), PE, "'token'"),
    ("hello-resume-key-bool", hello_with(resume_key=False), PE, "'resume_key'"),
    ("hello-caps-string", hello_with(capabilities="upgrade"), PE, "'capabilities'"),
    ("hello-caps-ints", hello_with(capabilities=[1]), PE, "'capabilities'"),
    ("hello-session-space", hello_with(session_id="a b"), PE, "session id 'a b'"),
    ("hello-session-empty", hello_with(session_id=""), PE, "session id ''"),
    ("hello-session-65", hello_with(session_id="a" * 65), PE, "is not 1-64"),
    ("hello-session-int", hello_with(session_id=7), PE, "'session_id'"),
    ("hello-access-list", hello_with(access=["basic"]), PE, "'access'"),
    ("hello-access-string", hello_with(access="basic"), PE, "'access'"),
    ("hello-access-nan", hello_with(access={"x": math.nan}), PE, "access policy is not valid"),
    ("welcome-session-bad", welcome_with(session_id="ab/cd"), PE, "session id 'ab/cd'"),
    ("welcome-session-null", welcome_with(session_id=None), PE, "'session_id'"),
    ("welcome-iw-bool", welcome_with(initial_window=True), PE, "'initial_window'"),
    ("welcome-cw-float", welcome_with(connection_window=1.5), PE, "'connection_window'"),
    ("welcome-iw-zero", welcome_with(initial_window=0), PE, "window 0"),
    ("welcome-cw-over", welcome_with(connection_window=2**31), PE, "window 2147483648"),
    ("welcome-ping-bool", welcome_with(ping_interval=False), PE, "'ping_interval'"),
    ("welcome-ping-string", welcome_with(ping_interval="15"), PE, "'ping_interval'"),
    ("welcome-ping-negative", welcome_with(ping_interval=-1), PE, "not within 0..86400"),
    ("welcome-no-urls", welcome_with(public_urls=[]), PE, "no public URL"),
    ("welcome-urls-string", welcome_with(public_urls="u"), PE, "'public_urls'"),
    ("welcome-urls-null-item", welcome_with(public_urls=["u", None]), PE, "'public_urls'"),
    ("welcome-mfs-small", welcome_with(max_frame_size=100), PE, "below 1024"),
    ("welcome-resume-null", welcome_with(resume_key=None), PE, "'resume_key'"),
]


@pytest.mark.parametrize(
    ("wire", "code", "message"),
    [pytest.param(wire, code, message, id=name) for name, wire, code, message in MALFORMED],
)
def test_malformed_frame(wire: bytes, code: int, message: str) -> None:
    exc = decode_error(wire)
    assert exc.code == code, ErrorCode.name_of(exc.code)
    assert message in str(exc)
    # The same bytes arriving one at a time fail the same way.
    with pytest.raises(RemoteProtocolError) as info:
        feed_bytewise(frames.FrameDecoder(), wire)
    assert info.value.code == code


@pytest.mark.parametrize("frame", SAMPLES, ids=_sample_id)
def test_eof_inside_a_frame_is_an_error(frame: frames.Frame) -> None:
    wire = frames.encode(frame)
    for cut in sorted({1, frames.HEADER_SIZE - 1, frames.HEADER_SIZE, len(wire) - 1}):
        if cut >= len(wire):
            continue
        decoder = frames.FrameDecoder()
        decoder.receive_data(wire[:cut])
        assert decoder.next_frame() is None
        decoder.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as info:
            decoder.next_frame()
        assert info.value.code == ErrorCode.PROTOCOL_ERROR
        assert "closed mid-frame" in str(info.value)
        assert f"{cut} bytes buffered" in str(info.value)


def test_eof_between_frames_is_clean() -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(frames.encode(frames.End(1)))
    assert not at_eof(decoder)
    decoder.receive_data(b"")
    assert not at_eof(decoder)  # the END is still unread
    assert decoder.next_frame() == frames.End(1)
    assert at_eof(decoder)
    assert decoder.next_frame() is None
    assert decoder.next_frame() is None


def test_data_after_eof_is_a_runtime_error() -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError, match="after EOF"):
        decoder.receive_data(frames.encode(frames.End(1)))
    decoder.receive_data(b"")  # a second EOF is harmless
    assert decoder.next_frame() is None


def test_decoder_stays_failed() -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(frames.encode(frames.End(1)) + raw(0x7F) + frames.encode(frames.End(3)))
    assert decoder.next_frame() == frames.End(1)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    error = info.value
    for call in (
        decoder.next_frame,
        lambda: decoder.receive_data(frames.encode(frames.End(5))),
        lambda: decoder.receive_data(b""),
        decoder.next_frame,
    ):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value is error
    assert "ERROR" in repr(decoder)


def test_remote_errors_keep_code_and_status_hint() -> None:
    exc = decode_error(raw(0x14, b"\x00" * 4))
    assert type(exc) is RemoteProtocolError
    assert isinstance(exc, ProtocolError)
    assert isinstance(exc.__cause__, LocalProtocolError)
    assert exc.code == exc.__cause__.code == ErrorCode.FLOW_CONTROL_ERROR
    assert exc.status_hint == exc.__cause__.status_hint


# --- max_frame_size on a live decoder --------------------------------------------------------


def test_max_frame_size_can_be_lowered_after_construction() -> None:
    decoder = frames.FrameDecoder()
    big = frames.Data(1, b"z" * 2000)
    decoder.receive_data(frames.encode(big))
    assert decoder.next_frame() == big
    decoder.max_frame_size = 1024
    decoder.receive_data(frames.encode(frames.Data(3, b"z" * 1024)) + header(2000, 0x11, 0, 5))
    assert decoder.next_frame() == frames.Data(3, b"z" * 1024)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR
    assert "2000" in str(info.value)
    assert "1024" in str(info.value)


def test_max_frame_size_can_be_raised_after_construction() -> None:
    decoder = frames.FrameDecoder(max_frame_size=1024)
    huge = frames.Data(1, b"h" * 100_000)
    decoder.max_frame_size = 100_000
    decoder.receive_data(frames.encode(huge))
    assert decoder.next_frame() == huge


def test_decoder_repr_and_buffered() -> None:
    decoder = frames.FrameDecoder()
    assert decoder.buffered == 0
    decoder.receive_data(NEXT_WIRE[:4])
    assert decoder.buffered == 4
    assert repr(decoder) == "<FrameDecoder buffered=4 OPEN>"
    decoder.receive_data(NEXT_WIRE[4:])
    assert decoder.next_frame() == NEXT_FRAME
    decoder.receive_data(b"")
    assert repr(decoder) == "<FrameDecoder buffered=0 EOF>"


# --- constructors --------------------------------------------------------------------------

INVALID: Final[list[tuple[str, Callable[[], object], int]]] = [
    ("data-stream-0", lambda: frames.Data(0, b"x"), PE),
    ("data-stream-too-big", lambda: frames.Data(2**32, b"x"), PE),
    ("data-empty", lambda: frames.Data(1, b""), PE),
    ("open-stream-0", lambda: frames.Open(0, b"\r\n\r\n"), PE),
    ("open-no-crlfcrlf", lambda: frames.Open(1, b"GET / HTTP/1.1\r\n"), PE),
    ("end-stream-negative", lambda: frames.End(-1), PE),
    ("reset-stream-0", lambda: frames.Reset(0, ErrorCode.CANCEL), PE),
    ("reset-code-negative", lambda: frames.Reset(1, -1), PE),
    ("reset-code-too-big", lambda: frames.Reset(1, 0x10000), PE),
    ("reset-long-reason", lambda: frames.Reset(1, 0, "\N{SNOWMAN}" * 342), PE),
    ("window-zero", lambda: frames.Window(1, 0), FC),
    ("window-over-max", lambda: frames.Window(0, 2**31), FC),
    ("window-stream-negative", lambda: frames.Window(-1, 1), PE),
    ("window-stream-too-big", lambda: frames.Window(2**32, 1), PE),
    ("ping-7", lambda: frames.Ping(b"1234567"), PE),
    ("pong-9", lambda: frames.Pong(b"123456789"), PE),
    ("goaway-negative", lambda: frames.GoAway(-1), PE),
    ("goaway-too-big", lambda: frames.GoAway(2**32), PE),
    ("goaway-code", lambda: frames.GoAway(0, 0x10000), PE),
    ("goaway-long-reason", lambda: frames.GoAway(0, 0, "r" * 1025), PE),
    ("refuse-code", lambda: frames.Refuse(-5), PE),
    ("refuse-long-reason", lambda: frames.Refuse(1, "r" * 1025), PE),
    ("hello-version", lambda: frames.Hello(version=0x10000), PE),
    ("hello-mfs", lambda: frames.Hello(max_frame_size=1023), PE),
    ("hello-session", lambda: frames.Hello(session_id="no spaces"), PE),
    ("hello-session-empty", lambda: frames.Hello(session_id=""), PE),
    ("hello-access-nan", lambda: frames.Hello(access={"x": math.inf}), PE),
    ("hello-access-bytes", lambda: frames.Hello(access={"x": b"1"}), PE),
    ("welcome-session", lambda: frames.Welcome("x" * 65, ("u",)), PE),
    ("welcome-mfs", lambda: frames.Welcome("s", ("u",), max_frame_size=512), PE),
    ("welcome-iw", lambda: frames.Welcome("s", ("u",), initial_window=0), PE),
    ("welcome-cw", lambda: frames.Welcome("s", ("u",), connection_window=2**31), PE),
    ("welcome-ping", lambda: frames.Welcome("s", ("u",), ping_interval=-0.5), PE),
]


@pytest.mark.parametrize(
    ("build", "code"), [pytest.param(build, code, id=name) for name, build, code in INVALID]
)
def test_constructor_rejects_invalid_frame(build: Callable[[], object], code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        build()
    assert type(info.value) is LocalProtocolError
    assert info.value.code == code


def test_constructor_limits_are_inclusive() -> None:
    # The edges of every range above are legal and round-trip.
    for frame in (
        frames.Reset(frames.MAX_STREAM_ID, 0xFFFF, "r" * 1024),
        frames.Window(frames.MAX_STREAM_ID, frames.MAX_WINDOW),
        frames.GoAway(frames.MAX_STREAM_ID, 0xFFFF, "\N{SNOWMAN}" * 341),
        frames.Hello(max_frame_size=frames.MIN_MAX_FRAME_SIZE, session_id="x" * 64),
        frames.Welcome("s", ("u",), initial_window=1, ping_interval=0),
    ):
        tr(frame)


def test_frames_are_frozen() -> None:
    frame = frames.Data(1, b"x")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        frame.stream_id = 3  # type: ignore[misc]
    assert hash(frame) == hash(frames.Data(1, b"x"))


# --- known bugs in frames.py (strict: remove the marker once fixed) ---------------------------


def _welcome_json_raw(ping_interval: bytes) -> bytes:
    fields = {**_WELCOME_FIELDS}
    del fields["ping_interval"]
    body = json.dumps(fields).encode()[:-1] + b', "ping_interval": ' + ping_interval + b"}"
    return raw(0x02, b"\x00\x01" + body)


def test_deeply_nested_json_is_a_protocol_error() -> None:
    exc = decode_error(raw(0x01, b"\x00\x01" + b"[" * 60000))
    assert exc.code == ErrorCode.PROTOCOL_ERROR


def test_huge_integer_ping_interval_is_a_protocol_error() -> None:
    decode_error(_welcome_json_raw(b"1" + b"0" * 400))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"1e400"])
def test_non_finite_ping_interval_is_rejected(literal: bytes) -> None:
    decode_error(_welcome_json_raw(literal))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_welcome_constructor_rejects_non_finite_ping_interval(value: float) -> None:
    with pytest.raises(LocalProtocolError):
        frames.Welcome("s", ("u",), ping_interval=value)


def test_welcome_constructor_rejects_empty_public_urls() -> None:
    with pytest.raises(LocalProtocolError):
        frames.Welcome("s", ())


def test_welcome_constructor_rejects_out_of_range_version() -> None:
    with pytest.raises(LocalProtocolError):
        frames.Welcome("s", ("u",), version=0x10000)  # encode() raises struct.error


def test_hello_constructor_rejects_an_access_policy_that_is_not_a_dict() -> None:
    # A compiled build checks the annotation when the attribute is set: a TypeError that
    # names the type, before __attrs_post_init__ runs (a peer's HELLO is checked while
    # decoding, before any constructor: test_malformed_frame covers that).
    error, message = (
        (TypeError, "dict or None object expected")
        if COMPILED
        else (LocalProtocolError, "access policy is not a JSON object")
    )
    with pytest.raises(error, match=message):
        frames.Hello(access=[1])  # type: ignore[arg-type]


def test_welcome_constructor_rejects_bool_window() -> None:
    if COMPILED:
        # mypyc stores an int attribute as a C integer: True arrives as 1, a valid window.
        assert frames.Welcome("s", ("u",), initial_window=True).initial_window == 1
        return
    with pytest.raises(LocalProtocolError, match="must be an int, not bool"):
        frames.Welcome("s", ("u",), initial_window=True)


@pytest.mark.parametrize(
    "build",
    [
        lambda: frames.Reset(1, 1, "a\ud800"),
        lambda: frames.Refuse(1, "a\udfff"),
        lambda: frames.GoAway(0, 0, "\ud83d"),
    ],
)
def test_reason_with_lone_surrogate_is_rejected_or_round_trips(
    build: Callable[[], frames.Frame],
) -> None:
    try:
        frame = build()
    except LocalProtocolError:
        return
    assert decode_all(frames.encode(frame)) == [frame]


def test_unknown_type_on_a_stream_is_reported_as_unknown() -> None:
    exc = decode_error(raw(0x7F, stream_id=5))
    assert "unknown frame type 0x7f" in str(exc)


# --- layering ------------------------------------------------------------------------------

FRAMES_PY: Final = Path(frames.__file__).with_name("frames.py")  # also when compiled
ALLOWED_THIRD_PARTY: Final = frozenset({"attrs", "h11"})
# Standard library, but frames.py is sans-IO (STYLE.md §2): no I/O, clock, logging or threads.
FORBIDDEN_STDLIB: Final = frozenset(
    {"asyncio", "logging", "selectors", "socket", "ssl", "threading", "time", "trio"}
)


def disallowed_imports(source: str) -> list[str]:
    """The modules ``source`` imports that frames.py may not."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        names: list[str]
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only ``from .errors import ...``
                names = [f"tunnel2.{node.module}" if node.module else "tunnel2"]
                if not node.module:
                    names = [f"tunnel2.{alias.name}" for alias in node.names]
            elif node.module == "tunnel2":
                names = [f"tunnel2.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if name == "tunnel2.errors" or top in ALLOWED_THIRD_PARTY:
                continue
            if top in sys.stdlib_module_names and top not in FORBIDDEN_STDLIB:
                continue
            bad.append(name)
    return bad


def test_frames_imports_only_stdlib_attrs_h11_and_errors() -> None:
    assert disallowed_imports(FRAMES_PY.read_text(encoding="utf-8")) == []


def test_import_checker_catches_forbidden_imports() -> None:
    source = """
import json, trio
from tunnel2 import uplink, errors
from tunnel2.errors import ErrorCode
from .transports import X
from . import errors as e
import logging
import attrs.validators
def f():
    import socket
"""
    assert disallowed_imports(source) == [
        "trio",
        "tunnel2.uplink",
        "tunnel2.transports",
        "logging",
        "socket",
    ]


def test_frames_all_names_exist() -> None:
    assert sorted(frames.__all__) == sorted(set(frames.__all__))
    for name in frames.__all__:
        assert hasattr(frames, name), name


# --- the data path's shortcuts: encode_* and next_items ---------------------------------------


@pytest.mark.parametrize("frame", SAMPLES, ids=_sample_id)
def test_next_items_is_next_frame_without_the_stream_frames_objects(frame: frames.Frame) -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(frames.encode(frame))
    [item] = decoder.next_items()
    assert decoder.next_items() == []
    if isinstance(frame, frames.Open):
        assert item == (frames.TYPE_OPEN, frame.stream_id, frame.head)
    elif isinstance(frame, frames.Data):
        assert item == (frames.TYPE_DATA, frame.stream_id, frame.data)
    elif isinstance(frame, frames.End):
        assert item == (frames.TYPE_END, frame.stream_id, b"")
    else:
        assert item == frame


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (raw(0x11, b"", stream_id=1), "empty payload"),
        (raw(0x11, b"x", stream_id=0), "out of range"),
        (raw(0x12, b"x", stream_id=1), "END frame with a 1-byte payload"),
        (raw(0x12, b"", stream_id=0), "out of range"),
        (raw(0x10, b"GET / HTTP/1.1\r\n", stream_id=1), "CRLF CRLF"),
        (raw(0x10, b"GET / HTTP/1.1\r\n\r\n", stream_id=0), "out of range"),
    ],
)
def test_next_items_refuses_what_the_constructors_refuse(wire: bytes, message: str) -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.next_items()
    with pytest.raises(RemoteProtocolError, match=message):  # and stays failed
        decoder.next_frame()
    assert decoder.error is not None
    assert message in str(decoder.error)


@given(st.lists(st.sampled_from(SAMPLES), max_size=6), st.integers(1, 40))
def test_next_items_gives_what_next_frame_gives_one_by_one(
    batch: list[frames.Frame], cut: int
) -> None:
    wire = b"".join(frames.encode(frame) for frame in batch)
    one_by_one = frames.FrameDecoder()
    at_once = frames.FrameDecoder()
    expected: list[frames.Frame] = []
    got: list[frames.Frame] = []
    for start in range(0, len(wire), cut):
        one_by_one.receive_data(wire[start : start + cut])
        at_once.receive_data(wire[start : start + cut])
        while (frame := one_by_one.next_frame()) is not None:
            expected.append(frame)
        for item in at_once.next_items():
            got.append(_as_frame(item))
    assert got == expected == batch
    assert at_once.buffered == 0


def _as_frame(item: frames.StreamItem | frames.Frame) -> frames.Frame:
    if not isinstance(item, tuple):
        return item
    kind, stream_id, payload = item
    if kind == frames.TYPE_OPEN:
        return frames.Open(stream_id, payload)
    if kind == frames.TYPE_DATA:
        return frames.Data(stream_id, payload)
    return frames.End(stream_id)


_GOOD: list[frames.Frame] = [
    frames.Open(1, b"GET / HTTP/1.1\r\n\r\n"),
    frames.Data(1, b"x"),
    frames.End(1),
]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (raw(0x12, b"x", stream_id=1), "END frame with a 1-byte payload"),
        (raw(0x11, b"x", stream_id=1, flags=1), "unknown flags"),
        (raw(0x7F, b"", stream_id=0), "unknown frame type"),
        (header(70000, 0x11, 0, 1), "exceeds max"),
    ],
)
def test_next_items_gives_the_good_frames_before_a_bad_one_then_fails(
    bad: bytes, message: str
) -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(b"".join(frames.encode(frame) for frame in _GOOD) + bad)
    assert [_as_frame(item) for item in decoder.next_items()] == _GOOD
    assert decoder.error is not None
    assert message in str(decoder.error)
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.next_items()
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.receive_data(b"more")


def test_next_items_gives_the_frames_before_eof_inside_a_frame_then_fails() -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(b"".join(frames.encode(frame) for frame in _GOOD) + b"\x00\x00\x01")
    decoder.receive_data(b"")
    assert [_as_frame(item) for item in decoder.next_items()] == _GOOD
    assert decoder.error is not None
    with pytest.raises(RemoteProtocolError, match="closed mid-frame"):
        decoder.next_items()


@given(stream_id=st.integers(-1, frames.MAX_STREAM_ID + 1), payload=st.binary(max_size=40))
def test_encode_shortcuts_match_encode(stream_id: int, payload: bytes) -> None:
    """encode_open/data/end give encode()'s bytes, and refuse (with the same error) what the
    frame constructors refuse."""
    head = payload + b"\r\n\r\n" if stream_id % 2 else payload
    cases: list[tuple[Callable[[], bytes], Callable[[], frames.Frame]]] = [
        (lambda: frames.encode_open(stream_id, head), lambda: frames.Open(stream_id, head)),
        (lambda: frames.encode_data(stream_id, payload), lambda: frames.Data(stream_id, payload)),
        (lambda: frames.encode_end(stream_id), lambda: frames.End(stream_id)),
    ]
    for shortcut, build in cases:
        try:
            frame = build()
        except LocalProtocolError as exc:
            with pytest.raises(LocalProtocolError, match=str(exc)):
                shortcut()
        else:
            assert shortcut() == frames.encode(frame)
