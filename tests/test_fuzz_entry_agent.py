"""Bounded CI run of fuzz target 4, the relay fed hostile agent frames (fuzz/entry_agent.py):
valid, informational (finding F7) and malformed (finding F5) response heads, all fixed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from fuzz import entry_agent
from fuzz._campaign import CI


@pytest.mark.parametrize("kind", ["valid", "informational", "malformed"])
def test_fuzz_entry_survives_hostile_agent_frames(kind: entry_agent.HeadKind) -> None:
    @settings(CI, max_examples=100)
    @given(entry_agent.agent_cases(kind))
    def check(case: entry_agent.AgentCase) -> None:
        entry_agent.check_agent(case)

    check()
