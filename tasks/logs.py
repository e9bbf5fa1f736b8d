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


def artifact_key(key: str) -> str:
    """A Prefect artifact key from any name: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in key.lower())


class Progress:
    """A Prefect progress artifact that a flow moves along its steps, and each step's wall time and peak memory."""

    def __init__(self, what: str, steps: list[str], key: str) -> None:
        from prefect.artifacts import create_progress_artifact

        from tasks.resources import StageMeter

        self.what, self.steps, self.done = what, steps, 0
        self.key = artifact_key(key)
        self.id = create_progress_artifact(0.0, description=f"{what}: {steps[0]}")
        self.meter = StageMeter()

    def step(self, finished: str) -> None:
        """Mark `finished` done, log what it cost, and say what runs next."""
        from prefect.artifacts import update_progress_artifact

        stage = self.meter.done(finished)
        estimate = "" if stage.estimate_gb is None else f" (estimated {stage.estimate_gb:.2f} GB)"
        step_logger(__name__).info(
            "%s: %s took %.1f s, peak memory %.2f GB (%.2f GB not file-backed)%s",
            self.what,
            finished,
            stage.seconds,
            stage.peak_rss_gb,
            stage.peak_anon_gb,
            estimate,
        )
        self.done = self.steps.index(finished) + 1
        following = self.steps[self.done] if self.done < len(self.steps) else "done"
        update_progress_artifact(self.id, 100.0 * self.done / len(self.steps), description=f"{self.what}: {following}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop measuring; the stages' figures (done or failed) as a markdown artifact under a stable key."""
        from prefect.artifacts import create_markdown_artifact

        self.meter.close()
        create_markdown_artifact(self.meter.markdown(f"{self.what}: time and memory per stage"), key=self.key)
