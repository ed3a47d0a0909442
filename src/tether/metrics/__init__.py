"""Exporters of `Lifecycle.stats()`; each behind its own extra."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
