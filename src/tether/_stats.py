"""Counters and timings: the one source for metrics, the dashboard and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._errors import closest

_V = TypeVar("_V")


class Counters:
    """Mutable per-resource counters, updated on the hot path (plain attribute adds)."""

    __slots__ = (
        "close_errors",
        "closed",
        "hold_time",
        "in_use",
        "leaks",
        "max_hold_time",
        "max_in_use",
        "max_wait_time",
        "open_errors",
        "opened",
        "timeouts",
        "wait_time",
    )

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.in_use = 0
        self.max_in_use = 0
        self.open_errors = 0
        self.close_errors = 0
        self.timeouts = 0
        self.leaks = 0
        self.wait_time = 0.0
        self.max_wait_time = 0.0
        self.hold_time = 0.0
        self.max_hold_time = 0.0


@dataclass(frozen=True, slots=True)
class ResourceStats:
    """A snapshot of one resource's counters.

    *wait_time* is the time spent opening (acquiring) values, *hold_time* the time
    between open and close, both totals in seconds with their maxima; *errors* counts
    failed opens and failed closes; *leaks* counts values held past the leak threshold
    or used after their scope closed; *down* says why an app resource declared
    ``required=False`` is not open while the app runs (``None`` otherwise).
    """

    name: str
    scope: str
    opened: int
    closed: int
    in_use: int
    max_in_use: int
    errors: int
    open_errors: int
    close_errors: int
    timeouts: int
    leaks: int
    wait_time: float
    max_wait_time: float
    hold_time: float
    max_hold_time: float
    # An app resource the app runs without (``required=False``), and why; else None.
    down: str | None = None

    @property
    def mean_wait_time(self) -> float:
        return self.wait_time / self.opened if self.opened else 0.0

    @property
    def mean_hold_time(self) -> float:
        return self.hold_time / self.closed if self.closed else 0.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A driver pool's own figures, read from it when asked (``None``: the driver does
    not say).

    *max* is the most connections it may open (size and overflow), *open* how many it has
    now, *in_use* how many of those are checked out, *idle* how many wait in the pool,
    *waiting* how many tasks wait for one. Since the pool opened: *created*, the
    connections it made, in *create_time* seconds in all; *discarded*, those closed instead
    of being used again because they were broken or in a state not known (lost by the
    server, interrupted mid-operation, not reset); a connection retired for its age is not
    discarded.
    """

    name: str
    max: int | None
    open: int | None
    in_use: int | None
    idle: int | None
    waiting: int | None
    created: int | None = None
    create_time: float | None = None
    discarded: int | None = None


class ByName(dict[str, _V]):
    """``lc.stats().resources`` and ``.pools``: a dict by resource name, whose missing key
    says which names there are (and, for a pool, why a resource may have no figures)."""

    __slots__ = ("_resources", "_state", "_where")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._where = ""  # set by lc.stats(); "" in a copy (`dataclasses.asdict`)
        self._resources: tuple[str, ...] = ()
        self._state = ""

    def __missing__(self, key: str) -> _V:
        raise KeyError(self._missing(key))

    def _missing(self, key: object) -> str:
        where = getattr(self, "_where", "")
        names = ", ".join(repr(n) for n in self) or "none"
        if not where:  # a copy: which of the two it was is not known
            msg = f"No name {key!r} in this copy of lc.stats()'s figures; the names: {names}."
        elif where.endswith(".resources"):
            msg = f"No resource named {key!r} in {where}; the Lifecycle's resources: {names}."
        else:
            msg = (
                f"No pool named {key!r} in {where}, which lists the open driver pools of "
                f"tether's integrations, by resource name: {names}."
            )
            if key in getattr(self, "_resources", ()):
                msg += (
                    f" {key!r} is a resource, but not one of them: not an integration's pool, "
                    f"not open (the Lifecycle is {self._state}), or overridden."
                )
                return msg
        close = closest(str(key), [str(n) for n in self])
        if close:
            msg += f" Did you mean {close!r}?"
        return msg


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a lifecycle: its state, units of work and every resource; *pools*,
    the figures of the driver pools the integrations opened, by resource name.

    *units_in_flight* counts the units of work running now (requests, WebSocket connections,
    ``lc.scope()`` blocks), *units_total* those admitted since the Lifecycle was made,
    *units_refused* those refused because the app was shutting down (or had shut down).
    ``stats[name]`` is ``stats.resources[name]``.
    """

    state: str
    units_in_flight: int
    units_total: int
    units_refused: int
    resources: dict[str, ResourceStats] = field(default_factory=ByName)
    pools: dict[str, PoolStats] = field(default_factory=ByName)

    def __getitem__(self, name: str) -> ResourceStats:
        return self.resources[name]


def snapshot(name: str, scope: str, c: Counters, down: str | None = None) -> ResourceStats:
    return ResourceStats(
        name=name,
        scope=scope,
        opened=c.opened,
        closed=c.closed,
        in_use=c.in_use,
        max_in_use=c.max_in_use,
        errors=c.open_errors + c.close_errors,
        open_errors=c.open_errors,
        close_errors=c.close_errors,
        timeouts=c.timeouts,
        leaks=c.leaks,
        wait_time=c.wait_time,
        max_wait_time=c.max_wait_time,
        hold_time=c.hold_time,
        max_hold_time=c.max_hold_time,
        down=down,
    )
