"""tunnel2: an embeddable HTTP tunnel for Python, built on trio.

The public surface is what ``__all__`` lists; everything else is internal.
"""

from __future__ import annotations

from tunnel2.access import AccessPolicy
from tunnel2.agent import Agent, AgentConfig
from tunnel2.api import open_tunnel, open_tunnel_server, serve_tunnel_server
from tunnel2.entry import ProxyEntry
from tunnel2.errors import (
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
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.uplink import TunnelStream, TunnelUplink, UplinkLimits

__all__ = [
    "AccessPolicy",
    "Agent",
    "AgentConfig",
    "ErrorCode",
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
    "open_tunnel",
    "open_tunnel_server",
    "serve_tunnel_server",
]

__version__ = "0.1.0"
