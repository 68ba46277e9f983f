"""Bounded CI run of fuzz target 1, the frame decoder (fuzz/decoder.py has the invariants)."""

from __future__ import annotations

from hypothesis import given, settings

from fuzz import decoder
from fuzz._campaign import CI


@settings(CI, max_examples=300)
@given(decoder.stream_cases())
def test_fuzz_decoder_random_and_mutated_streams(case: decoder.StreamCase) -> None:
    decoder.check_stream(case)


@settings(CI, max_examples=200)
@given(decoder.round_trip_cases)
def test_fuzz_decoder_round_trip_any_split(case: decoder.StreamCase) -> None:
    decoder.check_round_trip(case)


@settings(CI, max_examples=300)
@given(decoder.oversized_headers)
def test_fuzz_decoder_refuses_oversized_header_at_once(header: tuple[int, int, int, int]) -> None:
    decoder.check_oversized_header(header)
