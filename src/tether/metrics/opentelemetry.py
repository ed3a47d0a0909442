"""OpenTelemetry metrics of Lifecycles: observable instruments that read ``lc.stats()``.

``register(lc)`` adds *lc* to the instruments tether keeps on a meter of the global
``MeterProvider`` (or the one given), creating them on first use; the SDK calls them at each
collection, so nothing is counted twice and nothing runs per request. Names and attributes
follow OpenTelemetry's database-client connection conventions (``db.client.connection.*``, with
``db.client.connection.pool.name`` the resource's name) where they apply; the rest is
``tether.*``. As the conventions define them, ``db.client.connection.count``, ``.max``,
``.pending_requests`` and ``.timeouts`` are per connection pool: only for the driver pools the
integrations open (``lc.stats().pools``), so a sum of ``db.client.connection.count`` is the
pools' connections. A pool's timeouts include those of the resources that draw from it alone
(its connection resource's waits for a connection); every resource's values open now and
timeouts are ``tether.resource.in_use`` and ``tether.resource.timeouts``.
The conventions' wait and use times are histograms, which only code on the request path could
record: tether reports their sums and counts instead (``tether.resource.wait_time`` over
``tether.resource.opens``, ``tether.resource.use_time`` over ``tether.resource.closes``,
``tether.connection.create_time`` over ``tether.connection.created``), as the Prometheus
exporter's summaries do.

Any number of Lifecycles may be registered on one meter provider; registering one again does
nothing. The instruments hold them weakly: one garbage-collected (a finished test's) drops out.
A collection's gauges and up-down counters (what is open now, running, down) are those of the
Lifecycles not closed; when all are closed, the one registered last (its final figures). Its
counters never go back: each callback returns a cumulative total over every Lifecycle it has
read, those closed or garbage-collected since included (their final figures, kept per set of
attributes), so one of two apps stopping, or an app built again in the same process, gives no
negative delta. Where two report the same attributes (resources of the same name and scope, and
the Lifecycle-wide ``tether.units.*``), their values are added up, except ``tether.resource.down``
and ``tether.lifecycle.running``, which are the highest (1 while any is down, or running).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Instrument, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - import guard
    msg = (
        "tether.metrics.opentelemetry needs opentelemetry-api: pip install 'tether[opentelemetry]'"
    )
    raise ImportError(msg) from exc

from . import Totals, pool_timeouts

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._stats import PoolStats, ResourceStats, Stats

__all__ = ["PHASE", "POOL_NAME", "SCOPE", "STATE", "register"]

POOL_NAME = "db.client.connection.pool.name"  # the resource's name
STATE = "db.client.connection.state"  # of a driver pool's connections: "used" or "idle"
SCOPE = "tether.resource.scope"  # "app" or "request"
PHASE = "tether.phase"  # of an error: "open" or "close"

Callback = Callable[[CallbackOptions], Iterable[Observation]]
Attributes = tuple[tuple[str, str], ...]
# A Lifecycle's points of one instrument, read from its stats: (value, attributes).
Read = Callable[["Lifecycle", "Stats"], Iterable[tuple[float, dict[str, str]]]]


def _add(a: float, b: float) -> float:
    return a + b


class _Points:
    """One instrument's observations by attributes: those two Lifecycles report are combined."""

    def __init__(self, combine: Callable[[float, float], float] = _add) -> None:
        self.combine = combine
        self.values: dict[Attributes, float] = {}

    def add(self, value: float, attributes: dict[str, str]) -> None:
        key = tuple(attributes.items())
        old = self.values.get(key)
        self.values[key] = value if old is None else self.combine(old, value)

    def observations(self) -> list[Observation]:
        return [Observation(value, dict(key)) for key, value in self.values.items()]


class _Instruments:
    """tether's instruments on one meter provider, and the Lifecycles they report (weakly)."""

    def __init__(self, meter_provider: MeterProvider) -> None:
        self._lock = threading.Lock()
        self._refs: list[weakref.ref[Lifecycle]] = []
        self.instruments = self._create(meter_provider)

    def add(self, lc: Lifecycle) -> None:
        with self._lock:
            alive = [ref for ref in self._refs if ref() is not None]
            if not any(ref() is lc for ref in alive):
                alive.append(weakref.ref(lc))
            self._refs = alive

    def every(self) -> list[tuple[Lifecycle, Stats]]:
        """The Lifecycles alive, with their stats."""
        return [(lc, lc.stats()) for ref in self._refs if (lc := ref()) is not None]

    def reported(self, every: list[tuple[Lifecycle, Stats]]) -> list[tuple[Lifecycle, Stats]]:
        """Those of *every* not closed; if all are closed, the one registered last."""
        return [(lc, stats) for lc, stats in every if stats.state != "closed"] or every[-1:]

    def _create(self, provider: MeterProvider) -> list[Instrument]:
        from .. import __version__

        meter = provider.get_meter("tether", __version__)
        every, reported = self.every, self.reported

        def now(read: Read, combine: Callable[[float, float], float] = _add) -> Callback:
            """What is open now (a gauge, an up-down counter): the Lifecycles reported."""

            def observe(options: CallbackOptions) -> Iterable[Observation]:
                points = _Points(combine)
                for lc, stats in reported(every()):
                    for value, attributes in read(lc, stats):
                        points.add(value, attributes)
                return points.observations()

            return observe

        def counted(read: Read, *, per_pool: bool = False) -> Callback:
            """A counter: a cumulative total over every Lifecycle read, which never goes back
            (those closed or garbage-collected since stay counted); the SDK takes deltas.
            *per_pool*: a driver pool's own count, which starts again with each run."""
            totals: Totals[Attributes] = Totals(per_pool=lambda key: per_pool)

            def observe(options: CallbackOptions) -> Iterable[Observation]:
                figures: list[tuple[Lifecycle, dict[Attributes, tuple[float, ...]]]] = []
                for lc, stats in every():
                    points = _Points()
                    for value, attributes in read(lc, stats):
                        points.add(value, attributes)
                    figures.append((lc, {key: (v,) for key, v in points.values.items()}))
                return [Observation(v, dict(key)) for key, (v,) in totals.read(figures).items()]

            return observe

        def per_resource(read: Callable[[ResourceStats], float]) -> Read:
            def points(lc: Lifecycle, stats: Stats) -> Iterator[tuple[float, dict[str, str]]]:
                for name, r in stats.resources.items():
                    yield read(r), {POOL_NAME: name, SCOPE: r.scope}

            return points

        def connections(lc: Lifecycle, stats: Stats) -> Iterator[tuple[float, dict[str, str]]]:
            """A driver pool's own connections, used and idle."""
            for name, pool in stats.pools.items():
                attributes = {POOL_NAME: name, SCOPE: stats.resources[name].scope}
                yield pool.in_use or 0, {**attributes, STATE: "used"}
                if pool.idle is not None:
                    yield pool.idle, {**attributes, STATE: "idle"}

        def timeouts(lc: Lifecycle, stats: Stats) -> Iterator[tuple[float, dict[str, str]]]:
            """A driver pool's timeouts, and those of the resources drawing from it alone."""
            for name, count in pool_timeouts(lc, stats).items():
                yield count, {POOL_NAME: name, SCOPE: stats.resources[name].scope}

        def per_pool(read: Callable[[PoolStats], float | None]) -> Read:
            def points(lc: Lifecycle, stats: Stats) -> Iterator[tuple[float, dict[str, str]]]:
                for name, pool in stats.pools.items():
                    if (value := read(pool)) is not None:
                        yield value, {POOL_NAME: name, SCOPE: stats.resources[name].scope}

            return points

        def of_lifecycle(read: Callable[[Stats], float]) -> Read:
            def points(lc: Lifecycle, stats: Stats) -> Iterator[tuple[float, dict[str, str]]]:
                yield read(stats), {}

            return points

        def errors(lc: Lifecycle, stats: Stats) -> Iterator[tuple[float, dict[str, str]]]:
            for name, r in stats.resources.items():
                for phase, count in (("open", r.open_errors), ("close", r.close_errors)):
                    yield count, {POOL_NAME: name, SCOPE: r.scope, PHASE: phase}

        up_down, counter, gauge = (
            meter.create_observable_up_down_counter,
            meter.create_observable_counter,
            meter.create_observable_gauge,
        )
        table: list[tuple[Callable[..., Instrument], str, Callback, str, str]] = [
            (up_down, "db.client.connection.count", now(connections),
             "{connection}", "Connections of the driver's pool, used and idle."),
            (up_down, "db.client.connection.max", now(per_pool(lambda p: p.max)),
             "{connection}", "The most connections the driver's pool may open."),
            (up_down, "db.client.connection.pending_requests",
             now(per_pool(lambda p: p.waiting)),
             "{request}", "Requests waiting for a connection from the driver's pool."),
            (counter, "tether.connection.created",
             counted(per_pool(lambda p: p.created), per_pool=True),
             "{connection}", "Connections the driver's pool made."),
            (counter, "tether.connection.create_time",
             counted(per_pool(lambda p: p.create_time), per_pool=True),
             "s", "Time the driver's pool took to make its connections, in all."),
            (counter, "tether.connection.discarded",
             counted(per_pool(lambda p: p.discarded), per_pool=True),
             "{connection}", "Connections of the driver's pool closed instead of used again: "
             "broken, or in a state not known (lost by the server, interrupted, not reset)."),
            (counter, "db.client.connection.timeouts", counted(timeouts),
             "{timeout}", "Waits for a connection of the driver's pool that ran out of time, "
             "and other opens or closes that did, of the pool and of the resources drawing from "
             "it alone."),
            (up_down, "tether.resource.in_use", now(per_resource(lambda r: r.in_use)),
             "{value}", "Values of the resource open now."),
            (counter, "tether.resource.timeouts", counted(per_resource(lambda r: r.timeouts)),
             "{timeout}", "Opens or closes of the resource that ran out of time."),
            (counter, "tether.resource.opens", counted(per_resource(lambda r: r.opened)),
             "{value}", "Values of the resource opened."),
            (counter, "tether.resource.closes", counted(per_resource(lambda r: r.closed)),
             "{value}", "Values of the resource closed."),
            (counter, "tether.resource.wait_time", counted(per_resource(lambda r: r.wait_time)),
             "s", "Time spent opening (acquiring) values of the resource, in all."),
            (counter, "tether.resource.use_time", counted(per_resource(lambda r: r.hold_time)),
             "s", "Time values of the resource were held, open to close, in all."),
            (gauge, "tether.resource.max_in_use", now(per_resource(lambda r: r.max_in_use)),
             "{value}", "Most values of the resource open at once."),
            (counter, "tether.resource.errors", counted(errors),
             "{error}", "Failed opens and failed closes of the resource."),
            (counter, "tether.resource.leaks", counted(per_resource(lambda r: r.leaks)),
             "{value}", "Values held past the leak threshold or used after their scope closed."),
            (gauge, "tether.resource.down",
             now(per_resource(lambda r: 1.0 if r.down else 0.0), max),
             "1", "1 while an app resource declared required=False is not open (the app runs "
             "without it), else 0."),
            (up_down, "tether.units.in_flight", now(of_lifecycle(lambda s: s.units_in_flight)),
             "{unit}", "Units of work (requests, jobs) in flight."),
            (counter, "tether.units.refused", counted(of_lifecycle(lambda s: s.units_refused)),
             "{unit}", "Units of work refused while shutting down."),
            (gauge, "tether.lifecycle.running",
             now(of_lifecycle(lambda s: 1.0 if s.state == "running" else 0.0), max),
             "1", "1 while the app scope runs (ready), else 0."),
        ]  # fmt: skip
        return [
            create(name, [callback], unit=unit, description=description)
            for create, name, callback, unit, description in table
        ]


_registered: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


def register(lc: Lifecycle, meter_provider: MeterProvider | None = None) -> list[Instrument]:
    """Report *lc* through tether's instruments on a meter named ``tether`` of *meter_provider*
    (default: the global one), created there on first use; return them. Each reads the
    Lifecycles' stats when the SDK collects. Any number of Lifecycles may share a meter
    provider; registering *lc* again does nothing."""
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    with _registered_lock:
        instruments = _registered.get(provider)
        if instruments is None:
            instruments = _registered[provider] = _Instruments(provider)
        instruments.add(lc)
    return list(instruments.instruments)
