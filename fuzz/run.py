"""Run fuzz targets by name: ``python fuzz/run.py TARGET [--seconds S] [options]``.

TARGET is ``decoder``, ``request_parser``, ``entry_visitor``, ``entry_agent``, or ``all``
(the time budget is shared out evenly between the targets). Other options are those of
``python -m fuzz.TARGET --help``. Exits 1 if any property failed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from fuzz._campaign import main

TARGETS = ("decoder", "request_parser", "entry_visitor", "entry_agent")


def run(argv: list[str]) -> int:
    if not argv or argv[0] not in (*TARGETS, "all"):
        print(f"usage: python fuzz/run.py {{{','.join(TARGETS)},all}} [--seconds S] ...")
        return 2
    names = TARGETS if argv[0] == "all" else (argv[0],)
    rest = argv[1:]
    if len(names) > 1 and "--seconds" in rest:
        at = rest.index("--seconds") + 1
        rest[at] = str(float(rest[at]) / len(names))
    failed = 0
    for name in names:
        module = importlib.import_module(f"fuzz.{name}")
        failed |= main(name, module.PROPERTIES, rest)
    return failed


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
