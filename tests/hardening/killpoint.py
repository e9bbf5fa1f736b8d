"""Run the build_model command line and SIGKILL the process at a chosen point inside one of its steps.

    python -m tests.hardening.killpoint MODULE:FUNCTION WHEN -- <python -m flows.build_model arguments>

WHEN is `enter` (kill as FUNCTION is called), `exit` (kill as it returns), or for a context manager
`inside` (kill at the end of its block, before it exits) or `after` (kill once it has exited).
FUNCTION may be a Prefect task: its function is wrapped, and the task told to refresh its cache, so
the kill fires inside the task's run even when an earlier run left a cached result (on a cache hit
the function would not run at all).
The kill is a real SIGKILL of the flow's own process: no finally block, no atexit, no Prefect
state change runs, exactly as when the machine or the OOM killer stops a run. Before dying, the
process writes the kill point to $KILLPOINT_MARK, with the name of the task run it fired in
("... in task run fetch-base"), so the test knows where the kill happened.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import Task


def _die(where: str) -> None:
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is not None and context.task_run is not None:
        where += f" in task run {context.task_run.name}"
    mark = os.environ.get("KILLPOINT_MARK")
    if mark:
        Path(mark).write_text(where)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(target: str, when: str) -> None:
    """Replace MODULE.FUNCTION by a wrapper that kills the process at `when`."""
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    original: Callable[..., Any] = getattr(module, name)
    if isinstance(original, Task):
        # The flow imported the task object itself: wrap its function in place.
        task = original
        task.fn = _killing(target, when, task.fn)
        task.refresh_cache = True
        return
    if when in ("inside", "after"):

        @contextlib.contextmanager
        def wrapper_cm(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with original(*args, **kwargs) as value:
                yield value
                if when == "inside":
                    _die(f"{target} inside")
            _die(f"{target} after")

        setattr(module, name, wrapper_cm)
        return

    setattr(module, name, _killing(target, when, original))


def _killing(target: str, when: str, original: Callable[..., Any]) -> Callable[..., Any]:
    if when not in ("enter", "exit"):
        raise SystemExit(f"{target}: a function is killed at enter or exit, not {when}")

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "enter":
            _die(f"{target} enter")
        result = original(*args, **kwargs)
        _die(f"{target} exit")
        return result

    return wrapper


def main(argv: list[str]) -> int:
    target, when, sep, *flow_args = argv
    if sep != "--" or when not in ("enter", "exit", "inside", "after"):
        raise SystemExit(__doc__)
    arm(target, when)
    from flows.build_model import main as build_model

    return build_model(flow_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
