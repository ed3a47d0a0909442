"""OpenTelemetry metrics of a Lifecycle: observable instruments that read ``lc.stats()``.

``register(lc)`` creates the instruments on a meter of the global ``MeterProvider`` (or the one
given); the SDK calls them at each collection, so nothing is counted twice and nothing runs per
request. Names and attributes follow OpenTelemetry's database-client connection conventions
(``db.client.connection.*``, with ``db.client.connection.pool.name`` the resource's name) where
they apply; the rest is ``tether.*``. For a driver's pool opened by an integration
(``lc.stats().pools``), ``db.client.connection.count`` is the pool's own connections, ``used``
and ``idle``, beside ``db.client.connection.max`` and ``db.client.connection.pending_requests``.
The conventions' wait and use times are histograms, which only code on the request path could
record: tether reports their sums and counts instead (``tether.resource.wait_time`` over
``tether.resource.opens``, ``tether.resource.use_time`` over ``tether.resource.closes``,
``tether.connection.create_time`` over ``tether.connection.created``), as the Prometheus
exporter's summaries do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Instrument, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - import guard
    msg = (
        "tether.metrics.opentelemetry needs opentelemetry-api: pip install 'tether[opentelemetry]'"
    )
    raise ImportError(msg) from exc

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._stats import PoolStats, ResourceStats

__all__ = ["POOL_NAME", "SCOPE", "STATE", "register"]

POOL_NAME = "db.client.connection.pool.name"  # the resource's name
STATE = "db.client.connection.state"  # "used": values open now; "idle": a pool's idle ones
SCOPE = "tether.resource.scope"  # "app" or "request"
PHASE = "tether.phase"  # of an error: "open" or "close"

Callback = Callable[[CallbackOptions], Iterable[Observation]]


def register(lc: Lifecycle, meter_provider: MeterProvider | None = None) -> list[Instrument]:
    """Create *lc*'s instruments on a meter named ``tether`` of *meter_provider* (default: the
    global one); return them. Each reads ``lc.stats()`` when the SDK collects."""
    from .. import __version__

    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    meter = provider.get_meter("tether", __version__)

    def per_resource(read: Callable[[ResourceStats], float], **extra: str) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(read(r), {POOL_NAME: name, SCOPE: r.scope, **extra})
                for name, r in lc.stats().resources.items()
            ]

        return observe

    def connections(options: CallbackOptions) -> Iterable[Observation]:
        """Values in use by resource; for a driver's pool, its own used and idle ones."""
        stats = lc.stats()
        found = []
        for name, r in stats.resources.items():
            attributes = {POOL_NAME: name, SCOPE: r.scope}
            pool = stats.pools.get(name)
            used = r.in_use if pool is None else (pool.in_use or 0)
            found.append(Observation(used, {**attributes, STATE: "used"}))
            if pool is not None and pool.idle is not None:
                found.append(Observation(pool.idle, {**attributes, STATE: "idle"}))
        return found

    def per_pool(read: Callable[[PoolStats], float | None]) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            stats = lc.stats()
            return [
                Observation(value, {POOL_NAME: name, SCOPE: stats.resources[name].scope})
                for name, pool in stats.pools.items()
                if (value := read(pool)) is not None
            ]

        return observe

    def of_lifecycle(read: Callable[[], float]) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read())]

        return observe

    def errors(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {POOL_NAME: name, SCOPE: r.scope, PHASE: phase})
            for name, r in lc.stats().resources.items()
            for phase, count in (("open", r.open_errors), ("close", r.close_errors))
        ]

    up_down, counter, gauge = (
        meter.create_observable_up_down_counter,
        meter.create_observable_counter,
        meter.create_observable_gauge,
    )
    stats = lc.stats
    table: list[tuple[Callable[..., Instrument], str, Callback, str, str]] = [
        (up_down, "db.client.connection.count", connections,
         "{connection}", "Values of the resource open now (in use); a driver pool's own "
         "connections, used and idle."),
        (up_down, "db.client.connection.max", per_pool(lambda p: p.max),
         "{connection}", "The most connections the driver's pool may open."),
        (up_down, "db.client.connection.pending_requests", per_pool(lambda p: p.waiting),
         "{request}", "Requests waiting for a connection from the driver's pool."),
        (counter, "tether.connection.created", per_pool(lambda p: p.created),
         "{connection}", "Connections the driver's pool made."),
        (counter, "tether.connection.create_time", per_pool(lambda p: p.create_time),
         "s", "Time the driver's pool took to make its connections, in all."),
        (counter, "tether.connection.discarded", per_pool(lambda p: p.discarded),
         "{connection}", "Connections of the driver's pool closed instead of used again: "
         "broken, or in a state not known (lost by the server, interrupted, not reset)."),
        (counter, "db.client.connection.timeouts", per_resource(lambda r: r.timeouts),
         "{timeout}", "Opens or closes of the resource that ran out of time."),
        (counter, "tether.resource.opens", per_resource(lambda r: r.opened),
         "{value}", "Values of the resource opened."),
        (counter, "tether.resource.closes", per_resource(lambda r: r.closed),
         "{value}", "Values of the resource closed."),
        (counter, "tether.resource.wait_time", per_resource(lambda r: r.wait_time),
         "s", "Time spent opening (acquiring) values of the resource, in all."),
        (counter, "tether.resource.use_time", per_resource(lambda r: r.hold_time),
         "s", "Time values of the resource were held, open to close, in all."),
        (gauge, "tether.resource.max_in_use", per_resource(lambda r: r.max_in_use),
         "{value}", "Most values of the resource open at once."),
        (counter, "tether.resource.errors", errors,
         "{error}", "Failed opens and failed closes of the resource."),
        (counter, "tether.resource.leaks", per_resource(lambda r: r.leaks),
         "{value}", "Values held past the leak threshold or used after their scope closed."),
        (gauge, "tether.resource.down", per_resource(lambda r: 1.0 if r.down else 0.0),
         "1", "1 while an app resource declared required=False is not open (the app runs "
         "without it), else 0."),
        (up_down, "tether.units.in_flight", of_lifecycle(lambda: stats().units_in_flight),
         "{unit}", "Units of work (requests, jobs) in flight."),
        (counter, "tether.units.refused", of_lifecycle(lambda: stats().units_refused),
         "{unit}", "Units of work refused while shutting down."),
        (gauge, "tether.lifecycle.running",
         of_lifecycle(lambda: 1.0 if stats().state == "running" else 0.0),
         "1", "1 while the app scope runs (ready), else 0."),
    ]  # fmt: skip
    return [
        create(name, [callback], unit=unit, description=description)
        for create, name, callback, unit, description in table
    ]
