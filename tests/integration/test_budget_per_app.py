"""The connection budget counts every pool of the app on the same server (pain.md T5.3,
acceptance audit N2).

An SQLAlchemy engine of 20 and an asyncpg pool of 20, each fitting alone with 3 workers
(3 x 20 + 3 = 63 <= 100), do not fit together (3 x 40 + 3 = 123): the second pool to open
counts the first's share, and ``budget="error"`` fails the startup naming both. A pool's
share is forgotten when it closes; pools on other servers, or with ``budget="off"``, do not
count.
"""

import logging
from collections.abc import Iterator
from typing import Any

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


@pytest.fixture(scope="module")
def hardened() -> Iterator[str]:
    """A server where PUBLIC may not call pg_postmaster_start_time() (a hardened one, as
    some DBAs revoke functions; or a PostgreSQL-compatible one without it), and the DSN of a
    role that is not its superuser."""
    import asyncpg

    with Postgres() as pg:

        async def harden() -> None:
            conn = await asyncpg.connect(pg.dsn)
            try:
                await conn.execute("CREATE ROLE app LOGIN PASSWORD 'app-pw'")
                await conn.execute("GRANT ALL ON DATABASE tether TO app")
                await conn.execute(
                    "REVOKE EXECUTE ON FUNCTION pg_postmaster_start_time() FROM PUBLIC"
                )
            finally:
                await conn.close()

        import anyio

        anyio.run(harden)
        yield f"postgresql://app:app-pw@127.0.0.1:{pg.port}/tether"


HARDENED = [
    ("asyncpg", lambda lc, dsn, size: tpg.pool(lc, dsn, min_size=1, max_size=size,
                                               budget="error", workers=3)),
    ("psycopg", lambda lc, dsn, size: tpsy.pool(lc, dsn, min_size=1, max_size=size,
                                                budget="error", workers=3)),
    ("sqlalchemy", lambda lc, dsn, size: tsa.engine(
        lc, dsn.replace("postgresql:", "postgresql+asyncpg:"), pool_size=size, max_overflow=0,
        budget="error", workers=3)),
    ("sqlalchemy-sync", lambda lc, dsn, size: tsa.sync_engine(
        lc, dsn.replace("postgresql:", "postgresql+psycopg:"), pool_size=size, max_overflow=0,
        budget="error", workers=3)),
]  # fmt: skip


@pytest.mark.parametrize("declare", [d for _, d in HARDENED], ids=[n for n, _ in HARDENED])
async def test_a_server_that_refuses_the_budget_query_is_counted_alone(
    hardened: str, declare: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the role may not call pg_postmaster_start_time(), the pool reads
    max_connections alone and is checked alone (before: the app did not start, "permission
    denied for function pg_postmaster_start_time", with advice to retry): it starts when it
    fits, and a budget that does not fit is still refused."""
    lc = tether.Lifecycle()
    declare(lc, hardened, 20)  # 3 x 20 + 3 = 63 <= 100
    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            name = next(iter(lc._resources))
    assert (
        "the server refused the query that tells it from other servers "
        "(InsufficientPrivilege" in caplog.text
    ), caplog.text
    assert "permission denied for function pg_postmaster_start_time): the connection budget" \
        f" of {name!r} is checked for that pool alone" in caplog.text  # fmt: skip
    assert f"connection budget of {name!r} fits: 3 workers x 20 + 3 reserved = 63 <= 100" in (
        caplog.text
    )
    lc = tether.Lifecycle()
    declare(lc, hardened, 40)  # 3 x 40 + 3 = 123 > 100
    with pytest.raises(tether.StartupError, match="3 workers x 40 connections \\+ 3 reserved"):
        async with lc.run():
            pass  # pragma: no cover - it does not start


class _NoSetting(Exception):
    """What a PostgreSQL-compatible server without max_connections answers `SHOW
    max_connections` with (SQLSTATE 42704, undefined object): no PostgreSQL refuses it."""

    sqlstate = "42704"

    def __str__(self) -> str:
        return 'unrecognized configuration parameter "max_connections"'


def test_a_server_without_max_connections_is_said_by_the_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where even `SHOW max_connections` is refused, the budget is not checked: a warning
    with budget="warn", a StartupError naming budget='off' with "error"; an error that is not
    a refusal (a lost connection) is not taken for one."""
    said = (
        "The connection budget of 'pool' cannot be checked: the server did not give its "
        "max_connections (_NoSetting: unrecognized configuration parameter "
        "\"max_connections\"). Pass budget='off' to 'pool' to not read it (a "
        "PostgreSQL-compatible server without max_connections)."
    )
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert _common.budget_unread("pool", _NoSetting(), "warn")
    assert caplog.messages == [f"tether: {said}"]
    with pytest.raises(tether.StartupError) as caught:
        _common.budget_unread("pool", _NoSetting(), "error")
    assert str(caught.value) == said
    assert not _common.budget_unread("pool", ConnectionResetError(), "error")
    assert not _common.budget_refused("pool", ConnectionResetError())


async def test_pools_set_to_other_time_zones_count_together(postgres: Postgres) -> None:
    """The server is told apart by its start time as a number: a pool whose sessions use
    another TimeZone and DateStyle reads the same server (before: its start time as text in
    that zone and style, taken for another server, and the two pools not counted together)."""
    lc = tether.Lifecycle()
    tsa.engine(lc, postgres.url("postgresql+asyncpg"), pool_size=20, budget="error", workers=3)
    tpg.pool(
        lc,
        postgres.dsn,
        min_size=1,
        max_size=20,
        budget="error",
        workers=3,
        server_settings={"timezone": "Asia/Tokyo", "datestyle": "SQL, DMY"},
    )
    with pytest.raises(tether.StartupError) as caught:
        async with lc.run():
            pass  # pragma: no cover - it does not start
    message = str(caught.value)
    assert expected("engine", "pool") in message or expected("pool", "engine") in message, message


@pytest.mark.parametrize("first", ["error", "warn"])
def test_the_strictest_policy_of_the_pools_counted_applies(first: str) -> None:
    """Pools that open concurrently check their budget in an order that is chance: one
    declared budget="error" fails the start whichever checks last (before: only the last
    one's policy applied, and the same app started or not from one run to the next)."""
    lc = tether.Lifecycle()
    second = "warn" if first == "error" else "error"
    shared = {"server_max": 20, "per_worker": 10, "workers": 1, "reserved": 3, "lc": lc}
    _common.check_budget("a", policy=first, server="5432@1", **shared)  # type: ignore[arg-type]
    with pytest.raises(tether.StartupError, match="1 workers x 10 \\('a'\\) \\+ 1 workers x 10"):
        _common.check_budget("b", policy=second, server="5432@1", **shared)  # type: ignore[arg-type]


async def test_a_psycopg_pool_that_fails_to_build_leaves_no_share(postgres: Postgres) -> None:
    """A pool psycopg_pool refuses to build (``num_workers=0``) fails the start; the pool's
    share, noted when its budget was read, goes with it (before: it stayed, counted by every later check of the
    Lifecycle)."""
    lc = tether.Lifecycle()
    tpsy.pool(lc, postgres.dsn, min_size=1, max_size=10, workers=1, num_workers=0)
    with pytest.raises(tether.StartupError, match="num_workers"):
        async with lc.run():
            pass  # pragma: no cover - it does not start
    assert not _common._shares.get(lc)
