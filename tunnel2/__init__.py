"""tunnel2: an embeddable HTTP tunnel for Python, built on trio.

The public surface is what ``__all__`` lists, plus the submodules :mod:`tunnel2.aio` (the
asyncio API), :mod:`tunnel2.sync` (the thread-backed handles behind :func:`connect` and
:func:`start_relay`) and :mod:`tunnel2.testing`; everything else is internal.
"""

from __future__ import annotations

from tunnel2 import aio as aio
from tunnel2 import sync as sync
from tunnel2._util import until_signalled
from tunnel2.access import AccessPolicy
from tunnel2.agent import Agent, AgentConfig
from tunnel2.api import open_tunnel, open_tunnel_server, serve_tunnel_server
from tunnel2.entry import ProxyEntry
from tunnel2.errors import (
    AppStartupError,
    ErrorCode,
    HandshakeError,
    HandshakeRefused,
    HandshakeTimeout,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamError,
    StreamReset,
    TunnelError,
    UplinkClosed,
)
from tunnel2.inspect import Exchange
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.sync import connect, start_relay
from tunnel2.uplink import TunnelStream, TunnelUplink, UplinkLimits

__all__ = [
    "AccessPolicy",
    "Agent",
    "AgentConfig",
    "AppStartupError",
    "ErrorCode",
    "Exchange",
    "HandshakeError",
    "HandshakeRefused",
    "HandshakeTimeout",
    "LocalProtocolError",
    "ProtocolError",
    "ProxyEntry",
    "RemoteProtocolError",
    "ServerConfig",
    "StreamError",
    "StreamReset",
    "TunnelError",
    "TunnelServer",
    "TunnelStream",
    "TunnelUplink",
    "UplinkClosed",
    "UplinkLimits",
    "connect",
    "open_tunnel",
    "open_tunnel_server",
    "serve_tunnel_server",
    "start_relay",
    "until_signalled",
]

__version__ = "0.1.0"
