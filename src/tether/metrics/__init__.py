"""Exporters of `Lifecycle.stats()`; each behind its own extra."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Resource
    from .._stats import Stats


def pool_timeouts(lc: Lifecycle, stats: Stats) -> dict[str, int]:
    """The timeouts of each driver pool open now (``stats.pools``), read at collection time.

    A pool's are its own and those of every resource that draws from it alone: the pool is
    among its dependencies, directly or through others, and no other pool is. A resource
    that draws from no pool, or from several, is counted under no pool (its own
    ``tether_resource_timeouts`` has them). A pool that counts its own waits (httpx, Redis:
    ``Resource.counts_waits``) has its own only: a dependent's is the same event.
    """
    pools = stats.pools
    totals = dict.fromkeys(pools, 0)
    if not pools:
        return totals
    drawn: dict[Resource[Any], frozenset[str]] = {}

    def draws_from(res: Resource[Any]) -> frozenset[str]:
        found = drawn.get(res)
        if found is None:
            drawn[res] = frozenset()  # a cycle (an invalid graph) ends here
            if res.name in pools:
                found = frozenset((res.name,))
            else:
                found = frozenset().union(*(draws_from(dep) for dep in res.deps))
            drawn[res] = found
        return found

    resources = lc.resources
    for name, res in resources.items():
        r = stats.resources.get(name)
        if r is None or not r.timeouts:
            continue
        found = draws_from(res)
        if len(found) == 1:
            (pool,) = found
            if res.name == pool or not resources[pool].counts_waits:
                totals[pool] += r.timeouts
    return totals


K = TypeVar("K", bound=Hashable)
Figures = dict[K, tuple[float, ...]]


def _plus(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


class Totals(Generic[K]):
    """The series of counters (and of a summary's count and sum) of one exporter, which never
    go back as the Lifecycles it reads change: each series is what the Lifecycles alive report
    now, added up, plus what it held before those it no longer has (retired).

    A Lifecycle keeps its resources' counters when its app scope closes, and when it runs
    again it goes on from them: while it is alive its figures count as they are, closed or
    not. A series it no longer reports (a pool closed with its app scope) keeps its last
    figures, and counts on from them when reported again; but a driver pool's own counts
    (*per_pool*: connections made, discarded) start again with the new pool of each run of
    the Lifecycle (or one reopened while it runs, seen as a count that went back): the last
    figures of the old pool retire into the total. A Lifecycle's series retire too when it
    is garbage-collected. What is retired is the figures of the last read: a driver pool's
    counts after it and before the pool closed are not seen; its resources' counts are,
    while it is alive. Memory is one entry per series and per Lifecycle alive; it is all read at
    collection time (one collection at a time: the caller's lock), never on the request
    path.
    """

    def __init__(self, per_pool: Callable[[K], bool] = lambda key: False) -> None:
        self._lock = threading.Lock()
        self._retired: Figures[K] = {}
        # Per Lifecycle: it (weakly), its series as last read, and the run they were read in.
        self._seen: dict[int, tuple[weakref.ref[Lifecycle], Figures[K], int]] = {}
        # Whether a series is a driver pool's own count (since the pool opened: a run of
        # the Lifecycle opens a new pool, whose count starts again).
        self._per_pool = per_pool

    def _retire(self, key: K, values: tuple[float, ...]) -> None:
        old = self._retired.get(key)
        self._retired[key] = values if old is None else _plus(old, values)

    def read(self, figures: Iterable[tuple[Lifecycle, Figures[K]]]) -> Figures[K]:
        """The totals, given the figures each Lifecycle reports now (every one alive)."""
        with self._lock:
            for ident, (ref, seen, _) in list(self._seen.items()):
                if ref() is None:  # garbage-collected: its figures stay counted
                    del self._seen[ident]
                    for key, values in seen.items():
                        self._retire(key, values)
            for lc, now in figures:
                entry = self._seen.get(id(lc))
                seen = dict(now)
                run = lc._runs
                if entry is not None:
                    for key, was in entry[1].items():
                        current = now.get(key)
                        if current is None:
                            # Not reported now (its pool closed with the app scope): its last
                            # figures stand until it is again.
                            seen[key] = was
                        elif (run != entry[2] and self._per_pool(key)) or any(
                            v < w for v, w in zip(current, was, strict=True)
                        ):
                            self._retire(key, was)  # a new pool (run again, or reopened)
                ref = entry[0] if entry is not None else weakref.ref(lc)
                self._seen[id(lc)] = (ref, seen, run)
            totals = dict(self._retired)
            for _, seen, _ in self._seen.values():
                for key, values in seen.items():
                    old = totals.get(key)
                    totals[key] = values if old is None else _plus(old, values)
            return totals
