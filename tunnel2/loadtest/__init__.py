"""Load-test kit: a fast test backend and a staged, open-loop load generator.

Layer: beside the tunnel, above :mod:`tunnel2._http11`; nothing in the tunnel imports it.

* :func:`serve_backend` runs the test backend (``tunnel2 backend``).
* :func:`run_load` runs a :class:`LoadConfig` and returns a :class:`LoadReport`
  (``tunnel2 loadtest``); :func:`render_text`, :func:`write_json` and :func:`write_html` render
  it.
* :func:`make_baseline` / :func:`save_baseline` keep a run; :func:`load_baseline` and
  :func:`with_baseline` check a later run against it (``--save-baseline``, ``--baseline``).
"""

from __future__ import annotations

from tunnel2.loadtest.backend import (
    ENDPOINTS,
    Backend,
    BackendConfig,
    BackendStatistics,
    serve_backend,
)
from tunnel2.loadtest.baseline import (
    BaselineError,
    check_baseline,
    check_comparable,
    load_baseline,
    machine_info,
    make_baseline,
    parse_tolerances,
    save_baseline,
    speed_factors,
    with_baseline,
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
    Baseline,
    BaselineCheck,
    Breach,
    ComparisonRow,
    FailureKind,
    GeneratorUsage,
    LatencySummary,
    LoadReport,
    MachineInfo,
    ProcessSample,
    ProcessUsage,
    Regression,
    RunReport,
    Summary,
    Thresholds,
    TimelinePoint,
    Tolerances,
    render_html,
    render_text,
    to_json,
    write_html,
    write_json,
)

__all__ = [
    "ENDPOINTS",
    "PROFILES",
    "Backend",
    "BackendConfig",
    "BackendStatistics",
    "Baseline",
    "BaselineCheck",
    "BaselineError",
    "Breach",
    "ComparisonRow",
    "Connector",
    "FailureKind",
    "GeneratorUsage",
    "LatencySummary",
    "LoadConfig",
    "LoadReport",
    "MachineInfo",
    "ProcessSample",
    "ProcessUsage",
    "Progress",
    "Regression",
    "RunReport",
    "Stage",
    "Summary",
    "Thresholds",
    "TimelinePoint",
    "Tolerances",
    "check_baseline",
    "check_comparable",
    "load_baseline",
    "machine_info",
    "make_baseline",
    "parse_stages",
    "parse_tolerances",
    "profile_stages",
    "render_html",
    "render_text",
    "run_load",
    "run_profile",
    "save_baseline",
    "serve_backend",
    "speed_factors",
    "tcp_connector",
    "to_json",
    "total_requests",
    "with_baseline",
    "write_html",
    "write_json",
]
