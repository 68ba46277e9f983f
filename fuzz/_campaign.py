"""Running a fuzz target for a long while: hypothesis rounds until a budget is spent, or atheris.

A target is a list of :class:`Property` objects: a strategy and a check that raises
``AssertionError`` (or anything else) when an invariant breaks. The CI tests wrap the same
checks with small, derandomized settings; this module runs them with many examples, a
persistent example database (``fuzz/.hypothesis/``, so a failure found once is replayed first
next time) and a time budget, and prints how many inputs were tried.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

DATABASE_DIR: Final = Path(__file__).parent / ".hypothesis"
_FIRST_ROUND: Final = 50
_MAX_ROUND: Final = 20000
_ROUND_SECONDS: Final = 20.0

# Settings for the bounded CI versions: reproducible (no database, fixed derandomized seed),
# no deadline (a shared 2-core machine is slow at times), and the health checks that flag
# slow generation off (some targets run a whole relay per example).
CI: Final = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@attrs.frozen
class Property:
    """One invariant to fuzz: inputs from ``strategy``, checked by ``check``."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


@attrs.frozen
class Outcome:
    """What a campaign on one property did."""

    tried: int
    seconds: float
    error: BaseException | None


def run(prop: Property, *, examples: int, seconds: float, verbose: bool = False) -> Outcome:
    """Run ``prop`` until ``examples`` inputs were tried or ``seconds`` passed.

    Hypothesis runs in rounds sized to take about ``_ROUND_SECONDS`` each; after the budget
    is spent the check is skipped, so a round in progress ends quickly. A failing input is
    shrunk and printed by hypothesis, saved to the database, and returned as the error.
    """
    tried = 0
    start = time.monotonic()
    deadline = start + seconds

    failed = False

    def counted(value: Any) -> None:
        nonlocal tried, failed
        # Past the budget, inputs are skipped so the round ends soon; not once one failed,
        # or hypothesis could not shrink and replay it (it would call the failure flaky).
        if not failed and (time.monotonic() > deadline or tried >= examples):
            return
        tried += 1
        try:
            prop.check(value)
        except BaseException:
            failed = True
            raise

    database = DirectoryBasedExampleDatabase(str(DATABASE_DIR))
    size = _FIRST_ROUND
    while tried < examples and time.monotonic() < deadline:
        round_start, round_tried = time.monotonic(), tried
        test = settings(
            max_examples=max(1, min(size, examples - tried)),
            deadline=None,
            database=database,
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )(given(prop.strategy)(counted))
        try:
            test()
        except Exception as exc:
            return Outcome(tried, time.monotonic() - start, exc)
        per_example = (time.monotonic() - round_start) / max(1, tried - round_tried)
        budget = min(_ROUND_SECONDS, deadline - time.monotonic())
        size = int(min(_MAX_ROUND, max(1, budget / per_example)))
        if verbose:
            print(f"  {prop.name}: {tried} inputs", file=sys.stderr, flush=True)
    return Outcome(tried, time.monotonic() - start, None)


def run_atheris(target: str, name: str, *, examples: int, seconds: float) -> None:
    """Run property ``name`` of ``fuzz.<target>`` under atheris (libFuzzer's coverage-guided
    mutation of the bytes hypothesis draws from). Needs ``pip install atheris``; never
    returns (libFuzzer exits).

    Only tunnel2 is instrumented for coverage: its modules and the target's are imported
    again inside ``atheris.instrument_imports``.
    """
    atheris: Any = importlib.import_module("atheris")  # optional: not a dependency, nor in CI

    for module_name in list(sys.modules):
        if module_name.split(".")[0] == "tunnel2" or module_name == f"fuzz.{target}":
            del sys.modules[module_name]
    with atheris.instrument_imports(include=["tunnel2"]):
        module = importlib.import_module(f"fuzz.{target}")
    properties: Sequence[Property] = module.PROPERTIES
    prop = next(p for p in properties if p.name == name)
    test: Any = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))(
        given(prop.strategy)(prop.check)
    )
    args = [sys.argv[0], f"-max_total_time={int(seconds)}", f"-runs={examples}"]
    atheris.Setup(args, test.hypothesis.fuzz_one_input)
    atheris.Fuzz()


def main(target: str, properties: Sequence[Property], argv: Sequence[str] | None = None) -> int:
    """Command line of one target: ``python -m fuzz.TARGET [--examples N] [--seconds S]``.

    The budget is shared out evenly between the target's properties. Prints one line per
    property: inputs tried, seconds taken, and ``ok`` or the failure.
    """
    parser = argparse.ArgumentParser(prog=f"python -m fuzz.{target}")
    parser.add_argument("--examples", type=int, default=10**9, help="inputs per property")
    parser.add_argument("--seconds", type=float, default=60.0, help="total time budget")
    parser.add_argument("--only", help="run only the property with this name")
    parser.add_argument("--atheris", action="store_true", help="drive with atheris (libFuzzer)")
    parser.add_argument("--verbose", action="store_true", help="print progress per round")
    args = parser.parse_args(argv)
    chosen = [p for p in properties if args.only in (None, p.name)]
    if not chosen:
        parser.error(f"no property {args.only!r}; have {', '.join(p.name for p in properties)}")
    share = args.seconds / len(chosen)
    if args.atheris:
        if len(chosen) != 1:
            parser.error("--atheris runs one property: add --only NAME")
        run_atheris(target, chosen[0].name, examples=args.examples, seconds=args.seconds)
    failed = 0
    for prop in chosen:
        outcome = run(prop, examples=args.examples, seconds=share, verbose=args.verbose)
        verdict = "ok" if outcome.error is None else f"FAILED: {outcome.error!r}"
        print(f"{target}.{prop.name}: {outcome.tried} inputs in {outcome.seconds:.0f}s, {verdict}")
        if outcome.error is not None:
            failed += 1
            print("".join(traceback.format_exception(outcome.error)), file=sys.stderr)
    return 1 if failed else 0
