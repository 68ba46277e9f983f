"""A token bucket: the rate limiter behind an uplink's flood protection (PROTOCOL.md §7).

Layer: sans-IO, like :mod:`tunnel2.frames`. Imports only the standard library and attrs; no
trio, no clock: the caller passes the time in (``trio.current_time()`` in the uplink), so it is
tested with plain numbers (h2's ``WindowManager`` style).

Invariant: over any interval of length ``T`` (between two calls' ``now``), at most
``burst + rate * T`` units are taken; a caller that takes one unit every ``1 / rate`` seconds
or less often is never refused.
"""

from __future__ import annotations

from typing import final

import attrs

__all__ = ["TokenBucket"]


@final
@attrs.define
class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` tokens per second.

    ``TokenBucket(rate, burst, now=t)`` starts full at time ``t``.

    Attributes:
        rate: tokens added per second (> 0).
        burst: the most tokens held at once (>= 1).
    """

    rate: float = attrs.field(validator=attrs.validators.gt(0))
    burst: float = attrs.field(validator=attrs.validators.ge(1))
    _updated: float = attrs.field(alias="now")
    _tokens: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.burst

    def take(self, now: float) -> bool:
        """Take one token at time ``now``; return False (taking nothing) if none is left.

        A ``now`` earlier than the previous call's adds nothing (the clock never runs back).
        """
        elapsed = now - self._updated
        tokens = self._tokens
        if elapsed > 0:
            tokens = min(self.burst, tokens + elapsed * self.rate)
            self._updated = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True
