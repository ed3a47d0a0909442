"""asyncpg's pool with ``pre_ping``: a connection that sat idle is tested before a unit of work
without a transaction gets it (reliability.md test 4 and HikariCP's idle window; pain.md T8.1).

asyncpg tests nothing before handing a pooled connection out. It notices a connection the
server closed when its event loop reads the close, so one closed an instant before (a
restart, a proxy resetting it) is handed out, and one whose network went silent (a NAT or
firewall that dropped it, a failover that took the address away) is handed out for ever:
the endpoint's first query then fails, or waits for a reply that never comes (asyncpg has no
command timeout by default). With ``transaction=True`` tether's ``BEGIN`` is the test;
without, ``pre_ping`` pings a connection back in the pool for that many seconds.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import pytest

import tether
from tests.faultproxy import FaultProxy
from tests.servers import Postgres, _pg_url
from tests.wakeups import cancelled_at_turn
from tether.integrations import asyncpg as tpg
from tether.integrations._common import RESET_SESSION

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]


@pytest.fixture
def proxy(postgres: Postgres) -> Iterator[FaultProxy]:
    with FaultProxy(postgres.port) as p:
        yield p


def through(proxy: FaultProxy) -> str:
    return _pg_url("postgresql", proxy.port, None, no_tls_probe=True)


async def pid_of(lc: tether.Lifecycle, conn: tether.Resource[Any]) -> int:
    async with lc.scope() as s:
        return int(await (await s.get(conn)).fetchval("SELECT pg_backend_pid()"))


@pytest.mark.parametrize("pre_ping", [0.2, False], ids=["pre_ping", "off"])
async def test_an_idle_connection_whose_network_went_silent_is_a_503_not_a_hang(
    proxy: FaultProxy, pre_ping: Any
) -> None:
    """The network drops every packet (no reset) while a connection sits in the pool. With
    ``pre_ping`` the next unit of work gets a 503 naming the ping within ``acquire_timeout``,
    and once the network is back a new connection serves; without, its query still waits
    after 3 s."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, through(proxy), min_size=1, max_size=1, acquire_timeout=1,
                    pre_ping=pre_ping)  # fmt: skip
    conn = tpg.connection(lc, pool, reset_timeout=1)
    async with lc.run():
        first = await pid_of(lc, conn)
        proxy.blackhole()
        await anyio.sleep(0.3)  # longer than pre_ping: the connection is idle
        started = time.monotonic()
        with anyio.move_on_after(3) as waited:
            with pytest.raises(tether.ResourceUnavailable) as caught:
                await pid_of(lc, conn)
        if pre_ping is False:
            assert waited.cancelled_caught  # the query never came back
            proxy.restore()
        else:
            took = time.monotonic() - started
            assert 0.9 < took < 2.5, took
            assert str(caught.value) == (
                "Pool 'pool' could not give a connection: the database did not answer the ping "
                "of a pooled connection within acquire_timeout=1 s (the connection was "
                "terminated; the network or the server may be down). Retry shortly; if it "
                "persists, check the database and the pool size."
            )
            assert caught.value.retry_after is not None
            proxy.restore()
            assert await pid_of(lc, conn) != first  # a new connection; the silent one is gone
        assert lc.stats().resources["conn"].in_use == 0
    with anyio.fail_after(5):  # the proxy's ends are closed before it stops
        while proxy.open_connections:
            await anyio.sleep(0.05)


@pytest.mark.parametrize("pre_ping", [True, False], ids=["pre_ping", "off"])
async def test_connections_reset_an_instant_before_are_replaced_not_handed_out(
    proxy: FaultProxy, pre_ping: bool
) -> None:
    """Every pooled connection is reset (RST) just before units of work take them, before
    the event loop has read the resets: with ``pre_ping`` the ping finds each dead, and the
    units of work run on new connections; without, their first queries fail (asyncpg
    handed out both dead connections, one after the other, in a run by hand)."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, through(proxy), min_size=2, max_size=2, pre_ping=pre_ping)
    conn = tpg.connection(lc, pool)
    async with lc.run():
        before = {await pid_of(lc, conn) for _ in range(2)}
        proxy.cut()  # blocks this loop until done: asyncpg has not read the resets yet
        if pre_ping:
            after = {await pid_of(lc, conn) for _ in range(3)}
            assert not after & before
            figures = lc.stats().pools["pool"]
            # Both discarded: found dead by the ping, or (asyncpg 0.30 read the reset first)
            # lost while idle in the pool.
            assert figures.discarded == 2, figures
        else:
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await pid_of(lc, conn)
            with anyio.fail_after(5):  # served again: the pool replaces the dead ones
                while True:
                    with contextlib.suppress(asyncpg.ConnectionDoesNotExistError):
                        assert await pid_of(lc, conn) not in before
                        break
        assert lc.stats().resources["conn"].in_use == 0
    # The proxy's ends of the reset connections are closed before it stops.
    with anyio.fail_after(5):
        while proxy.open_connections:
            await anyio.sleep(0.05)


async def test_only_a_connection_idle_for_pre_ping_seconds_is_pinged(
    postgres: Postgres,
) -> None:
    """The server's record of each backend's last statement: a connection taken again at
    once was not pinged (its last statement is the reset of its release); one idle for
    longer than ``pre_ping`` was (``SELECT 1``)."""
    app_name = f"ping-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, pre_ping=0.3,
                    server_settings={"application_name": app_name})  # fmt: skip
    conn = tpg.connection(lc, pool)

    def last_statement() -> str:
        rows = postgres.sql(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        )
        assert len(rows) == 1, rows
        return str(rows[0][0])

    async with lc.run():
        await pid_of(lc, conn)
        async with lc.scope() as s:
            await s.get(conn)
            assert last_statement() == RESET_SESSION  # not pinged
        await anyio.sleep(0.4)
        async with lc.scope() as s:
            await s.get(conn)
            assert last_statement() == "SELECT 1"  # pinged
        async with lc.scope() as s:
            await s.get(conn)
            assert last_statement() == RESET_SESSION


@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
async def test_a_unit_cancelled_at_each_turn_of_its_ping_leaves_nothing_behind(
    postgres: Postgres, how: str
) -> None:
    """``pre_ping=True`` pings every connection taken again. Cancelled at each turn of the
    event loop while it takes and pings one (then while it queries): the cancellation is
    delivered, nothing stays in use, no backend stays busy, and the next unit is served."""
    app_name = f"ping-cancel-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=2, max_size=2, pre_ping=True,
                    server_settings={"application_name": app_name})  # fmt: skip
    conn = tpg.connection(lc, pool)

    async def unit() -> None:
        async with lc.scope() as s:
            assert await (await s.get(conn)).fetchval("SELECT 1") == 1

    fired = 0
    async with lc.run():
        await unit()
        for k in range(1, 60):
            if not await cancelled_at_turn(k, unit(), how=how):
                break
            fired += 1
            await unit()
            assert lc.stats().resources["conn"].in_use == 0
        assert fired >= 2
        with anyio.fail_after(5):
            while any(r["state"] != "idle" for r in postgres.activity(app_name)):
                await anyio.sleep(0.05)


@pytest.mark.parametrize(("pre_ping", "shown"), [(-1, "-1"), ("yes", "'yes'"), (None, "None")])
def test_pre_ping_must_be_a_flag_or_seconds(pre_ping: Any, shown: str) -> None:
    with pytest.raises(ValueError, match="pre_ping") as caught:
        tpg.pool(tether.Lifecycle(), "postgresql://localhost/x", pre_ping=pre_ping)
    assert str(caught.value) == (
        f"Pool 'pool': pre_ping={shown} must be True, False or a number of seconds of 0 or more."
    )
