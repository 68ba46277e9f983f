"""Fuzz targets for tunnel2: long campaigns run by hand, bounded versions run in CI.

Each target module (:mod:`fuzz.decoder`, :mod:`fuzz.request_parser`, :mod:`fuzz.entry_visitor`,
:mod:`fuzz.entry_agent`) defines hypothesis strategies and plain ``check_*`` functions that
assert the target's invariants; ``tests/test_fuzz_*.py`` run them with a few hundred
derandomized examples, and ``python -m fuzz.<target>`` / ``python fuzz/run.py TARGET`` run them
for as long as asked (see fuzz/README.md).
"""

from __future__ import annotations
