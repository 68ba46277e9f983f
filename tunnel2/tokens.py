"""Agent tokens with identities, and which session ids each identity may claim.

Layer: bottom (sans-IO). May import the standard library and :mod:`tunnel2.errors` only.

A relay that has tokens knows every agent by the *identity* its token names. A session belongs
to the identity that claimed it (or to the one the token file grants it to); nobody else may
join it, reclaim it or receive its traffic (PROTOCOL.md §3.4). This module only answers the
questions "who is this token?" and "may this identity hold that id?"; the session store
remembers who holds what.

Token file format, one token per line (``#`` starts a comment, blank lines are skipped)::

    # token                           name    session ids / subdomains it may claim
    9c1f0e...                         alice   alice  alice-*
    4b77a2...                         ci      ci-*   pr-[0-9]*
    d00d2e...                         bob

Fields are separated by white space. Patterns are shell globs (:mod:`fnmatch`, case-sensitive).
An identity with patterns may claim only ids that match them; an identity without patterns
may claim any fixed id that no other identity's pattern covers. Every identity may ask for
random sessions.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, final

import attrs

__all__ = ["Identity", "TokenError", "TokenTable"]

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_PATTERN_RE: Final = re.compile(r"[A-Za-z0-9_*?\[\]!-]{1,64}")


class TokenError(ValueError):
    """A token, a token file line or a pattern is malformed."""


@final
@attrs.frozen
class Identity:
    """Who an agent is, by the token it presented.

    Attributes:
        name: the identity's name (from the token file, or derived from a bare token).
        patterns: the session ids it may claim (globs); empty = any id nobody else's
            pattern covers.
    """

    name: str
    patterns: tuple[str, ...] = ()

    def grants(self, session_id: str) -> bool:
        """True if one of this identity's patterns matches ``session_id``."""
        return any(fnmatch.fnmatchcase(session_id, p) for p in self.patterns)


def _derived_name(token: str) -> str:
    # A bare token (--token, TUNNEL2_TOKENS) names itself by a short digest: stable across
    # restarts, and log lines never show the secret.
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:10]


@final
class TokenTable:
    """The tokens a relay accepts, each with its :class:`Identity`.

    Build it with :meth:`from_lines`, :meth:`load` or :meth:`from_tokens`; combine with
    :meth:`merged`. Lookups compare every token in constant time.
    """

    def __init__(self, entries: Mapping[str, Identity]) -> None:
        self._entries = dict(entries)

    def __repr__(self) -> str:
        return f"<TokenTable identities={len(self.identities)}>"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def identities(self) -> frozenset[str]:
        """The names of every identity."""
        return frozenset(i.name for i in self._entries.values())

    @classmethod
    def from_tokens(cls, tokens: Iterable[str]) -> TokenTable:
        """Bare tokens, each its own identity with no patterns.

        A token may be written ``NAME=TOKEN`` to name its identity.

        Raises:
            TokenError: a token is empty or holds white space.
        """
        entries: dict[str, Identity] = {}
        for raw in tokens:
            name, sep, token = raw.partition("=")
            if not sep or not _NAME_RE.fullmatch(name):
                name, token = "", raw
            _check_token(token)
            entries[token] = Identity(name or _derived_name(token))
        return cls(entries)

    @classmethod
    def from_lines(cls, lines: Iterable[str], *, source: str = "token file") -> TokenTable:
        """Parse token file lines (see the module docstring).

        Raises:
            TokenError: a malformed line, naming the source and line number.
        """
        entries: dict[str, Identity] = {}
        names: dict[str, tuple[str, ...]] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"{source}, line {number}"
            if len(fields) < 2:
                raise TokenError(f"{where}: expected 'TOKEN NAME [PATTERN ...]'")
            token, name, *patterns = fields
            try:
                _check_token(token)
            except TokenError as exc:
                raise TokenError(f"{where}: {exc}") from None
            if not _NAME_RE.fullmatch(name):
                raise TokenError(f"{where}: name {name!r} is not 1-64 of [A-Za-z0-9_.@-]")
            for pattern in patterns:
                if not _PATTERN_RE.fullmatch(pattern):
                    raise TokenError(f"{where}: pattern {pattern!r} is not a session-id glob")
            if token in entries:
                raise TokenError(f"{where}: this token is listed twice")
            # Several tokens may share one identity (a key rotation): they share its grants.
            merged = tuple(dict.fromkeys((*names.get(name, ()), *patterns)))
            names[name] = merged
            entries[token] = Identity(name, merged)
        return cls({t: Identity(i.name, names[i.name]) for t, i in entries.items()})

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Read a token file.

        Raises:
            TokenError: a malformed line.
            OSError: the file cannot be read.
        """
        text = Path(path).read_text(encoding="utf-8")
        return cls.from_lines(text.splitlines(), source=str(path))

    def merged(self, other: TokenTable) -> TokenTable:
        """Both tables' tokens; ``other`` wins where a token is in both."""
        return TokenTable({**self._entries, **other._entries})

    def identify(self, token: str | None) -> Identity | None:
        """The identity of ``token``, or ``None`` if it is not accepted.

        Compares against every token with :func:`hmac.compare_digest`, without an early exit,
        so the time taken does not tell which tokens exist.
        """
        if token is None:
            return None
        found: Identity | None = None
        candidate = token.encode()
        for known, identity in self._entries.items():
            if hmac.compare_digest(candidate, known.encode()):
                found = identity
        return found

    def may_claim(self, identity: Identity, session_id: str) -> bool:
        """True if ``identity`` may hold the fixed id ``session_id`` (by the patterns)."""
        if identity.patterns:
            return identity.grants(session_id)
        return not any(
            other.name != identity.name and other.grants(session_id)
            for other in self._entries.values()
        )


def _check_token(token: str) -> None:
    if not token:
        raise TokenError("a token must not be empty")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise TokenError("a token must be printable and hold no white space")
