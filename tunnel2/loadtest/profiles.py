"""Load profiles: stages of constant arrival rate, the built-in profiles and ``--stages`` parsing.

Layer: load-test kit, bottom. Pure data and parsing: imports only the standard library and attrs.

A stage is "send ``rate`` requests per second for ``duration`` seconds"; it schedules
``round(rate * duration)`` requests, evenly spaced from the stage's start.
"""

from __future__ import annotations

import math
from typing import Final, final

import attrs

__all__ = ["PROFILES", "Stage", "parse_stages", "profile_stages", "total_requests"]


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


@final
@attrs.frozen
class Stage:
    """One stage of a load profile: a constant arrival rate held for a duration.

    Attributes:
        rate: target requests per second (open loop: sent on schedule regardless of answers).
        duration: length of the stage in seconds.
    """

    rate: float = attrs.field(converter=float, validator=_positive)
    duration: float = attrs.field(converter=float, validator=_positive)

    @property
    def requests(self) -> int:
        """How many requests the stage schedules."""
        return max(1, round(self.rate * self.duration))

    def __str__(self) -> str:
        return f"{self.rate:g}x{self.duration:g}"


_RAMP: Final = tuple(Stage(rate, 30) for rate in (20, 50, 100, 200, 500, 1000))

PROFILES: Final[dict[str, tuple[Stage, ...]]] = {
    "smoke": (Stage(20, 10),),
    "ramp": _RAMP,
    # The reference kit names the same ladder twice; "aggressive" is kept as an alias so that
    # scripts written for it keep working.
    "aggressive": _RAMP,
}
"""The built-in profiles by name: ``smoke`` (200 requests), ``ramp``/``aggressive`` (56,100)."""


def parse_stages(text: str) -> tuple[Stage, ...]:
    """Parse ``"100x10,500x10"`` (rate x seconds, comma-separated) into stages.

    Args:
        text: the stage list; each item is ``RATExSECONDS`` with positive numbers, spaces and an
            upper-case ``X`` are accepted.

    Returns:
        The stages in order.

    Raises:
        ValueError: the text is empty or an item is malformed; the message names the item.
    """
    stages: list[Stage] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        rate, sep, duration = item.lower().partition("x")
        if not sep:
            raise ValueError(f"stage {item!r} is not RATExSECONDS (e.g. 100x10)")
        try:
            stages.append(Stage(float(rate), float(duration)))
        except ValueError as exc:
            raise ValueError(f"stage {item!r}: {exc}") from exc
    if not stages:
        raise ValueError(f"no stages in {text!r}; expected e.g. 100x10,500x10")
    return tuple(stages)


def profile_stages(name: str) -> tuple[Stage, ...]:
    """Return the stages of the built-in profile ``name``.

    Raises:
        ValueError: no such profile; the message lists the known ones.
    """
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name!r}; known: {known}") from None


def total_requests(stages: tuple[Stage, ...]) -> int:
    """Return how many requests ``stages`` schedule in all."""
    return sum(stage.requests for stage in stages)
