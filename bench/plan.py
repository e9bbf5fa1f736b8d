"""What a run measures (full or smoke) and the shape of a figure: a value, its baseline from the same run, a ratio."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plan:
    smoke: bool
    prompt_tokens: int  # per prompt, BOS excluded
    max_tokens: int  # new tokens per request, EOS ignored
    concurrencies: tuple[int, ...]
    requests: dict[int, int]  # concurrency -> requests per measurement
    repeats: int  # pairs of runs per figure, the two sides alternating which goes first
    overhead_repeats: int  # pairs per serving-overhead figure: its gap to the target is smaller than the noise
    reload_max_tokens: int  # the reload benchmark's requests are short, so many of them cross the swap
    out: Path
    work: Path  # scratch: repositories, logs (removed at the end unless --keep)

    @staticmethod
    def make(smoke: bool, out: Path, work: Path) -> Plan:
        if smoke:
            return Plan(True, 16, 8, (1, 4, 16), {1: 1, 4: 4, 16: 16}, 1, 1, 4, out, work)
        # 64 new tokens, not 128: the whole run, models included, must fit in 20 minutes on 2 cores.
        # 7 pairs for the serving overhead: one pair's ratio moves by +-15% on this machine (bench/ANALYSIS.md).
        return Plan(False, 64, 64, (1, 4, 16), {1: 3, 4: 8, 16: 16}, 3, 7, 16, out, work)

    def describe(self) -> dict[str, Any]:
        body = asdict(self)
        body["out"], body["work"] = str(self.out), str(self.work)
        body["requests"] = {str(k): v for k, v in self.requests.items()}
        return body


@dataclass
class Figure:
    """One row of RESULTS.md. `ratio` is value / baseline; `target` says which way is good and how far."""

    id: str
    title: str
    value: float | None
    baseline: float | None
    unit: str
    baseline_name: str
    target: str = ""  # e.g. ">= 0.95 (ratio)" or "<= 5 ms added"
    met: bool | None = None  # None: no target
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return body


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (value, baseline) pair whose ratio is the median. Each pair ran back to back, so a machine whose speed
    drifts over minutes moves both its sides, where medians of each side taken apart would mix minutes."""
    pairs = [p for p in pairs if math.isfinite(p[0]) and math.isfinite(p[1]) and p[1]]
    if not pairs:
        return math.nan, math.nan
    return sorted(pairs, key=lambda p: p[0] / p[1])[(len(pairs) - 1) // 2]
