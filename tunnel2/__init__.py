"""tunnel2: an embeddable HTTP tunnel for Python, built on trio."""

from __future__ import annotations
