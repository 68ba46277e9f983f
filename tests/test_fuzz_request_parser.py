"""Bounded CI run of fuzz target 2, the request parser against h11 (fuzz/request_parser.py)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings

from fuzz import request_parser
from fuzz._campaign import CI


@settings(CI, max_examples=500)
@given(request_parser.request_heads)
def test_fuzz_request_parser_agrees_with_h11(data: bytes) -> None:
    request_parser.check_request(data)


def test_fuzz_request_generator_mixes_verdicts() -> None:
    # The comparison means little unless hostile heads are accepted often enough for the
    # parsed fields to be compared, and h11 accepts some that we refuse.
    seen: Counter[str] = Counter()

    @settings(CI, max_examples=400)
    @given(request_parser.request_heads)
    def count(data: bytes) -> None:
        verdict, _, _ = request_parser.our_request(data)
        event = request_parser.h11_request(data)[0]
        seen["h11 only" if verdict == "reject" and event is not None else verdict] += 1

    count()
    assert seen["accept"] > 20, seen
    assert seen["reject"] > 100, seen
    assert seen["h11 only"] > 3, seen
    assert seen["incomplete"] > 5, seen
