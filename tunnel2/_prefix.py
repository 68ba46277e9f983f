"""URLs that survive the path prefix: the agent's rewriting of a backend's response head.

Layer: sans-IO, beside the internal HTTP/1.1 parser; imports only stdlib, attrs and
``_http11``. No trio, no I/O, no logging.

On the path form (``/session/{id}/...``) the relay strips the prefix before the backend sees
the path and says so in ``X-Forwarded-Prefix`` (PROTOCOL.md §4.2). A backend that does not
read it answers ``Location: /login``, which the browser resolves against the relay's root.
:class:`UrlRewrite` makes the URLs in response *heads* lead back through the tunnel, as
nginx's ``proxy_redirect`` and ``proxy_cookie_path`` do (PROTOCOL.md §4.6):

- ``Location``, ``Content-Location`` and the URL of ``Refresh``: root-relative (``/x``),
  scheme-relative (``//own-host/x``) and absolute (``http(s)://own-host/x``) URLs become
  ``{prefix}/x``, root-relative (they then resolve against the public origin the client
  used, scheme included). "Own hosts" are the Host the backend was given and the public host
  (X-Forwarded-Host), compared case-insensitively, default ports ignored. Relative
  (``x``, ``../x``) and external URLs, other schemes, and values already under the prefix
  are kept. Query strings and fragments are kept byte for byte.
- ``Set-Cookie``: ``Path=/x`` becomes ``Path={prefix}/x`` (``Path=/``: ``Path={prefix}``); a
  cookie without Path gets none (as nginx's ``proxy_cookie_path``: the browser's default
  path is then already under the prefix). A ``Domain`` naming one of the own hosts is
  dropped, making the cookie host-only on the public host.

Invariants: invalid or odd values pass untouched (never an exception); the output is valid
field lines again; rewriting is idempotent. No regex is built from peer input.
"""

from __future__ import annotations

import re
from typing import Final, final

import attrs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tunnel2 import _http11 as http

__all__ = ["UrlRewrite", "has_url_fields", "url_rewrite_for"]

# The response fields that carry URLs (``set-cookie``: its Path and Domain attributes):
# the cheap check on the lower-cased field block, and the lines the rewriting visits (the
# others are skipped in C).
_URL_FIELDS_RE: Final = re.compile(rb"\n(?:location|content-location|refresh|set-cookie):")
_URL_LINE_RE: Final = re.compile(
    rb"(?im)^(location|content-location|refresh|set-cookie):[ \t]*+([^\r\n]*+)\r\n"
)
# A URL we touch: visible ASCII only (RFC 3986 has no spaces or controls); others pass.
_URL_RE: Final = re.compile(rb"[\x21-\x7e]+")
# A Refresh value (HTML "shared declarative refresh steps"): the delay, a separator, an
# optional ``url=``, an optional quote, then the URL.
_REFRESH_RE: Final = re.compile(
    rb"([0-9][0-9.]*[ \t]*[;,]?[ \t]*(?:[Uu][Rr][Ll][ \t]*=[ \t]*)?)(['\"]?)(.*)", re.DOTALL
)
_DEFAULT_PORTS: Final = (b":80", b":443", b":")
# A prefix we put in front of URLs: a plain path of visible ASCII, no query, no fragment,
# no trailing slash (the relay writes ``/session/{id}``).
_PREFIX_RE: Final = re.compile(rb"(?:/[\x21\x22\x24-\x2e\x30-\x3e\x40-\x7e]++)++")


def has_url_fields(response: http.ResponseHead) -> bool:
    """Whether ``response`` has a field :class:`UrlRewrite` may change (the cheap check
    made before anything else: most responses have none)."""
    return response.has_field_matching(_URL_FIELDS_RE)


def _host_key(authority: bytes) -> bytes:
    """An authority compared case-insensitively, a default (or empty) port ignored."""
    key = authority.lower()
    for port in _DEFAULT_PORTS:
        if key.endswith(port):
            return key[: -len(port)]
    return key


def _hostname(authority: bytes) -> bytes:
    """The host of an authority without its port, lower-cased (``[::1]`` for IPv6)."""
    key = authority.lower()
    if key.startswith(b"["):
        return key[: key.find(b"]") + 1]
    return key.partition(b":")[0]


def _field(head: bytes, lower: bytes, name: bytes) -> bytes:
    """The first value of field ``name`` (lower case) in a request head, or ``b""``."""
    index = lower.find(b"\r\n" + name + b":")
    if index < 0:
        return b""
    start = index + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start:end].strip(b" \t")


def url_rewrite_for(request_head: bytes) -> UrlRewrite | None:
    """The rewriting for the answer to ``request_head`` (as the backend got it), or
    ``None`` when there is nothing to rewrite: no path prefix, and the backend was given
    the public Host.

    The relay wrote the head (PROTOCOL.md §4.2), so its fields are looked up without a
    full parse; whatever they hold is only compared, never copied into the answer, except
    a prefix that is a plain path (anything else rewrites nothing).
    """
    lower = request_head.lower()
    prefix = _field(request_head, lower, b"x-forwarded-prefix")
    if _PREFIX_RE.fullmatch(prefix) is None:
        prefix = b""
    host = _field(request_head, lower, b"host")
    public = _field(request_head, lower, b"x-forwarded-host") or host
    other_host = _host_key(host) != _host_key(public)
    if not prefix and not other_host:
        return None
    own_hosts = {_host_key(h) for h in (host, public) if h}
    # Domain attributes dropped: the backend's own host (the browser would refuse it on the
    # public host), and on the path form the public host too (the relay's host is shared by
    # every session: a Domain cookie there would also reach {id}.DOMAIN of other sessions).
    own_domains = {_hostname(host)} if other_host else set()
    if prefix:
        own_domains |= {_hostname(h) for h in (host, public)}
    own_domains.discard(b"")
    return UrlRewrite(prefix, frozenset(own_hosts), frozenset(own_domains))


@final
@attrs.frozen
class UrlRewrite:
    """How URLs in one response head are rewritten (see the module docstring).

    Attributes:
        prefix: the public path prefix (``/session/{id}``), or ``b""`` on the Host form.
        own_hosts: authorities (:func:`_host_key`) that name the backend itself.
        own_domains: cookie ``Domain`` values (lower-cased, no leading dot) to drop.
    """

    prefix: bytes
    own_hosts: frozenset[bytes]
    own_domains: frozenset[bytes]

    def fields(self, fields: bytes) -> bytes:
        """``fields`` (validated field lines, each ending in CRLF) with URLs rewritten."""
        return _URL_LINE_RE.sub(self._line, fields)

    def _line(self, match: re.Match[bytes]) -> bytes:
        name, value = match.groups()
        value = value.rstrip(b" \t")  # here, not in the pattern: no backtracking
        kind = name.lower()
        if kind == b"set-cookie":
            new = self.cookie(value)
        elif kind == b"refresh":
            new = self.refresh(value)
        else:
            new = self.url(value)
        return match.group() if new == value else name + b": " + new + b"\r\n"

    def url(self, url: bytes) -> bytes:
        """A ``Location``/``Content-Location`` value, rewritten if it names the backend."""
        if _URL_RE.fullmatch(url) is None:
            return url
        if url.startswith(b"//"):
            return self._own(url[2:], url)
        if url.startswith(b"/"):
            return self._under_prefix(url)
        scheme, sep, rest = url.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            return self._own(rest, url)
        return url

    def refresh(self, value: bytes) -> bytes:
        """A ``Refresh`` value (``5; url=/x``) with its URL rewritten."""
        match = _REFRESH_RE.fullmatch(value)
        if match is None:
            return value
        lead, quote, rest = match.groups()
        end = rest.find(quote) if quote else -1
        url, tail = (rest, b"") if end < 0 else (rest[:end], rest[end:])
        if not url:
            return value
        new = self.url(url)
        return value if new == url else lead + quote + new + tail

    def cookie(self, value: bytes) -> bytes:
        """A ``Set-Cookie`` value with its Path under the prefix and an own Domain dropped."""
        attributes = value.split(b";")
        kept = attributes[:1]
        changed = False
        for attribute in attributes[1:]:
            name, eq, given = attribute.partition(b"=")
            key = name.strip(b" \t").lower()
            given = given.strip(b" \t")
            if eq and key == b"path" and self.prefix and given.startswith(b"/"):
                if _URL_RE.fullmatch(given) is not None:
                    path = self.prefix if given == b"/" else self._under_prefix(given)
                    if path != given:
                        attribute = name + b"=" + path
                        changed = True
            elif eq and key == b"domain" and given.lstrip(b".").lower() in self.own_domains:
                changed = True
                continue
            kept.append(attribute)
        return b";".join(kept) if changed else value

    def _own(self, rest: bytes, url: bytes) -> bytes:
        """``rest`` (authority, path, query, fragment of ``url``) under the prefix,
        root-relative, if its authority is an own host; else ``url`` as it is."""
        end = len(rest)
        for sep in (b"/", b"?", b"#"):
            index = rest.find(sep)
            if 0 <= index < end:
                end = index
        if _host_key(rest[:end]) not in self.own_hosts:
            return url
        path = rest[end:]
        if not self.prefix and path[:2] in (b"//", b"/\\"):
            # Root-relative, ``//evil.example/x`` or ``/\\evil.example`` would name another
            # host (an open redirect the absolute URL was not): keep the URL as it is.
            return url
        return self._under_prefix(path if path.startswith(b"/") else b"/" + path)

    def _under_prefix(self, path: bytes) -> bytes:
        """A root-relative ``path`` under the prefix (kept if it already is)."""
        prefix = self.prefix
        if path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in (
            b"",
            b"/",
            b"?",
            b"#",
        ):
            return path
        return prefix + path
