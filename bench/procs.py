"""Run a command and measure its wall time and peak memory (the summed RSS of its whole process tree)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tasks.resources import tree_memory

SAMPLE_S = 0.1


@dataclass(frozen=True)
class Measured:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    peak_anon_mb: float = 0.0  # of which not file-backed (memory-mapped weights count in RSS, but can be dropped)


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 900) -> Measured:
    """Run `cmd`, sampling its process tree's RSS every 0.1 s; stderr goes to `log`, stdout is returned.

    Children count because a flow run starts a Prefect server of its own: what the user pays for.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        ps = psutil.Process(proc.pid)
        peak = peak_anon = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_anon
            while not stop.is_set():
                rss, anon = tree_memory(ps)
                peak, peak_anon = max(peak, rss), max(peak_anon, anon)
                stop.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    return Measured(proc.returncode, wall, peak / 2**20, out.decode(errors="replace"), peak_anon / 2**20)
