"""The connection budget counts every pool of the app on the same server (pain.md T5.3,
acceptance audit N2).

An SQLAlchemy engine of 20 and an asyncpg pool of 20, each fitting alone with 3 workers
(3 x 20 + 3 = 63 <= 100), do not fit together (3 x 40 + 3 = 123): the second pool to open
counts the first's share, and ``budget="error"`` fails the startup naming both. A pool's
share is forgotten when it closes; pools on other servers, or with ``budget="off"``, do not
count.
"""

import logging

import pytest

import tether
from tests.servers import Postgres
from tether.integrations import _common
from tether.integrations import asyncpg as tpg
from tether.integrations import psycopg as tpsy
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

FIXES = (
    "but the server allows max_connections=100. Lower the pool sizes or the number of "
    "workers (-w/--workers, or WEB_CONCURRENCY), put PgBouncer in front, or raise "
    "max_connections."
)


def expected(first: str, second: str) -> str:
    """The message when *second* opens after *first* (the two open concurrently)."""
    return (
        f"Connection budget of {second!r} does not fit with the other pools of this app on "
        f"the same server ({first!r}): 3 workers x 20 ({first!r}) + 3 workers x 20 "
        f"({second!r}) connections + 3 reserved = 123, " + FIXES
    )


async def test_two_pools_on_one_server_count_together(postgres: Postgres) -> None:
    lc = tether.Lifecycle()
    tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=20, budget="error", workers=3)
    tpg.pool(lc, postgres.dsn, min_size=1, max_size=20, budget="error", workers=3)
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover - it does not start
    message = str(caught.value)
    assert expected("engine", "pool") in message or expected("pool", "engine") in message, message
    assert not _common._shares.get(lc), "the pool that opened forgot its share as it closed"


async def test_each_fits_alone_and_the_sum_fits(postgres: Postgres) -> None:
    """3 x (15 + 15) + 3 = 93 <= 100: both open; closed, neither is counted any more."""
    lc = tether.Lifecycle()
    tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=15, budget="error", workers=3)
    tpsy.pool(lc, postgres.dsn, min_size=1, max_size=15, budget="error", workers=3)
    async with lc.run():
        assert sorted(_common._shares[lc]) == ["engine", "pool"]
    assert not _common._shares[lc]
    async with lc.run():  # run again: the shares of the last run are gone
        pass


async def test_warns_naming_every_pool(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """budget="warn" (the default): the app starts, and the warning names both pools."""
    lc = tether.Lifecycle()
    tpsy.pool(lc, postgres.dsn, min_size=1, max_size=20, workers=3, name="a")
    tpg.pool(lc, postgres.dsn, min_size=1, max_size=20, workers=3, name="b")
    with caplog.at_level(logging.WARNING, logger="tether"):
        async with lc.run():
            pass
    assert expected("a", "b") in caplog.text or expected("b", "a") in caplog.text, caplog.text


async def test_a_pool_with_budget_off_is_not_counted(postgres: Postgres) -> None:
    lc = tether.Lifecycle()
    tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=20, budget="off", workers=3)
    tpg.pool(lc, postgres.dsn, min_size=1, max_size=20, budget="error", workers=3)
    async with lc.run():
        pass


async def test_pools_on_other_servers_are_not_counted(postgres: Postgres) -> None:
    with Postgres(max_connections=70) as other:
        lc = tether.Lifecycle()
        tpg.pool(lc, postgres.dsn, min_size=1, max_size=20, budget="error", workers=3, name="a")
        tpg.pool(lc, other.dsn, min_size=1, max_size=20, budget="error", workers=3, name="b")
        async with lc.run():
            assert len({share.server for share in _common._shares[lc].values()}) == 2
