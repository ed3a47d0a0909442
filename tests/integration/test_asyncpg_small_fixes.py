"""tether.integrations.asyncpg: small fixes from the reviews of the asyncpg integration, against
a real PostgreSQL.

- inside one ``rolled_back()`` block, a type codec a unit of work set reached the block's next
  unit, where in production each unit gets a connection without it (the pool closes the
  connection a unit changed a codec on).
"""

import asyncio
import json
import logging
from typing import Any

import asyncpg
import pytest

import tether
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg

pytestmark = [pytest.mark.servers, pytest.mark.anyio, pytest.mark.fastapi_free]

QUERY = """SELECT '{"a": 1}'::json, '{"b": 2}'::jsonb, '8'::oid"""


def _as_dict(value: str) -> Any:
    return json.loads(value)


def _unit_1s(value: str) -> str:
    return "unit 1's decoder"


@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "tx"])
async def test_a_codec_a_unit_sets_in_a_block_does_not_reach_the_next_unit(
    postgres: Postgres, transaction: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Unit 1 of a block changes three codecs: ``json`` (the test set one on the block's
    connection), ``jsonb`` (the pool's ``init=`` set one) and ``oid`` (a builtin codec). Unit 2
    decodes as unit 1 did not exist: the test's and the pool's codecs are back, ``oid`` is
    asyncpg's own again. A warning says what production does (the connection is closed)."""

    async def init(c: asyncpg.Connection) -> None:
        await c.set_type_codec("jsonb", encoder=json.dumps, decoder=_as_dict, schema="pg_catalog")

    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=init)
    conn = tpg.connection(lc, pool, transaction=transaction)
    seen = []
    async with lc.run():
        async with tpg.rolled_back(conn) as block:
            await block.set_type_codec(
                "json", encoder=json.dumps, decoder=_as_dict, schema="pg_catalog"
            )
            with caplog.at_level(logging.WARNING, logger="tether"):
                for unit in range(3):
                    async with lc.scope() as s:
                        c = await s.get(conn)
                        seen.append(tuple(await c.fetchrow(QUERY)))
                        if unit == 1:
                            for typename in ("json", "jsonb"):
                                await c.set_type_codec(
                                    typename,
                                    encoder=json.dumps,
                                    decoder=_unit_1s,
                                    schema="pg_catalog",
                                )
                            await c.set_builtin_type_codec(
                                "oid", schema="pg_catalog", codec_name="text"
                            )
                            seen.append(tuple(await c.fetchrow(QUERY)))
            seen.append(tuple(await block.fetchrow(QUERY)))  # the test's own, after the units
    expected = ({"a": 1}, {"b": 2}, 8)
    assert seen[2][:2] == ("unit 1's decoder", "unit 1's decoder"), seen
    assert seen[2][2] != 8, seen  # oid decoded as text
    # Unit 2 (and the test after it) used to get unit 1's codecs.
    assert [seen[0], seen[1], seen[3], seen[4]] == [expected] * 4, seen
    # The test's own codec (on the block's connection) is the pool's to close after the block.
    warned = [r.getMessage() for r in caplog.records if "type codec" in r.getMessage()]
    assert warned[1:] == [
        "tether: pool 'pool': a type codec was changed (set_type_codec, "
        "set_builtin_type_codec or reset_type_codec) on a connection while it was held, "
        "which asyncpg's reset keeps: the connection was closed, not returned, so the next holder does not decode "
        "with it. Set codecs in the pool's init= (every connection, once)"
    ]
    assert warned[:1] == [
        "tether: 'conn': the unit of work changed a type codec (set_type_codec, "
        "set_builtin_type_codec or reset_type_codec), which asyncpg's reset keeps: in "
        "production the connection is closed, not returned, so the next unit on it does not "
        "decode with it; in this rolled_back() block the codecs it changed were put back as "
        "the unit found them. Set codecs in the pool's init= (every connection, once), not per "
        "unit of work"
    ]


async def test_a_codec_a_failing_unit_sets_in_a_block_is_put_back(postgres: Postgres) -> None:
    """The same when the unit fails after changing the codec (its savepoint rolled back)."""
    lc = tether.Lifecycle()
    conn = tpg.connection(lc, tpg.pool(lc, postgres.dsn, min_size=1, max_size=1))
    async with lc.run(), tpg.rolled_back(conn):
        with pytest.raises(ZeroDivisionError):
            async with lc.scope() as s:
                c = await s.get(conn)
                await c.set_type_codec(
                    "json", encoder=json.dumps, decoder=_unit_1s, schema="pg_catalog"
                )
                assert await c.fetchval("""SELECT '{"a": 1}'::json""") == "unit 1's decoder"
                1 / 0  # noqa: B018
        async with lc.scope() as s:
            c = await s.get(conn)
            assert await c.fetchval("""SELECT '{"a": 1}'::json""") == '{"a": 1}'


# A unit that resets a codec (``reset_type_codec``) the pool's ``init=`` set: the next unit on
# that connection decoded without it (asyncpg's reset keeps the change), units on the others
# with it. Production now closes that connection as it goes back; a block puts the codec back.

JSONB = """SELECT '{"b": 2}'::jsonb, pg_backend_pid()"""


async def _jsonb_as_dict(c: asyncpg.Connection) -> None:
    await c.set_type_codec("jsonb", encoder=json.dumps, decoder=_as_dict, schema="pg_catalog")


@pytest.mark.parametrize("transaction", [False, True], ids=["autocommit", "tx"])
async def test_a_codec_a_unit_resets_does_not_reach_the_next_unit(
    postgres: Postgres, transaction: bool, caplog: pytest.LogCaptureFixture
) -> None:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=_jsonb_as_dict)
    conn = tpg.connection(lc, pool, transaction=transaction)
    seen = []
    async with lc.run():
        for unit in range(3):
            async with lc.scope() as s:
                c = await s.get(conn)
                if unit == 1:
                    await c.reset_type_codec("jsonb", schema="pg_catalog")
                    assert await c.fetchval(JSONB) == '{"b": 2}'  # asyncpg's own: text
                else:
                    seen.append(tuple(await c.fetchrow(JSONB)))
        figures = lc.stats().pools["pool"]
    assert [row[0] for row in seen] == [{"b": 2}] * 2  # unit 2 used to get '{"b": 2}'
    assert seen[0][1] != seen[1][1]  # unit 1's connection went
    assert (figures.created, figures.discarded) == (2, 0)
    warned = [r.getMessage() for r in caplog.records if "type codec" in r.getMessage()]
    assert warned == [
        "tether: 'conn': the unit of work changed a type codec (set_type_codec, "
        "set_builtin_type_codec or reset_type_codec), which asyncpg's reset keeps: the "
        "connection was closed, not returned, so the next unit on it does not decode with "
        "it. Set codecs in the pool's init= (every connection, once), not per unit of work"
    ]


async def test_a_codec_a_unit_resets_in_a_block_is_put_back(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=_jsonb_as_dict)
    conn = tpg.connection(lc, pool)
    async with lc.run():
        async with tpg.rolled_back(conn) as block:
            with caplog.at_level(logging.WARNING, logger="tether"):
                async with lc.scope() as s:
                    c = await s.get(conn)
                    await c.reset_type_codec("jsonb", schema="pg_catalog")
                    assert await c.fetchval(JSONB) == '{"b": 2}'
                async with lc.scope() as s:
                    c = await s.get(conn)
                    assert await c.fetchval(JSONB) == {"b": 2}  # was '{"b": 2}'
            assert await block.fetchval(JSONB) == {"b": 2}
        # The block's connection went back with the pool's codec: kept, not closed.
        async with lc.scope() as s:
            c = await s.get(conn)
            assert await c.fetchval(JSONB) == {"b": 2}
        figures = lc.stats().pools["pool"]
    assert figures.created == 1
    warned = [r.getMessage() for r in caplog.records if "type codec" in r.getMessage()]
    assert len(warned) == 1
    assert "in this rolled_back() block the codecs" in warned[0]


async def test_a_codec_the_test_resets_on_a_block_stays_reset_after_its_units(
    postgres: Postgres,
) -> None:
    """A test that resets the pool's codec on the block's connection itself: the block's units
    decode as the test left the connection (a unit that changes the codec puts back the
    test's reset, not the pool's ``init=`` codec)."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=1, max_size=1, init=_jsonb_as_dict)
    conn = tpg.connection(lc, pool)
    async with lc.run(), tpg.rolled_back(conn) as block:
        await block.reset_type_codec("jsonb", schema="pg_catalog")
        async with lc.scope() as s:
            c = await s.get(conn)
            await c.set_type_codec(
                "jsonb", encoder=json.dumps, decoder=_unit_1s, schema="pg_catalog"
            )
            assert await c.fetchval(JSONB) == "unit 1's decoder"
        async with lc.scope() as s:
            c = await s.get(conn)
            assert await c.fetchval(JSONB) == '{"b": 2}'  # the test's reset, not init's codec


@pytest.mark.parametrize("transaction", [False, True], ids=["conn", "transaction"])
async def test_a_command_timeout_says_what_ran_out(postgres: Postgres, transaction: bool) -> None:
    """asyncpg's `command_timeout` raises an empty `TimeoutError`: the 500's error now carries
    a note naming it (before: nothing but "TimeoutError"); the endpoint's own
    `asyncio.timeout` gets no such note."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, max_size=2, command_timeout=0.3)
    conn = tpg.connection(lc, pool, transaction=transaction)
    caught: list[BaseException] = []
    async with lc.run():
        for own in (False, True):
            with pytest.raises(TimeoutError) as raised:
                async with lc.scope() as s:
                    c = await s.get(conn)
                    if own:
                        async with asyncio.timeout(0.1):
                            await c.fetchval("SELECT pg_sleep(0.2)")
                    else:
                        await c.fetchval("SELECT pg_sleep(1)")
            caught.append(raised.value)
    assert getattr(caught[0], "__notes__", []) == [
        "tether: asyncpg's timeout for a statement (the call's timeout=, else the pool's "
        "command_timeout=0.3 s) ran out on a statement of this unit of work, and asyncpg "
        "cancelled it on the server. If the statement is slow by design, give that call a "
        "longer timeout= (conn.fetch(..., timeout=30)), or raise the pool's command_timeout=."
    ]
    assert not getattr(caught[1], "__notes__", [])
