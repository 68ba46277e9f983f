"""Load-test kit: a fast test backend and a staged, open-loop load generator."""

from __future__ import annotations
