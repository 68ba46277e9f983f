"""Load-test kit: a fast test backend and a staged, open-loop load generator.

Layer: beside the tunnel, above :mod:`tunnel2._http11`; nothing in the tunnel imports it.

* :func:`serve_backend` runs the test backend (``tunnel2 backend``).
* :func:`run_load` runs a :class:`LoadConfig` and returns a :class:`LoadReport`
  (``tunnel2 loadtest``); :func:`render_text`, :func:`write_json` and :func:`write_html` render
  it.
"""

from __future__ import annotations

from tunnel2.loadtest.backend import (
    ENDPOINTS,
    Backend,
    BackendConfig,
    BackendStatistics,
    serve_backend,
)
from tunnel2.loadtest.loadgen import (
    Connector,
    LoadConfig,
    Progress,
    run_load,
    run_profile,
    tcp_connector,
)
from tunnel2.loadtest.profiles import PROFILES, Stage, parse_stages, profile_stages, total_requests
from tunnel2.loadtest.report import (
    Breach,
    ComparisonRow,
    FailureKind,
    GeneratorUsage,
    LatencySummary,
    LoadReport,
    ProcessSample,
    ProcessUsage,
    RunReport,
    Summary,
    Thresholds,
    TimelinePoint,
    render_html,
    render_text,
    to_json,
    write_html,
    write_json,
)
from tunnel2.loadtest.sockets import MemorySocket, SocketLike, memory_socket_pair

__all__ = [
    "ENDPOINTS",
    "PROFILES",
    "Backend",
    "BackendConfig",
    "BackendStatistics",
    "Breach",
    "ComparisonRow",
    "Connector",
    "FailureKind",
    "GeneratorUsage",
    "LatencySummary",
    "LoadConfig",
    "LoadReport",
    "MemorySocket",
    "ProcessSample",
    "ProcessUsage",
    "Progress",
    "RunReport",
    "SocketLike",
    "Stage",
    "Summary",
    "Thresholds",
    "TimelinePoint",
    "memory_socket_pair",
    "parse_stages",
    "profile_stages",
    "render_html",
    "render_text",
    "run_load",
    "run_profile",
    "serve_backend",
    "tcp_connector",
    "to_json",
    "total_requests",
    "write_html",
    "write_json",
]
