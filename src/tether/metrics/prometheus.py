"""Prometheus metrics of Lifecycles, named after OpenTelemetry's database-client conventions.

``register(lc)`` adds *lc* to the one tether collector of a registry (the default one unless
given), creating it on first use; every scrape reads ``lc.stats()``, so nothing is counted twice
and nothing runs per request. Names follow OpenTelemetry's ``db.client.connection.*`` metrics
(dots as underscores, as the OpenTelemetry Prometheus exporter writes them) where they apply;
what those do not cover is ``tether_*``. The label ``pool_name`` is the resource's name.
``db_client_connection_count``, ``_max``, ``_pending_requests``, ``_create_time_seconds``,
``_timeouts`` and ``tether_connection_discarded`` are per connection pool, as the conventions
define them: only for the driver pools the integrations open (``lc.stats().pools``), so a sum
of ``db_client_connection_count`` is the pools' connections. A pool's timeouts include those
of the resources that draw from it alone (its connection resource's waits for a connection);
every resource's values open now and timeouts are ``tether_resource_in_use`` and
``tether_resource_timeouts_total``.

Any number of Lifecycles may be registered on one registry; registering one again does nothing.
The collector holds them weakly: one garbage-collected (a finished test's) drops out. A scrape
reports the Lifecycles not closed; when all are closed, the one registered last (its final
figures). Where two report the same series (resources of the same name and scope, and the
Lifecycle-wide ``tether_units_*``), their values are added up, except ``tether_resource_down``
and ``tether_lifecycle_running``, which are the highest (1 while any is down, or running).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
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

from . import pool_timeouts

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._stats import Stats

__all__ = ["TetherCollector", "register"]


def _add(a: float, b: float) -> float:
    return a + b


class _Family:
    """One metric family's samples by labels: a series two Lifecycles report is combined."""

    def __init__(
        self,
        family: GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily,
        combine: Callable[[float, float], float] = _add,
    ) -> None:
        self.family = family
        self.combine = combine
        self.values: dict[tuple[str, ...], tuple[float, ...]] = {}

    def add(self, labels: list[str], *values: float) -> None:
        key = tuple(labels)
        old = self.values.get(key)
        self.values[key] = values if old is None else tuple(map(self.combine, old, values))

    def build(self) -> Metric:
        for labels, values in self.values.items():
            if isinstance(self.family, SummaryMetricFamily):
                count, total = values
                self.family.add_metric(list(labels), count_value=int(count), sum_value=total)
            else:
                self.family.add_metric(list(labels), values[0])
        return self.family


class _Families:
    """The metric families of one scrape, filled from the stats of each Lifecycle reported."""

    def __init__(self) -> None:
        labels = ["pool_name", "scope"]
        self.count = _Family(
            GaugeMetricFamily(
                "db_client_connection_count",
                "Connections of the driver's pool, used and idle.",
                labels=[*labels, "state"],
            )
        )
        self.in_use = _Family(
            GaugeMetricFamily(
                "tether_resource_in_use",
                "Values of the resource open now.",
                labels=labels,
            )
        )
        self.max_used = _Family(
            GaugeMetricFamily(
                "tether_resource_max_in_use",
                "Most values of the resource open at once.",
                labels=labels,
            )
        )
        self.timeouts = _Family(
            CounterMetricFamily(
                "db_client_connection_timeouts",
                "Waits for a connection of the driver's pool that ran out of time, and other "
                "opens or closes that did, of the pool and of the resources drawing from it alone.",
                labels=labels,
            )
        )
        self.resource_timeouts = _Family(
            CounterMetricFamily(
                "tether_resource_timeouts",
                "Opens or closes of the resource that ran out of time.",
                labels=labels,
            )
        )
        self.wait = _Family(
            SummaryMetricFamily(
                "tether_resource_wait_time_seconds",
                "Time to open (acquire) a value of the resource.",
                labels=labels,
            )
        )
        self.use = _Family(
            SummaryMetricFamily(
                "tether_resource_use_time_seconds",
                "Time between opening and closing a value of the resource.",
                labels=labels,
            )
        )
        self.errors = _Family(
            CounterMetricFamily(
                "tether_resource_errors",
                "Failed opens and failed closes of the resource.",
                labels=[*labels, "phase"],
            )
        )
        self.leaks = _Family(
            CounterMetricFamily(
                "tether_resource_leaks",
                "Values held past the leak threshold or used after their scope closed.",
                labels=labels,
            )
        )
        self.pool_max = _Family(
            GaugeMetricFamily(
                "db_client_connection_max",
                "The most connections the driver's pool may open.",
                labels=labels,
            )
        )
        self.pending = _Family(
            GaugeMetricFamily(
                "db_client_connection_pending_requests",
                "Requests waiting for a connection from the driver's pool.",
                labels=labels,
            )
        )
        self.create = _Family(
            SummaryMetricFamily(
                "db_client_connection_create_time_seconds",
                "Time the driver's pool took to make a connection.",
                labels=labels,
            )
        )
        self.discarded = _Family(
            CounterMetricFamily(
                "tether_connection_discarded",
                "Connections of the driver's pool closed instead of used again: broken, or in a "
                "state not known (lost by the server, interrupted mid-operation, not reset).",
                labels=labels,
            )
        )
        self.down = _Family(
            GaugeMetricFamily(
                "tether_resource_down",
                "1 while an app resource declared required=False is not open (the app runs "
                "without it), else 0.",
                labels=labels,
            ),
            max,
        )
        self.units = _Family(
            GaugeMetricFamily("tether_units_in_flight", "Units of work (requests, jobs) in flight.")
        )
        self.refused = _Family(
            CounterMetricFamily(
                "tether_units_refused", "Units of work refused while shutting down."
            )
        )
        self.running = _Family(
            GaugeMetricFamily(
                "tether_lifecycle_running", "1 while the app scope runs (ready), else 0."
            ),
            max,
        )

    def all(self) -> list[_Family]:
        return [
            *(self.count, self.pool_max, self.pending, self.create, self.discarded),
            *(self.timeouts, self.in_use, self.max_used, self.resource_timeouts),
            *(self.wait, self.use, self.errors, self.leaks),
            *(self.down, self.units, self.refused, self.running),
        ]

    def add(self, lc: Lifecycle, stats: Stats) -> None:
        for name, r in stats.resources.items():
            key = [name, r.scope]
            if r.scope == "app":
                self.down.add(key, 1.0 if r.down else 0.0)
            self.in_use.add(key, r.in_use)
            self.max_used.add(key, r.max_in_use)
            self.resource_timeouts.add(key, r.timeouts)
            self.wait.add(key, r.opened, r.wait_time)
            self.use.add(key, r.closed, r.hold_time)
            self.errors.add([*key, "open"], r.open_errors)
            self.errors.add([*key, "close"], r.close_errors)
            self.leaks.add(key, r.leaks)
        timeouts = pool_timeouts(lc, stats)
        for name, pool in stats.pools.items():  # a driver's pool: its own connections
            key = [name, stats.resources[name].scope]
            self.count.add([*key, "used"], pool.in_use if pool.in_use is not None else 0)
            if pool.idle is not None:
                self.count.add([*key, "idle"], pool.idle)
            if pool.max is not None:
                self.pool_max.add(key, pool.max)
            if pool.waiting is not None:
                self.pending.add(key, pool.waiting)
            if pool.created is not None and pool.create_time is not None:
                self.create.add(key, pool.created, pool.create_time)
            if pool.discarded is not None:
                self.discarded.add(key, pool.discarded)
            self.timeouts.add(key, timeouts[name])
        self.units.add([], stats.units_in_flight)
        self.refused.add([], stats.units_refused)
        self.running.add([], 1.0 if stats.state == "running" else 0.0)


class TetherCollector(Collector):
    """Reads the stats of its Lifecycles at each scrape; holds them weakly.

    ``register(lc)`` makes one per registry and adds each Lifecycle to it. A scrape reports
    those not closed (when all are closed, the one added last); a series two of them report is
    their sum (``tether_resource_down`` and ``tether_lifecycle_running``: the highest).
    """

    def __init__(self, lc: Lifecycle | None = None) -> None:
        self._lock = threading.Lock()
        self._refs: list[weakref.ref[Lifecycle]] = []
        if lc is not None:
            self.add(lc)

    def add(self, lc: Lifecycle) -> bool:
        """Report *lc* too; False if it was already."""
        with self._lock:
            alive = [ref for ref in self._refs if ref() is not None]
            found = any(ref() is lc for ref in alive)
            if not found:
                alive.append(weakref.ref(lc))
            self._refs = alive
            return not found

    @property
    def lifecycles(self) -> list[Lifecycle]:
        """The Lifecycles added and still alive, in the order added."""
        return [lc for ref in self._refs if (lc := ref()) is not None]

    def describe(self) -> list[Metric]:
        """The families (without samples), for the registry's check of duplicate names."""
        return [family.family for family in _Families().all()]

    def collect(self) -> Iterator[Metric]:
        every = [(lc, lc.stats()) for lc in self.lifecycles]
        reported = [(lc, stats) for lc, stats in every if stats.state != "closed"] or every[-1:]
        if not reported:
            return
        families = _Families()
        for lc, stats in reported:
            families.add(lc, stats)
        for family in families.all():
            yield family.build()


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, TetherCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def _registered(collector: TetherCollector, registry: CollectorRegistry) -> bool:
    """Whether *collector* is still on *registry* (not taken off with ``unregister``)."""
    on_registry = getattr(registry, "_collector_to_names", None)
    return on_registry is None or collector in on_registry


def register(lc: Lifecycle, registry: CollectorRegistry | None = None) -> TetherCollector:
    """Report *lc*'s stats on *registry* (default: the global one) and return the registry's
    tether collector, registered there on first use. Any number of Lifecycles may share a
    registry; registering *lc* again does nothing."""
    target = registry if registry is not None else REGISTRY
    with _collectors_lock:
        collector = _collectors.get(target)
        if collector is not None and _registered(collector, target):
            collector.add(lc)
            return collector
        collector = TetherCollector(lc)
        target.register(collector)
        _collectors[target] = collector
        return collector
