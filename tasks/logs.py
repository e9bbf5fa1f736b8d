"""The step logger: Prefect's run logger inside a run (shown in the UI), the standard logger outside one."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any


def step_logger(name: str) -> logging.Logger | logging.LoggerAdapter[Any]:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)


@contextlib.contextmanager
def heartbeat(log: logging.Logger | logging.LoggerAdapter[Any], what: str, every_s: float = 30.0) -> Iterator[None]:
    """Log "still <what>" every `every_s` seconds while a long library call (export, download) runs silently."""
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("still %s (%.0f s)", what, time.monotonic() - start)

    thread = threading.Thread(target=beat, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        log.info("%s took %.1f s", what, time.monotonic() - start)


class Progress:
    """A Prefect progress artifact that a flow moves along its steps, so the UI shows how far a run is."""

    def __init__(self, what: str, steps: list[str]) -> None:
        from prefect.artifacts import create_progress_artifact

        self.what, self.steps, self.done = what, steps, 0
        self.id = create_progress_artifact(0.0, description=f"{what}: {steps[0]}")

    def step(self, finished: str) -> None:
        """Mark `finished` done and say what runs next."""
        from prefect.artifacts import update_progress_artifact

        self.done = self.steps.index(finished) + 1
        following = self.steps[self.done] if self.done < len(self.steps) else "done"
        update_progress_artifact(self.id, 100.0 * self.done / len(self.steps), description=f"{self.what}: {following}")
