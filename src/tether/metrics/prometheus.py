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
The collector holds them weakly: one garbage-collected (a finished test's) drops out. A scrape's
gauges (what is open now, running, down) are those of the Lifecycles not closed; when all are
closed, the one registered last (its final figures). Its counters and summaries never go back:
each is the sum over every Lifecycle the collector has read, those closed or garbage-collected
since included (their final figures, kept per series), so one of two apps stopping, or an app
built again in the same process, is no counter reset. Where two report the same series
(resources of the same name and scope, and the Lifecycle-wide ``tether_units_*``), their values
are added up, except ``tether_resource_down`` and ``tether_lifecycle_running``, which are the
highest (1 while any is down, or running).

With ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's multiprocess mode, for several
worker processes), the same series are prometheus-client metrics instead, in its files: each
worker writes its figures every ``REFRESH_INTERVAL`` seconds while its Lifecycle runs, at every
sweep while it shuts down, at each scrape of a registry it was registered on, and at a normal
exit; ``MultiProcessCollector`` adds them up across workers as it does the app's own (gauges
``livesum``; ``tether_resource_down`` and ``tether_lifecycle_running`` ``livemax``). Nothing runs
per request there either.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Summary
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
        SummaryMetricFamily,
    )
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.metrics.prometheus needs prometheus-client: pip install 'tether[prometheus]'"
    raise ImportError(msg) from exc

from .._lifecycle import State
from . import Totals, pool_timeouts

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._stats import Stats

__all__ = ["REFRESH_INTERVAL", "TetherCollector", "register"]

log = logging.getLogger("tether")


def _add(a: float, b: float) -> float:
    return a + b


class _Family:
    """One metric family's samples by labels: a series two Lifecycles report is combined."""

    def __init__(
        self,
        kind: type[GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily],
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        combine: Callable[[float, float], float] = _add,
    ) -> None:
        self.family = kind(name, documentation, labels=list(labels))
        self.labels = tuple(labels)
        self.combine = combine
        self.values: dict[tuple[str, ...], tuple[float, ...]] = {}

    def live(self) -> Counter | Gauge | Summary:
        """The prometheus-client metric that stands for this family in multiprocess mode."""
        name, doc, labels = self.family.name, self.family.documentation, self.labels
        if isinstance(self.family, CounterMetricFamily):
            return Counter(name, doc, labels, registry=None)
        if isinstance(self.family, SummaryMetricFamily):
            return Summary(name, doc, labels, registry=None)
        # Across workers as across Lifecycles: added up, or the highest; a worker gone
        # (prometheus-client's mark_process_dead) drops out.
        mode: Literal["livemax", "livesum"] = "livemax" if self.combine is max else "livesum"
        return Gauge(name, doc, labels, registry=None, multiprocess_mode=mode)

    @property
    def cumulative(self) -> bool:
        """Whether its series only grow (a counter, a summary's count and sum)."""
        return not isinstance(self.family, GaugeMetricFamily)

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
            GaugeMetricFamily,
            "db_client_connection_count",
            "Connections of the driver's pool, used and idle.",
            labels=[*labels, "state"],
        )
        self.in_use = _Family(
            GaugeMetricFamily,
            "tether_resource_in_use",
            "Values of the resource open now.",
            labels=labels,
        )
        self.max_used = _Family(
            GaugeMetricFamily,
            "tether_resource_max_in_use",
            "Most values of the resource open at once.",
            labels=labels,
        )
        self.timeouts = _Family(
            CounterMetricFamily,
            "db_client_connection_timeouts",
            "Waits for a connection of the driver's pool that ran out of time, and other "
            "opens or closes that did, of the pool and of the resources drawing from it alone.",
            labels=labels,
        )
        self.resource_timeouts = _Family(
            CounterMetricFamily,
            "tether_resource_timeouts",
            "Opens or closes of the resource that ran out of time.",
            labels=labels,
        )
        self.wait = _Family(
            SummaryMetricFamily,
            "tether_resource_wait_time_seconds",
            "Time to open (acquire) a value of the resource.",
            labels=labels,
        )
        self.use = _Family(
            SummaryMetricFamily,
            "tether_resource_use_time_seconds",
            "Time between opening and closing a value of the resource.",
            labels=labels,
        )
        self.errors = _Family(
            CounterMetricFamily,
            "tether_resource_errors",
            "Failed opens and failed closes of the resource.",
            labels=[*labels, "phase"],
        )
        self.leaks = _Family(
            CounterMetricFamily,
            "tether_resource_leaks",
            "Values held past the leak threshold or used after their scope closed.",
            labels=labels,
        )
        self.pool_max = _Family(
            GaugeMetricFamily,
            "db_client_connection_max",
            "The most connections the driver's pool may open.",
            labels=labels,
        )
        self.pending = _Family(
            GaugeMetricFamily,
            "db_client_connection_pending_requests",
            "Requests waiting for a connection from the driver's pool.",
            labels=labels,
        )
        self.create = _Family(
            SummaryMetricFamily,
            "db_client_connection_create_time_seconds",
            "Time the driver's pool took to make a connection.",
            labels=labels,
        )
        self.discarded = _Family(
            CounterMetricFamily,
            "tether_connection_discarded",
            "Connections of the driver's pool closed instead of used again: broken, or in a "
            "state not known (lost by the server, interrupted mid-operation, not reset).",
            labels=labels,
        )
        self.down = _Family(
            GaugeMetricFamily,
            "tether_resource_down",
            "1 while an app resource declared required=False is not open (the app runs "
            "without it), else 0.",
            labels=labels,
            combine=max,
        )
        self.units = _Family(
            GaugeMetricFamily, "tether_units_in_flight", "Units of work (requests, jobs) in flight."
        )
        self.refused = _Family(
            CounterMetricFamily,
            "tether_units_refused",
            "Units of work refused while shutting down.",
        )
        self.running = _Family(
            GaugeMetricFamily,
            "tether_lifecycle_running",
            "1 while the app scope runs (ready), else 0.",
            combine=max,
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


class _Lifecycles:
    """Lifecycles held weakly, in the order added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: list[weakref.ref[Lifecycle]] = []

    def add(self, lc: Lifecycle) -> bool:
        with self._lock:
            alive = [ref for ref in self._refs if ref() is not None]
            found = any(ref() is lc for ref in alive)
            if not found:
                alive.append(weakref.ref(lc))
            self._refs = alive
            return not found

    def __call__(self) -> list[Lifecycle]:
        return [lc for ref in self._refs if (lc := ref()) is not None]


_Key = tuple[int, tuple[str, ...]]  # a family's index in _Families.all(), a series' labels


def _pool_counts() -> frozenset[int]:
    """The families of a driver pool's own counts (since it opened: connections made, and
    discarded), by index."""
    families = _Families()
    own = (families.create, families.discarded)
    return frozenset(i for i, family in enumerate(families.all()) if family in own)


_POOL_COUNTS = _pool_counts()


class _Mirror:
    """tether's series as prometheus-client metrics, for its multiprocess mode: each worker
    writes them to its own files, and ``MultiProcessCollector`` adds them up at a scrape as it
    does the app's own metrics. Counters and summaries grow by what the stats grew since the
    last refresh (per Lifecycle); gauges are set to the stats of the Lifecycles not closed,
    0 once none reports them (a worker that stopped)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lifecycles = _Lifecycles()
        self.metrics = [family.live() for family in _Families().all()]
        self.pid = os.getpid()
        self.seen: weakref.WeakKeyDictionary[Lifecycle, dict[_Key, tuple[float, ...]]] = (
            weakref.WeakKeyDictionary()
        )
        self.gauges: dict[_Key, float] = {}
        self.refreshed = -math.inf

    def refresh_every(self, interval: float) -> None:
        """Refresh if the last refresh is *interval* seconds old (the sweeper's hook)."""
        if time.monotonic() - self.refreshed >= interval:
            self.refresh()

    def refresh(self, ended: Lifecycle | None = None) -> None:
        """Write the figures of this process; *ended*'s app scope is over (its gauges: 0)."""
        with self.lock:
            self.refreshed = time.monotonic()
            if os.getpid() != self.pid:  # forked (--preload): counts from the child's start
                self.pid = os.getpid()
                self.seen = weakref.WeakKeyDictionary()
                self.gauges = {}
            gauges = _Families()
            for lc in self.lifecycles():
                stats = lc.stats()
                families = _Families()
                families.add(lc, stats)
                if stats.state != "closed" and lc is not ended:
                    gauges.add(lc, stats)
                self._grow(self.seen.setdefault(lc, {}), families)
            self._set(gauges)

    def _grow(self, seen: dict[_Key, tuple[float, ...]], families: _Families) -> None:
        for index, family in enumerate(families.all()):
            if isinstance(family.family, GaugeMetricFamily):
                continue
            metric = self.metrics[index]
            for labels, values in family.values.items():
                old = seen.get((index, labels))
                seen[(index, labels)] = values
                grown = values
                if old is not None and all(v >= o for v, o in zip(values, old, strict=True)):
                    grown = tuple(v - o for v, o in zip(values, old, strict=True))
                child = metric.labels(*labels) if labels else metric  # the series, at 0 if new
                if isinstance(child, Counter):
                    if grown[0]:
                        child.inc(grown[0])
                elif isinstance(child, Summary) and grown[0]:
                    # Summary.observe adds one; these are many observations at once.
                    child._count.inc(grown[0])
                    child._sum.inc(grown[1])

    def _set(self, families: _Families) -> None:
        gauges: dict[_Key, float] = {}
        for index, family in enumerate(families.all()):
            if isinstance(family.family, GaugeMetricFamily):
                for labels, values in family.values.items():
                    gauges[(index, labels)] = values[0]
        for key in self.gauges:
            gauges.setdefault(key, 0.0)  # no longer reported (closed, gone): nothing open
        for (index, labels), value in gauges.items():
            if self.gauges.get((index, labels)) != value:
                metric = self.metrics[index]
                gauge = metric.labels(*labels) if labels else metric
                if isinstance(gauge, Gauge):
                    gauge.set(value)
        self.gauges = gauges


class _Refresh:
    """The sweeper's hook of a Lifecycle: refreshes the process's mirror every
    ``REFRESH_INTERVAL`` while the Lifecycle runs, at every sweep once it shuts down (the
    requests draining), and when the sweeper's task ends, after the app resources closed
    (the worker's last figures; on asyncio)."""

    def __init__(self, mirror: _Mirror, lc: Lifecycle) -> None:
        self.mirror = mirror
        self.lc = lc
        self.task: asyncio.Task[Any] | None = None

    def __call__(self, now: float) -> None:
        if self.lc.state is State.RUNNING:
            self.mirror.refresh_every(REFRESH_INTERVAL)
        else:
            self.mirror.refresh()
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not on asyncio (trio): the last figures are written at exit
            return
        if task is not None and task is not self.task:
            self.task = task  # the sweeper's, which ends with the app scope
            task.add_done_callback(self.ended)

    def ended(self, task: asyncio.Task[Any]) -> None:
        try:
            self.mirror.refresh(ended=self.lc)
        except Exception as exc:  # never in the way of a shutdown
            log.warning("tether: cannot write the last Prometheus figures: %s", exc)


REFRESH_INTERVAL = 1.0
"""Seconds between two refreshes of a worker's figures in multiprocess mode."""

_mirror: _Mirror | None = None


def _refresh_at_exit() -> None:
    """The worker's last figures (the Lifecycle closed by now: nothing open). A backup: the
    figures are written as the app scope ends (`_Refresh`). uvicorn never runs it after a
    SIGTERM: once its graceful shutdown is over it raises the signal again with its default
    action, which ends the process without ``atexit``."""
    if _mirror is not None:
        try:
            _mirror.refresh()
        except Exception as exc:  # pragma: no cover - never fail an exit
            log.debug("tether: cannot write the last Prometheus figures: %s", exc)


def _mirror_of(lc: Lifecycle) -> _Mirror:
    global _mirror
    if _mirror is None:
        _mirror = _Mirror()
        atexit.register(_refresh_at_exit)
    if _mirror.lifecycles.add(lc) and not any(isinstance(h, _Refresh) for h in lc._sweepers):
        lc._sweepers.append(_Refresh(_mirror, lc))
    return _mirror


def _multiprocess() -> bool:
    """Whether prometheus-client runs in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set)."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


class TetherCollector(Collector):
    """Reads the stats of its Lifecycles at each scrape; holds them weakly.

    ``register(lc)`` makes one per registry and adds each Lifecycle to it. A scrape's gauges
    are those of the Lifecycles not closed (when all are closed, the one added last); its
    counters and summaries add up every Lifecycle it has read, closed and garbage-collected
    ones included, so they never go back. A series two of them report is their sum
    (``tether_resource_down`` and ``tether_lifecycle_running``: the highest).

    In multiprocess mode (``multiprocess=True``) it reports nothing itself: a scrape refreshes
    this process's figures in prometheus-client's files, which ``MultiProcessCollector``
    reads.
    """

    def __init__(self, lc: Lifecycle | None = None, *, multiprocess: bool = False) -> None:
        self._lifecycles = _Lifecycles()
        self._totals: Totals[_Key] = Totals(per_pool=lambda key: key[0] in _POOL_COUNTS)
        self._collecting = threading.Lock()
        self.multiprocess = multiprocess
        if lc is not None:
            self.add(lc)

    def add(self, lc: Lifecycle) -> bool:
        """Report *lc* too; False if it was already."""
        if self.multiprocess:
            with _collectors_lock:
                _mirror_of(lc)
        return self._lifecycles.add(lc)

    @property
    def lifecycles(self) -> list[Lifecycle]:
        """The Lifecycles added and still alive, in the order added."""
        return self._lifecycles()

    def describe(self) -> list[Metric]:
        """The families (without samples), for the registry's check of duplicate names."""
        if self.multiprocess:
            return []  # MultiProcessCollector reports them
        return [family.family for family in _Families().all()]

    def collect(self) -> Iterator[Metric]:
        """The families with their samples, read from the Lifecycles' stats (the registry
        calls it at each scrape); in multiprocess mode, none: it refreshes the files."""
        if self.multiprocess:
            if _mirror is not None:
                _mirror.refresh()
            return
        # One scrape at a time, from reading the stats to adding them up: two at once (an
        # HA pair of Prometheus servers, prometheus-client's threaded server) would each
        # take the other's newer figures for a pool started again, and count them twice.
        with self._collecting:
            built = self._families()
        yield from built

    def _families(self) -> list[Metric]:
        every = [(lc, lc.stats()) for lc in self.lifecycles]
        reported = [(lc, stats) for lc, stats in every if stats.state != "closed"] or every[-1:]
        now = {id(lc) for lc, _ in reported}
        families = _Families().all()
        figures: list[tuple[Lifecycle, dict[_Key, tuple[float, ...]]]] = []
        for lc, stats in every:
            own = _Families()
            own.add(lc, stats)
            counted: dict[_Key, tuple[float, ...]] = {}
            for index, (family, mine) in enumerate(zip(families, own.all(), strict=True)):
                if family.cumulative:  # every Lifecycle's, and those of the retired (below)
                    counted.update(
                        ((index, labels), values) for labels, values in mine.values.items()
                    )
                elif id(lc) in now:  # what is open now: the Lifecycles reported
                    for labels, values in mine.values.items():
                        family.add(list(labels), *values)
            figures.append((lc, counted))
        totals = self._totals.read(figures)
        if not every and not totals:
            return []
        for (index, labels), values in totals.items():
            families[index].values[labels] = values
        return [family.build() for family in families]


_collectors: dict[bool, weakref.WeakKeyDictionary[CollectorRegistry, TetherCollector]] = {
    False: weakref.WeakKeyDictionary(),
    True: weakref.WeakKeyDictionary(),
}
_collectors_lock = threading.RLock()


def _registered(collector: TetherCollector, registry: CollectorRegistry) -> bool:
    """Whether *collector* is still on *registry* (not taken off with ``unregister``)."""
    on_registry = getattr(registry, "_collector_to_names", None)
    return on_registry is None or collector in on_registry


def _refresh_first(registry: CollectorRegistry) -> None:
    """Put the registry's ``MultiProcessCollector`` after tether's (registered last), so a
    scrape refreshes this process's figures before it reads the files."""
    for other in list(getattr(registry, "_collector_to_names", ())):
        if isinstance(other, MultiProcessCollector):
            registry.unregister(other)
            registry.register(other)


def register(lc: Lifecycle, registry: CollectorRegistry | None = None) -> TetherCollector:
    """Report *lc*'s stats on *registry* (default: the global one) and return the registry's
    tether collector, registered there on first use. Any number of Lifecycles may share a
    registry; registering *lc* again does nothing.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's multiprocess mode: several
    worker processes), *lc*'s figures go to prometheus-client's files instead, written every
    ``REFRESH_INTERVAL`` seconds while it runs, while it shuts down, once its app resources
    closed, and at each scrape of *registry* in this process (*registry* itself reports
    nothing); ``MultiProcessCollector`` reports them added up over the workers, as the app's
    own. A ``MultiProcessCollector`` already on *registry* is moved after tether's collector,
    so that a scrape writes this process's figures before reading the files."""
    target = registry if registry is not None else REGISTRY
    multiprocess = _multiprocess()
    collectors = _collectors[multiprocess]
    with _collectors_lock:
        collector = collectors.get(target)
        if collector is not None and _registered(collector, target):
            collector.add(lc)
            return collector
        collector = TetherCollector(lc, multiprocess=multiprocess)
        target.register(collector)
        collectors[target] = collector
        if multiprocess:
            _refresh_first(target)
        return collector
