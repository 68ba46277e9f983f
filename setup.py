"""Build script: pure Python by default; ``TUNNEL2_COMPILE=1`` compiles the data path.

Everything else is in pyproject.toml. With ``TUNNEL2_COMPILE=1`` in the environment of
``pip install`` or ``python -m build``, the modules in ``COMPILED`` become C extensions
built by mypyc (which comes with mypy; ``_build/backend.py`` adds it to the build
requirements only then). Their sources stay in the package and remain the reference: the
compiled build passes the same test suite (``.ci/run`` runs it against one).
"""

from __future__ import annotations

import os

from setuptools import setup

# What every request goes through on the relay and the agent: the HTTP parser, the frame
# codec, the transports and the relay's entry (benchmarks/RESULTS.md, "Fifth round").
COMPILED = [
    "tunnel2/_http11.py",
    "tunnel2/frames.py",
    "tunnel2/transports.py",
    "tunnel2/entry.py",
]

if os.environ.get("TUNNEL2_COMPILE") == "1":
    from mypyc.build import mypycify

    setup(ext_modules=mypycify(COMPILED, opt_level="3", group_name="tunnel2"))
else:
    setup()
