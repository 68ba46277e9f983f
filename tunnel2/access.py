"""Visitor access control: the policy an agent sets for its tunnel, enforced at the relay.

Layer: bottom, beside :mod:`tunnel2.frames`. Sans-IO: may import the standard library, attrs
and :mod:`tunnel2.errors`; no trio, no sockets, no clock, no logging (a test enforces this).

An :class:`AccessPolicy` says who may visit a tunnel: HTTP basic-auth users, a bearer token,
and CIDR allow/deny lists for the visitor's address. The agent builds it from the secrets
(:meth:`AccessPolicy.from_options`), which keeps only salted hashes of them, sends it in HELLO
(:meth:`AccessPolicy.to_json`, PROTOCOL.md §3.1.1); the relay rebuilds it
(:meth:`AccessPolicy.from_json`) and asks :meth:`AccessPolicy.check` about every request before
the request reaches the agent.

Invariants:

* Secrets never leave the agent in clear: basic-auth credentials travel as PBKDF2-SHA256
  hashes, the bearer token as a salted SHA-256 digest (PROTOCOL.md §3.1.1 says why).
* Every credential comparison is :func:`hmac.compare_digest` over a whole digest, against every
  entry, with no early exit: neither the user name nor the position of a match shows in timing.
* No message, ``repr`` or error names a secret, a hash or a salt.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias, final

import attrs

__all__ = [
    "CREDENTIAL_HEADER",
    "DEFAULT_ITERATIONS",
    "MAX_ITERATIONS",
    "MIN_ITERATIONS",
    "AccessPolicy",
    "Refusal",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

CREDENTIAL_HEADER: Final = b"authorization"
"""The request header a credential policy reads, and the relay strips before forwarding."""

DEFAULT_ITERATIONS: Final = 1
"""PBKDF2 rounds for basic-auth hashes. One round (a salted HMAC, ~2 µs): every distinct wrong
credential a visitor sends costs a hash on the relay's event loop, so a slow hash would let
one session's visitors stall the relay for all (PROTOCOL.md §3.1.1)."""
MIN_ITERATIONS: Final = 1
MAX_ITERATIONS: Final = 1000
"""The most rounds a relay accepts (~0.3 ms): one agent's policy must not let its visitors
stall the relay's loop for everyone else."""

_SALT_BYTES: Final = 16
_DIGEST_BYTES: Final = 32
_MAX_USERS: Final = 64
_MAX_NETWORKS: Final = 256
_MAX_USER_LENGTH: Final = 256
_CACHE_SIZE: Final = 256
_REALM: Final = b'realm="tunnel2"'
_KEYS: Final = frozenset(
    {"salt", "iterations", "basic", "bearer_sha256", "allow_cidrs", "deny_cidrs"}
)


@final
@attrs.frozen
class Refusal:
    """A request the policy turns away: the relay answers it with ``status`` itself.

    Attributes:
        status: 401 (missing or wrong credentials) or 403 (the visitor's address is denied).
        message: plain text saying what the tunnel needs; never names a secret.
        headers: extra response header fields, e.g. ``WWW-Authenticate`` challenges.
    """

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _network(text: object) -> IPNetwork:
    if not isinstance(text, str):
        raise ValueError(f"a CIDR must be a string, not {type(text).__name__}")
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {text!r}: {exc}") from None


def _check_user(user: str) -> None:
    if not user:
        raise ValueError("a basic-auth user name must not be empty")
    if len(user) > _MAX_USER_LENGTH:
        raise ValueError(f"a basic-auth user name is longer than {_MAX_USER_LENGTH} characters")
    if ":" in user or not user.isprintable():
        raise ValueError(f"basic-auth user name {user!r} contains ':' or a control character")


def _b64decode(text: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if size is not None and len(value) != size:
        raise ValueError(f"{what} is {len(value)} bytes, expected {size}")
    return value


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _networks(value: object, what: str) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of CIDR strings")
    return tuple(_network(item) for item in value)


@final
@attrs.frozen(repr=False)
class AccessPolicy:
    """Who may visit a tunnel. Build it with :meth:`from_options` (agent side, from secrets)
    or :meth:`from_json` (relay side, from HELLO); the constructor takes the hashed form.

    A request passes when its visitor address is allowed (deny entries win; with any allow
    entry, every other address is denied) and, if the policy has credentials, its
    ``Authorization`` header holds one of them (any basic-auth user, or the bearer token).

    Attributes:
        salt: the random salt of every hash in this policy.
        iterations: PBKDF2-SHA256 rounds of the basic-auth hashes.
        basic_users: ``(user, hash)`` pairs; the hash is of the whole ``user:password``.
        bearer_sha256: SHA-256 of salt + token, or ``None`` for no bearer token.
        allow_cidrs: visitor networks let in; empty means every address not denied.
        deny_cidrs: visitor networks turned away, whatever else matches.
    """

    salt: bytes = b""
    iterations: int = DEFAULT_ITERATIONS
    basic_users: tuple[tuple[str, bytes], ...] = ()
    bearer_sha256: bytes | None = None
    allow_cidrs: tuple[IPNetwork, ...] = ()
    deny_cidrs: tuple[IPNetwork, ...] = ()
    # Verdicts by an HMAC of the Authorization value under a per-instance key, so the KDF runs
    # once per distinct credential and no cleartext is kept. Not part of the policy's value.
    _cache_key: bytes = attrs.field(
        factory=lambda: secrets.token_bytes(32), eq=False, hash=False, init=False
    )
    _verdicts: collections.OrderedDict[bytes, bool] = attrs.field(
        factory=collections.OrderedDict, eq=False, hash=False, init=False
    )

    def __attrs_post_init__(self) -> None:
        if type(self.iterations) is not int or not (
            MIN_ITERATIONS <= self.iterations <= MAX_ITERATIONS
        ):
            raise ValueError(
                f"iterations {self.iterations!r} is not within {MIN_ITERATIONS}..{MAX_ITERATIONS}"
            )
        if self.uses_credentials and not 8 <= len(self.salt) <= 64:
            raise ValueError(f"the salt is {len(self.salt)} bytes, expected 8..64")
        if len(self.basic_users) > _MAX_USERS:
            raise ValueError(f"{len(self.basic_users)} basic-auth users, at most {_MAX_USERS}")
        for user, digest in self.basic_users:
            _check_user(user)
            if len(digest) != _DIGEST_BYTES:
                raise ValueError(f"the hash of user {user!r} is not {_DIGEST_BYTES} bytes")
        if self.bearer_sha256 is not None and len(self.bearer_sha256) != _DIGEST_BYTES:
            raise ValueError(f"the bearer token digest is not {_DIGEST_BYTES} bytes")
        for what, networks in (("allow", self.allow_cidrs), ("deny", self.deny_cidrs)):
            if len(networks) > _MAX_NETWORKS:
                raise ValueError(f"{len(networks)} {what} CIDRs, at most {_MAX_NETWORKS}")

    def __repr__(self) -> str:
        return f"<AccessPolicy {self.describe()}>"

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def from_options(
        cls,
        *,
        basic_auth: Iterable[str] = (),
        bearer_token: str | None = None,
        allow_cidrs: Iterable[str] = (),
        deny_cidrs: Iterable[str] = (),
        iterations: int = DEFAULT_ITERATIONS,
    ) -> AccessPolicy:
        """Build a policy from secrets; only their salted hashes are kept.

        Args:
            basic_auth: ``"user:password"`` credentials, any of which lets a visitor in.
            bearer_token: a token visitors send as ``Authorization: Bearer TOKEN``.
            allow_cidrs: visitor networks let in (``"10.0.0.0/8"``, ``"::1"``); if any is
                given, every other address is denied.
            deny_cidrs: visitor networks turned away; deny wins over allow.
            iterations: PBKDF2-SHA256 rounds for the basic-auth hashes.

        Raises:
            ValueError: a credential without ``:``, an empty user or password, an empty
                bearer token, or an invalid CIDR (the message names it, never a secret).
        """
        salt = secrets.token_bytes(_SALT_BYTES)
        users = []
        for credential in basic_auth:
            user, sep, password = credential.partition(":")
            if not sep:
                raise ValueError("a basic-auth credential must be USER:PASSWORD (no ':' in it)")
            _check_user(user)
            if not password:
                raise ValueError(f"the basic-auth password of user {user!r} is empty")
            users.append((user, _kdf(credential.encode(), salt, iterations)))
        digest = None
        if bearer_token is not None:
            if not bearer_token.strip():
                raise ValueError("the bearer token is empty")
            digest = _sha256(salt, bearer_token.strip().encode())
        # Normalised so that to_json() / from_json() round-trips to an equal policy.
        return cls(
            salt=salt if users or digest is not None else b"",
            iterations=iterations if users else DEFAULT_ITERATIONS,
            basic_users=tuple(users),
            bearer_sha256=digest,
            allow_cidrs=tuple(_network(c) for c in allow_cidrs),
            deny_cidrs=tuple(_network(c) for c in deny_cidrs),
        )

    def to_json(self) -> dict[str, Any]:
        """The policy as the JSON object of HELLO's ``access`` key (PROTOCOL.md §3.1.1)."""
        fields: dict[str, Any] = {}
        if self.uses_credentials:
            fields["salt"] = _b64(self.salt)
        if self.basic_users:
            fields["iterations"] = self.iterations
            fields["basic"] = [{"user": u, "hash": _b64(h)} for u, h in self.basic_users]
        if self.bearer_sha256 is not None:
            fields["bearer_sha256"] = _b64(self.bearer_sha256)
        if self.allow_cidrs:
            fields["allow_cidrs"] = [str(n) for n in self.allow_cidrs]
        if self.deny_cidrs:
            fields["deny_cidrs"] = [str(n) for n in self.deny_cidrs]
        return fields

    @classmethod
    def from_json(cls, fields: Mapping[str, Any]) -> AccessPolicy:
        """Rebuild a policy from HELLO's ``access`` object.

        Unknown keys are an error, not ignored: a relay that cannot enforce part of a policy
        must refuse the agent rather than let visitors in that the agent meant to keep out.

        Raises:
            ValueError: the object is not a valid policy (the message says which part).
        """
        if not isinstance(fields, Mapping):
            raise ValueError("the access policy must be a JSON object")
        unknown = set(fields) - _KEYS
        if unknown:
            raise ValueError(f"unknown access policy keys: {', '.join(sorted(map(str, unknown)))}")
        basic = fields.get("basic", [])
        if not isinstance(basic, list) or not all(
            isinstance(e, dict) and set(e) == {"user", "hash"} and isinstance(e["user"], str)
            for e in basic
        ):
            raise ValueError('\'basic\' must be a list of {"user": ..., "hash": ...} objects')
        bearer = fields.get("bearer_sha256")
        salt = fields.get("salt")
        return cls(
            salt=b"" if salt is None else _b64decode(salt, "'salt'"),
            iterations=fields.get("iterations", DEFAULT_ITERATIONS),
            basic_users=tuple(
                (e["user"], _b64decode(e["hash"], f"the hash of user {e['user']!r}", 32))
                for e in basic
            ),
            bearer_sha256=None if bearer is None else _b64decode(bearer, "'bearer_sha256'", 32),
            allow_cidrs=_networks(fields.get("allow_cidrs", []), "'allow_cidrs'"),
            deny_cidrs=_networks(fields.get("deny_cidrs", []), "'deny_cidrs'"),
        )

    # --- asking -----------------------------------------------------------------------------

    @property
    def uses_credentials(self) -> bool:
        """Whether requests must carry a credential (the relay then strips the header)."""
        return bool(self.basic_users) or self.bearer_sha256 is not None

    def describe(self) -> str:
        """A one-line summary for logs and the command line; names no secret."""
        parts = []
        if self.basic_users:
            parts.append("basic auth for " + ", ".join(u for u, _ in self.basic_users))
        if self.bearer_sha256 is not None:
            parts.append("a bearer token")
        if self.allow_cidrs:
            parts.append("allow " + " ".join(map(str, self.allow_cidrs)))
        if self.deny_cidrs:
            parts.append("deny " + " ".join(map(str, self.deny_cidrs)))
        return "; ".join(parts) or "open to everyone"

    def check(self, authorization: bytes | None, peer_ip: str) -> Refusal | None:
        """Decide whether a request may pass; ``None`` means it may.

        The address is checked first, so a denied visitor costs no hashing.

        Args:
            authorization: the request's ``Authorization`` value, or ``None`` if it has none.
            peer_ip: the address of the TCP peer the relay accepted (never a header), or
                ``"unknown"``; an unknown address passes only a policy without CIDR lists.
        """
        if self.allow_cidrs or self.deny_cidrs:
            refusal = self._check_address(peer_ip)
            if refusal is not None:
                return refusal
        if not self.uses_credentials:
            return None
        if authorization is None:
            return self._challenge(f"this tunnel requires {self._needed()}")
        if not self._credential_ok(authorization):
            return self._challenge(
                f"the credentials sent are not valid here; this tunnel requires {self._needed()}"
            )
        return None

    def _check_address(self, peer_ip: str) -> Refusal | None:
        try:
            address = ipaddress.ip_address(peer_ip)
        except ValueError:
            return Refusal(
                403,
                "the visitor's address is unknown, and this tunnel admits visitors by address only",
            )
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        denied = any(address in network for network in self.deny_cidrs)
        if denied or (self.allow_cidrs and not any(address in n for n in self.allow_cidrs)):
            return Refusal(403, f"visitors from {address} may not reach this tunnel")
        return None

    def _needed(self) -> str:
        if self.basic_users and self.bearer_sha256 is not None:
            return "a user name and password (HTTP basic auth) or a bearer token"
        if self.basic_users:
            return "a user name and password (HTTP basic auth)"
        return "a bearer token (Authorization: Bearer TOKEN)"

    def _challenge(self, message: str) -> Refusal:
        headers = []
        if self.basic_users:
            headers.append((b"WWW-Authenticate", b'Basic %s, charset="UTF-8"' % _REALM))
        if self.bearer_sha256 is not None:
            headers.append((b"WWW-Authenticate", b"Bearer %s" % _REALM))
        return Refusal(401, message, tuple(headers))

    def _credential_ok(self, authorization: bytes) -> bool:
        scheme, _, value = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == b"bearer" and self.bearer_sha256 is not None:
            return hmac.compare_digest(_sha256(self.salt, value), self.bearer_sha256)
        if scheme != b"basic" or not self.basic_users:
            return False
        key = hmac.digest(self._cache_key, value, "sha256")
        verdicts = self._verdicts
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = self._basic_ok(value)
            verdicts[key] = verdict
            if len(verdicts) > _CACHE_SIZE:
                verdicts.popitem(last=False)
        else:
            verdicts.move_to_end(key)
        return verdict

    def _basic_ok(self, value: bytes) -> bool:
        try:
            credential = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        digest = _kdf(credential, self.salt, self.iterations)
        # Compare against every user, no early exit: timing shows neither who nor whether.
        ok = False
        for _user, expected in self.basic_users:
            ok |= hmac.compare_digest(digest, expected)
        return ok


def _kdf(credential: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", credential, salt, iterations)


def _sha256(salt: bytes, token: bytes) -> bytes:
    return hashlib.sha256(salt + token).digest()
