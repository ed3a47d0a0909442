"""Prometheus metrics of a Lifecycle, named after OpenTelemetry's database-client conventions.

``register(lc)`` adds a collector to a registry (the default one unless given); every scrape
reads ``lc.stats()``, so nothing is counted twice and nothing runs per request. Names follow
OpenTelemetry's ``db.client.connection.*`` metrics (dots as underscores, as the OpenTelemetry
Prometheus exporter writes them), with ``pool_name`` the resource's name; what those do not
cover is ``tether_*``. For a driver's pool opened by an integration (``lc.stats().pools``),
``db_client_connection_count`` is the pool's own connections, ``used`` and ``idle``, beside
``db_client_connection_max`` and ``db_client_connection_pending_requests``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
        SummaryMetricFamily,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.metrics.prometheus needs prometheus-client: pip install 'tether[prometheus]'"
    raise ImportError(msg) from exc

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle

__all__ = ["TetherCollector", "register"]


class TetherCollector(Collector):
    """Reads ``lc.stats()`` at each scrape."""

    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc

    def collect(self) -> Iterator[Metric]:
        stats = self.lc.stats()
        labels = ["pool_name", "scope"]
        count = GaugeMetricFamily(
            "db_client_connection_count",
            "Values of the resource currently open (in use), by resource.",
            labels=[*labels, "state"],
        )
        max_used = GaugeMetricFamily(
            "tether_resource_max_in_use", "Most values of the resource open at once.", labels=labels
        )
        timeouts = CounterMetricFamily(
            "db_client_connection_timeouts",
            "Opens or closes of the resource that ran out of time.",
            labels=labels,
        )
        wait = SummaryMetricFamily(
            "db_client_connection_wait_time_seconds",
            "Time to open (acquire) a value of the resource.",
            labels=labels,
        )
        use = SummaryMetricFamily(
            "db_client_connection_use_time_seconds",
            "Time between opening and closing a value of the resource.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "tether_resource_errors",
            "Failed opens and failed closes of the resource.",
            labels=[*labels, "phase"],
        )
        leaks = CounterMetricFamily(
            "tether_resource_leaks",
            "Values held past the leak threshold or used after their scope closed.",
            labels=labels,
        )
        pool_max = GaugeMetricFamily(
            "db_client_connection_max",
            "The most connections the driver's pool may open.",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "db_client_connection_pending_requests",
            "Requests waiting for a connection from the driver's pool.",
            labels=labels,
        )
        create = SummaryMetricFamily(
            "db_client_connection_create_time_seconds",
            "Time the driver's pool took to make a connection.",
            labels=labels,
        )
        discarded = CounterMetricFamily(
            "tether_connection_discarded",
            "Connections of the driver's pool closed instead of used again: broken, or in a "
            "state not known (lost by the server, interrupted mid-operation, not reset).",
            labels=labels,
        )
        down = GaugeMetricFamily(
            "tether_resource_down",
            "1 while an app resource declared required=False is not open (the app runs "
            "without it), else 0.",
            labels=labels,
        )
        for name, r in stats.resources.items():
            key = [name, r.scope]
            if r.scope == "app":
                down.add_metric(key, 1.0 if r.down else 0.0)
            pool = stats.pools.get(name)
            if pool is None:
                count.add_metric([*key, "used"], r.in_use)
            else:  # a driver's pool: its own connections, used and idle
                count.add_metric([*key, "used"], pool.in_use if pool.in_use is not None else 0)
                if pool.idle is not None:
                    count.add_metric([*key, "idle"], pool.idle)
                if pool.max is not None:
                    pool_max.add_metric(key, pool.max)
                if pool.waiting is not None:
                    pending.add_metric(key, pool.waiting)
                if pool.created is not None and pool.create_time is not None:
                    create.add_metric(key, count_value=pool.created, sum_value=pool.create_time)
                if pool.discarded is not None:
                    discarded.add_metric(key, pool.discarded)
            max_used.add_metric(key, r.max_in_use)
            timeouts.add_metric(key, r.timeouts)
            wait.add_metric(key, count_value=r.opened, sum_value=r.wait_time)
            use.add_metric(key, count_value=r.closed, sum_value=r.hold_time)
            errors.add_metric([*key, "open"], r.open_errors)
            errors.add_metric([*key, "close"], r.close_errors)
            leaks.add_metric(key, r.leaks)
        yield from (count, pool_max, pending, create, discarded)
        yield from (max_used, timeouts, wait, use, errors, leaks, down)
        units = GaugeMetricFamily(
            "tether_units_in_flight", "Units of work (requests, jobs) in flight."
        )
        units.add_metric([], stats.units_in_flight)
        refused = CounterMetricFamily(
            "tether_units_refused", "Units of work refused while shutting down."
        )
        refused.add_metric([], stats.units_refused)
        state = GaugeMetricFamily(
            "tether_lifecycle_running", "1 while the app scope runs (ready), else 0."
        )
        state.add_metric([], 1.0 if stats.state == "running" else 0.0)
        yield from (units, refused, state)


def register(lc: Lifecycle, registry: CollectorRegistry | None = None) -> TetherCollector:
    """Register a collector of *lc*'s stats on *registry* (default: the global one)."""
    collector = TetherCollector(lc)
    (registry or REGISTRY).register(collector)
    return collector
