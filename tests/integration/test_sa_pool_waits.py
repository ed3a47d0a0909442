"""SQLAlchemy sessions waiting for a pool connection, against a real PostgreSQL: the wait is
bounded by `pool_timeout` and the queue by `max_waiting`, for sync sessions (`def` endpoints)
as for async ones.

A sync session first waits, on the event loop, for a token of its own thread limiter (sized
to the pool), and only the token's holders wait in SQLAlchemy's pool. That first wait was
bounded by nothing and counted nowhere: with a pool of one, `pool_timeout=1` and units that
hold the session 0.75 s, six units were all served, the last after 3.75 s, with no timeout
counted, and `max_waiting` refused none. And every session counted as waiting from the start
of its checkout, the one given the free connection at once too: a burst on a pool of one
with `max_waiting=2` was served 2 units and refused 4 ("2 already wait" when 1 did).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]


def make_session(
    lc: tether.Lifecycle, pg: Postgres, kind: str, **pool: Any
) -> tether.Resource[Any]:
    if kind == "sync":
        return tsa.sync_session(lc, tsa.sync_engine(lc, pg.url("postgresql+psycopg"), **pool))
    return tsa.session(lc, tsa.engine(lc, pg.url("postgresql+psycopg"), **pool))


KINDS = pytest.mark.parametrize("kind", ["async", "sync"])


async def report_once_waiting(lc: tether.Lifecycle, n: int) -> tether.HealthReport:
    """``lc.health()`` once it says *n* waiting (or after 5 s, for the caller's assert): a
    fixed sleep may end, on a loaded machine, before a sync session's waiter reached the
    pool in its thread."""
    deadline = time.monotonic() + 5
    while True:
        report = await lc.health()
        if f"{n} waiting;" in (report["engine"].detail or "") or time.monotonic() > deadline:
            return report
        await anyio.sleep(0.05)


async def burst(
    lc: tether.Lifecycle, session: tether.Resource[Any], units: int, hold: float
) -> tuple[list[float], list[tuple[float, tether.ResourceUnavailable]]]:
    """*units* units of work at once, each holding the session *hold* seconds: when each was
    served, and when each was refused and with what, in seconds from the start."""
    served: list[float] = []
    refused: list[tuple[float, tether.ResourceUnavailable]] = []
    started = time.monotonic()

    async def unit() -> None:
        try:
            async with lc.scope() as s:
                await s.get(session)
                served.append(time.monotonic() - started)
                await anyio.sleep(hold)
        except tether.ResourceUnavailable as exc:
            refused.append((time.monotonic() - started, exc))

    async with anyio.create_task_group() as tg:
        for _ in range(units):
            tg.start_soon(unit)
    return sorted(served), sorted(refused, key=lambda r: r[0])


@KINDS
async def test_a_unit_gets_a_connection_within_pool_timeout_or_a_503(
    postgres: Postgres, kind: str
) -> None:
    """A warm pool of one, `pool_timeout=2`, six units holding the session 1.3 s: the first
    is served at once, the second after 1.3 s; the other four are refused at 2 s (their
    connection would come at 2.6 s and later), each counted as a timeout. Before, the sync
    session served all six, the last after 6.5 s.

    1.3 s is two thirds of the timeout: the second unit's connection comes 0.7 s before its
    timeout, and the third's 0.6 s after its own, so a loaded machine's stalls of up to
    0.6 s change nothing either way (with 0.75 s of 1 s, a 0.25 s stall made the second
    unit a 503)."""
    hold, timeout = 1.3, 2
    lc = tether.Lifecycle()
    session = make_session(lc, postgres, kind, pool_size=1, pool_timeout=timeout)
    async with lc.run():
        async with lc.scope() as s:  # warm: the connection is made and back in the pool,
            await s.get(session)  # so the first unit's hold does not start after a connect
        served, refused = await burst(lc, session, 6, hold=hold)
        stats = lc.stats().resources["session"]
    assert len(served) == 2, (served, refused)
    # At once: the first did not wait a pool timeout (2 s to spare on a loaded machine).
    assert served[0] < timeout, served
    # The second only once the first's hold ended: a pool of one (a sleep never ends early,
    # so this lower bound holds however loaded the machine).
    assert served[1] - served[0] > hold - 0.05, served
    assert len(refused) == 4, (served, refused)
    # Refused once pool_timeout ran out: not before (a timeout never fires early), and not
    # after waiting it twice, for the thread limiter's token and then in the pool (4 s);
    # 1.5 s to spare for a loaded machine.
    assert all(timeout - 0.1 < took < timeout + 1.5 for took, _ in refused), [
        took for took, _ in refused
    ]
    for _, exc in refused:
        assert exc.timed_out
        assert exc.retry_after == 1
        assert "Pool 'engine' (size 1, in use 1, waiting " in str(exc)
        assert (
            "could not give a connection: no connection came free within pool_timeout=2 s "
            "(pool_size=1, max_overflow=0, checked out 1, overflow 0); the requests holding "
            "them are slow, or the pool is too small for the load"
        ) in str(exc)
    assert (stats.opened, stats.timeouts) == (3, 4)  # the warm-up's and the two
    # The second unit's wait was counted (a hold), and no unit was served after waiting as
    # long as the third would have had to (two holds: 2.6 s; before, the sixth waited 6.5 s).
    assert hold - 0.05 < stats.max_wait_time < 2 * hold, stats.max_wait_time


@KINDS
async def test_max_waiting_admits_the_free_connection_and_that_many_waiting(
    postgres: Postgres, kind: str
) -> None:
    """A warm pool of one, `max_waiting=2`, six units at once: one takes the free connection,
    two wait and are served in turn, three are refused at once, as asyncpg's and psycopg's
    pools do. Before, the async session counted the unit given the free connection as
    waiting (served 2, refused 4, "2 already wait" when 1 did), and the sync session
    refused none."""
    lc = tether.Lifecycle()
    session = make_session(lc, postgres, kind, pool_size=1, pool_timeout=5, max_waiting=2)
    async with lc.run():
        async with lc.scope() as s:  # warm: the connection is made and back in the pool
            await s.get(session)
        served, refused = await burst(lc, session, 6, hold=0.3)
        stats = lc.stats().resources["session"]
    assert len(served) == 3, (served, refused)
    assert len(refused) == 3, (served, refused)
    # Refused at once, not queued: a queued unit is refused only when its pool_timeout runs
    # out (5 s) or is served; 2.5 s leaves room for a loaded machine.
    assert all(took < 2.5 for took, _ in refused), [took for took, _ in refused]
    for _, exc in refused:
        assert not exc.timed_out
        assert exc.retry_after == 1
        # the one connection counted in use, also while its unit's checkout is still to run
        assert "Pool 'engine' (size 1, in use 1, waiting 2)" in str(exc), str(exc)
        assert (
            "no connection is free (each is in use or still being made) and 2 units of work "
            "already wait for one (max_waiting=2); refused at once rather than queued"
        ) in str(exc)
    assert served[2] > 0.5  # the second waiting was served after two holds
    assert (stats.opened, stats.timeouts) == (4, 0)  # the warm-up's and the three


@KINDS
async def test_units_waiting_for_a_sync_sessions_token_count_as_waiting(
    postgres: Postgres, kind: str
) -> None:
    """One unit holds the only connection, two more wait for it: the health report says 2
    waiting, and back to 0 once they are served. Before, a sync session's second waiter
    waited for its limiter's token, counted nowhere: "1 waiting"."""
    lc = tether.Lifecycle()
    session = make_session(lc, postgres, kind, pool_size=1, pool_timeout=5)
    release = anyio.Event()
    held = anyio.Event()
    served = 0

    async def hold() -> None:
        async with lc.scope() as s:
            await s.get(session)
            held.set()
            await release.wait()

    async def wait() -> None:
        nonlocal served
        async with lc.scope() as s:
            await s.get(session)
            served += 1

    async with lc.run():
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await held.wait()
            tg.start_soon(wait)
            tg.start_soon(wait)
            report = await report_once_waiting(lc, 2)
            release.set()
        assert served == 2
        after = await lc.health()
    detail = report["engine"].detail or ""
    assert "the one connection in use, 2 waiting;" in detail, detail
    assert "waiting" not in (after["engine"].detail or ""), after["engine"]


@KINDS
async def test_waiters_cancelled_are_no_longer_counted(postgres: Postgres, kind: str) -> None:
    """Two units waiting for the held connection are cancelled (clients gone; a sync
    session's thread waiting in the pool is not interrupted: its unit ends once the
    connection comes back): none counts as waiting after, so with the connection held again
    `max_waiting=2` lets two wait (the third is refused), and both are served."""
    lc = tether.Lifecycle()
    session = make_session(lc, postgres, kind, pool_size=1, pool_timeout=5, max_waiting=2)
    outcome: list[tuple[list[float], list[tuple[float, tether.ResourceUnavailable]]]] = []

    async def hold(held: anyio.Event, release: anyio.Event) -> None:
        async with lc.scope() as s:
            await s.get(session)
            held.set()
            await release.wait()

    async def wait() -> None:
        async with lc.scope() as s:
            await s.get(session)

    async def three() -> None:
        outcome.append(await burst(lc, session, 3, hold=0))

    async def release_after(release: anyio.Event, delay: float) -> None:
        await anyio.sleep(delay)
        release.set()

    async with lc.run():
        async with anyio.create_task_group() as tg:
            held, release = anyio.Event(), anyio.Event()
            tg.start_soon(hold, held, release)
            await held.wait()
            tg.start_soon(release_after, release, 0.6)
            async with anyio.create_task_group() as waiters:
                waiters.start_soon(wait)
                waiters.start_soon(wait)
                await anyio.sleep(0.3)
                waiters.cancel_scope.cancel()
            await release.wait()
            held, release = anyio.Event(), anyio.Event()
            tg.start_soon(hold, held, release)
            await held.wait()
            tg.start_soon(three)
            report = await report_once_waiting(lc, 2)
            release.set()
    detail = report["engine"].detail or ""
    assert detail.startswith("busy: the one connection in use, 2 waiting;"), detail
    [(served, refused)] = outcome
    assert len(served) == 2, (served, refused)
    assert len(refused) == 1, (served, refused)
    assert "2 units of work already wait for one (max_waiting=2)" in str(refused[0][1])
