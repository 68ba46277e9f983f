"""Run ``examples/expose_port.py`` so that the Ctrl-C lands at the worst moment.

Once the example has printed its ``Ctrl-C`` line, the first task that enters
:meth:`trio.Event.wait` gets SIGINT between registering itself with the event and parking.
A KeyboardInterrupt raised there leaves the task registered but not waiting, and trio fails
with an internal error when the event is set (the example used to let SIGINT raise
KeyboardInterrupt); ``tests/test_cli.py`` checks the example stops cleanly all the same.

Usage: ``python signal_mid_wait.py EXAMPLE ARGS...``; the example's exit status is ours.
"""

from __future__ import annotations

import builtins
import runpy
import signal
import sys
from types import FrameType
from typing import Any

import trio

WAIT_CODE = trio.Event.wait.__code__
state = {"armed": False, "fired": False}


def tracer(frame: FrameType, event: str, arg: object) -> Any:
    if state["fired"]:
        return None
    if frame.f_code is WAIT_CODE:
        if event == "line" and state["armed"]:
            self = frame.f_locals.get("self")
            task = frame.f_locals.get("task")
            registered = task in getattr(self, "_tasks", ())
            # Where trio's KeyboardInterrupt protection is on, SIGINT waits for a checkpoint.
            if task is not None and registered and not trio.lowlevel.currently_ki_protected():
                state["fired"] = True
                says = f"signal_mid_wait: SIGINT inside Event.wait, in {task.name}"
                print(says, file=sys.stderr, flush=True)
                signal.raise_signal(signal.SIGINT)
        return tracer
    return None if frame.f_code.co_filename == __file__ else tracer


_print = builtins.print


def arming_print(*args: Any, **kwargs: Any) -> None:
    _print(*args, **kwargs)
    if args and str(args[0]).startswith("Ctrl-C"):
        state["armed"] = True


if __name__ == "__main__":
    example, *rest = sys.argv[1:]
    sys.argv = [example, *rest]
    builtins.print = arming_print
    sys.settrace(tracer)
    runpy.run_path(example, run_name="__main__")
