"""Prometheus metrics: requests and errors by model and status, tokens, latencies, queue depth, loaded models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from modelrepo.mirror import Mirror
    from serving.registry import Registry

PREFIX = "lora_serve"
# Seconds; the tiny model answers in milliseconds, a 7B model on CPU in tens of seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector(Collector):
    """Read at scrape time from the live routing table, so it never goes stale."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting or running on the model's engine", labels=["model"]
        )
        running = GaugeMetricFamily(f"{PREFIX}_running_requests", "Requests in the continuous batch", labels=["model"])
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded", "1 for each served name and its live version", labels=["model", "version", "kind"]
        )
        failed = GaugeMetricFamily(
            f"{PREFIX}_model_load_failed", "1 for each version that failed to load",
            labels=["model", "version", "error"],
        )
        cancelled = CounterMetricFamily(
            f"{PREFIX}_cancelled_requests", "Requests cancelled because their client went away", labels=["model"]
        )
        switches = CounterMetricFamily(
            f"{PREFIX}_adapter_switches", "Adapter changes on the model's engine", labels=["model"]
        )
        for name, route in sorted(self.registry.table.items()):
            depth.add_metric([name], route.engine.pending)
            if route.adapter is None:  # engine-wide counts, reported once under the model's own name
                cancelled.add_metric([name], route.engine.cancelled)
                switches.add_metric([name], route.engine.switches)
            running.add_metric([name], route.engine.running)
            loaded.add_metric([name, str(route.entry.version), route.entry.kind], 1)
        for name, f in sorted(self.registry.failures.items()):
            failed.add_metric([name, str(f.version), f.message[:200]], 1)
        ready = GaugeMetricFamily(f"{PREFIX}_ready", "1 once the first load of the repository is done")
        ready.add_metric([], 1 if self.registry.ready else 0)
        engines = GaugeMetricFamily(
            f"{PREFIX}_engines",
            "Pipelines in memory: serving (live), built ahead for a staged version, or retired and finishing",
            labels=["state"],
        )
        for state, count in self.registry.engine_counts().items():
            engines.add_metric([state], count)
        builds = CounterMetricFamily(
            f"{PREFIX}_engine_builds", "Pipelines compiled for the model's versions and adapter sets", labels=["model"]
        )
        for name, count in sorted(self.registry.engine_builds.items()):
            builds.add_metric([name], count)
        live = CounterMetricFamily(
            f"{PREFIX}_live_adapter_updates", "Adapter sets changed on the model's running engine, with no compile",
            labels=["model"],
        )
        for name, count in sorted(self.registry.live_adapter_updates.items()):
            live.add_metric([name], count)
        staged = GaugeMetricFamily(
            f"{PREFIX}_staged_ready", "1 when the staged version's engine is built: promoting it swaps at once",
            labels=["model", "version"],
        )
        for name, st in sorted(self.registry.staged.items()):
            staged.add_metric([name, str(st.version)], 1 if st.error is None else 0)
        yield from (depth, running, loaded, failed, ready, cancelled, switches, engines, builds, live, staged)
        if self.registry.mirror is not None:
            yield from _store_metrics(self.registry.mirror)


def _store_metrics(mirror: Mirror) -> Iterator[Metric]:
    """How current the local copy of a bucket is: what an alert on a replica that lost its store reads."""
    stale = GaugeMetricFamily(f"{PREFIX}_store_stale", "1 while the last poll of the repository's store failed")
    stale.add_metric([], 1 if mirror.stale else 0)
    age = GaugeMetricFamily(
        f"{PREFIX}_store_last_sync_age_seconds", "Seconds since a poll last reached the store (-1: never)"
    )
    seconds = mirror.age()
    age.add_metric([], -1.0 if seconds is None else seconds)
    polls = CounterMetricFamily(f"{PREFIX}_store_polls", "Polls of the store's index, by outcome", labels=["outcome"])
    polls.add_metric(["ok"], mirror.polls - mirror.failed_polls)
    polls.add_metric(["failed"], mirror.failed_polls)
    yield from (stale, age, polls)


class Metrics:
    """The server's metrics on a registry of its own (several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.prometheus = CollectorRegistry()
        r = self.prometheus
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by model, endpoint and status", ["model", "endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(f"{PREFIX}_errors", "Error responses by model and code", ["model", "code"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From request to first token", ["model"], buckets=_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds", "From request to last token", ["model"], buckets=_BUCKETS, registry=r
        )

    def watch(self, registry: Registry) -> None:
        self.prometheus.register(_EngineCollector(registry))
