"""The integrations' errors for bad settings, each pinned whole: what, why, and the fix.

None needs a server: they are raised where the resource is declared, or as the app starts
before anything connects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tether
from tests.unit._messages import exactly, misconfigured
from tether.integrations import aiosqlite as tsqlite
from tether.integrations import asyncpg as tpg
from tether.integrations import httpx as thttpx
from tether.integrations import psycopg as tpsycopg
from tether.integrations import sqlalchemy as tsa
from tether.integrations._common import depends_on

pytestmark = [pytest.mark.anyio, pytest.mark.fastapi_free]


async def _start(lc: tether.Lifecycle) -> None:
    async with lc.run():
        pass  # pragma: no cover - every test here fails to start


class TestAiosqlite:
    async def test_in_memory_database(self) -> None:
        lc = tether.Lifecycle()
        tsqlite.database(lc, ":memory:")
        cause = (
            "ValueError: An in-memory SQLite database (':memory:') is private to one "
            "connection, and tether opens one connection per unit of work: use a file (a "
            "temporary one in tests)"
        )
        with pytest.raises(tether.StartupError, match=misconfigured("database", cause)):
            await _start(lc)

    def test_max_connections(self, tmp_path: Path) -> None:
        with pytest.raises(
            ValueError,
            match=exactly("database('database'): max_connections=0 must be 1 or more."),
        ):
            tsqlite.database(tether.Lifecycle(), tmp_path / "x.db", max_connections=0)

    def test_begin(self, tmp_path: Path) -> None:
        with pytest.raises(
            ValueError,
            match=exactly(
                "connection('connection'): begin='later' is not deferred, immediate or exclusive."
            ),
        ):
            tsqlite.connection(tether.Lifecycle(), tmp_path / "x.db", begin="later")  # type: ignore[arg-type]

    def test_database_settings_given_to_the_connection(self, tmp_path: Path) -> None:
        lc = tether.Lifecycle()
        db = tsqlite.database(lc, tmp_path / "x.db")
        with pytest.raises(
            TypeError,
            match=exactly(
                "connection('connection'): ['busy_timeout', 'wal'] are settings of the database "
                "resource 'database': pass them to database()."
            ),
        ):
            tsqlite.connection(lc, db, wal=False, busy_timeout=1.0)

    def test_a_misspelt_option_beside_a_database_resource_is_named_as_such(
        self, tmp_path: Path
    ) -> None:
        """Before: "['begn'] are settings of the database resource 'database': pass them to
        database()", which takes no such setting either."""
        lc = tether.Lifecycle()
        db = tsqlite.database(lc, tmp_path / "x.db")
        with pytest.raises(
            TypeError,
            match=exactly(
                "connection('connection'): begn= is not an option of connection() nor of "
                "database(), which connection() passes its other keyword arguments to. Did "
                "you mean begin=? Fix or remove it."
            ),
        ):
            tsqlite.connection(lc, db, begn="immediate")


class TestPostgresPools:
    @pytest.mark.parametrize("sizes", [{"max_size": 0}, {"min_size": 5, "max_size": 2}])
    @pytest.mark.parametrize("make", [tpg.pool, tpsycopg.pool], ids=["asyncpg", "psycopg"])
    def test_sizes(self, make: Any, sizes: dict[str, int]) -> None:
        with pytest.raises(
            ValueError,
            match=exactly("Pool 'pool': need 0 <= min_size <= max_size and max_size >= 1."),
        ):
            make(tether.Lifecycle(), "postgresql://localhost/x", **sizes)

    def test_asyncpg_acquire_timeout(self) -> None:
        with pytest.raises(
            ValueError,
            match=exactly("Pool 'pool': acquire_timeout=0 must be a positive number."),
        ):
            tpg.pool(tether.Lifecycle(), "postgresql://localhost/x", acquire_timeout=0)

    def test_psycopg_timeout(self) -> None:
        with pytest.raises(
            ValueError,
            match=exactly("Pool 'pool': timeout=-1.0 must be a positive number of seconds."),
        ):
            tpsycopg.pool(tether.Lifecycle(), "postgresql://localhost/x", timeout=-1.0)


class TestSqlalchemy:
    def test_session_of_something_else(self) -> None:
        with pytest.raises(
            TypeError,
            match=exactly(
                "session(): `engine` must be the resource returned by engine()/sync_engine() "
                "(or another resource) on this Lifecycle, not 'sqlite+aiosqlite://'."
            ),
        ):
            tsa.session(tether.Lifecycle(), "sqlite+aiosqlite://")  # type: ignore[arg-type]

    def test_sync_session_of_an_engine_of_unknown_size(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        def own_engine() -> Iterator[Any]:
            yield None  # pragma: no cover - never opened

        with pytest.raises(
            ValueError,
            match=exactly(
                "sync_session('session'): cannot tell how many connections the pool of "
                "'own_engine' gives at once; pass concurrency= (its pool_size + max_overflow)."
            ),
        ):
            tsa.sync_session(lc, own_engine)

    async def test_pgbouncer_on_another_database(self, tmp_path: Path) -> None:
        lc = tether.Lifecycle()
        tsa.engine(lc, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", pgbouncer=True)
        cause = "ValueError: Engine 'engine': pgbouncer=True is for PostgreSQL URLs, not 'sqlite'"
        with pytest.raises(tether.StartupError, match=misconfigured("engine", cause)):
            await _start(lc)

    async def test_pgbouncer_with_a_driver_it_does_not_know(self) -> None:
        lc = tether.Lifecycle()
        tsa.sync_engine(lc, "postgresql+pg8000://u@127.0.0.1:9/x", pgbouncer=True)
        cause = (
            "ValueError: Engine 'engine': pgbouncer=True does not know how to configure the "
            "'pg8000' driver. Use postgresql+asyncpg or postgresql+psycopg, or configure the "
            "driver yourself with connect_args="
        )
        with pytest.raises(tether.StartupError, match=misconfigured("engine", cause)):
            await _start(lc)


async def test_httpx_check_of_a_closed_client() -> None:
    """The default health check of a client says when the client was closed under it."""
    lc = tether.Lifecycle()
    http = thttpx.client(lc, base_url="http://127.0.0.1:9")
    async with lc.run():
        client: httpx.AsyncClient = lc.get(http)
        assert (await lc.health()).ok
        await client.aclose()
        report = await lc.health()
    assert not report.ok
    assert report["http"].error == "RuntimeError: the client is closed"


def test_depends_on_needs_distinct_names() -> None:
    lc = tether.Lifecycle()

    @lc.resource(scope="app", name="pool")
    def first() -> str:
        return "a"  # pragma: no cover

    other = tether.Lifecycle()

    @other.resource(scope="app", name="pool")
    def second() -> str:
        return "b"  # pragma: no cover

    with pytest.raises(
        ValueError,
        match=exactly("depends_on: resources ['pool', 'pool'] must have distinct names."),
    ):
        depends_on(lambda a, b: None, first, second)
