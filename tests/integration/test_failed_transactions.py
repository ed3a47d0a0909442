"""A transaction that a failed statement aborted, its error caught by the endpoint, never
answers 200.

PostgreSQL answers ``COMMIT`` of such a transaction with a rollback and no error, and every
driver reports success: before, the endpoint's 200 went out with nothing committed. Now the
commit fails (a 500 naming the cause), the connection goes back clean, and a statement that
failed inside a savepoint rolled back to still lets the transaction commit.
"""

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import anyio.to_thread
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from tests.integration.drivers import DRIVERS
from tests.servers import Postgres

pytestmark = pytest.mark.servers

FIX = (
    "a statement of the unit of work's transaction failed and its error was caught, so the "
    "transaction was aborted and could not commit: nothing was committed (it was rolled back). "
    "Let the error propagate (tether rolls back and answers it), or run what may fail in a "
    "savepoint ({savepoint}) and carry on after it."
)
SAID = {
    "asyncpg": "InFailedSQLTransactionError: Connection 'conn': ",
    "psycopg": "InFailedSqlTransaction: Connection 'conn': ",
    "sqlalchemy": "PendingRollbackError: Engine 'engine': ",
    "sqlalchemy-sync": "PendingRollbackError: Engine 'engine': ",
}
SAVEPOINT = {
    "asyncpg": "`async with conn.transaction():`",
    "psycopg": "`async with conn.transaction():`",
    "sqlalchemy": "`async with session.begin_nested():`",
    "sqlalchemy-sync": "`with session.begin_nested():`",
}


@pytest.fixture
def table(postgres: Postgres) -> Iterator[str]:
    name = f"failed_tx_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE TABLE {name} (k int)")
    yield name
    postgres.sql(f"DROP TABLE {name}")


async def in_savepoint(driver_name: str, c: Any, run: Any) -> None:
    """Run *run()* in a savepoint of *c*'s transaction, the driver's way."""
    if driver_name in ("asyncpg", "psycopg"):
        async with c.transaction():
            await run()
    elif driver_name == "sqlalchemy":
        async with c.begin_nested():
            await run()
    else:
        nested = await anyio.to_thread.run_sync(c.begin_nested)
        try:
            await run()
        except BaseException:
            await anyio.to_thread.run_sync(nested.rollback)
            raise
        await anyio.to_thread.run_sync(nested.commit)


@pytest.mark.parametrize("driver_name", sorted(DRIVERS))
def test_a_caught_error_in_the_transaction_is_a_500_and_nothing_is_committed(
    driver_name: str, postgres: Postgres, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    d = DRIVERS[driver_name](postgres.dsn, f"failed-tx-{driver_name}")
    C = Annotated[Any, Depends(d.conn)]
    app = FastAPI(lifespan=d.lc.lifespan)

    @app.post("/caught/{k}")
    async def caught(k: int, c: C) -> dict[str, int]:
        await d.scalar(c, f"INSERT INTO {table} VALUES (%s)", (k,))
        try:
            await d.scalar(c, "SELECT 1/0", ())
        except Exception:
            pass  # "the row is written anyway", thinks the endpoint
        return {"k": k}

    @app.post("/savepoint/{k}")
    async def savepoint(k: int, c: C) -> dict[str, int]:
        await d.scalar(c, f"INSERT INTO {table} VALUES (%s)", (k,))

        async def fails() -> None:
            await d.scalar(c, "SELECT 1/0", ())

        try:
            await in_savepoint(driver_name, c, fails)
        except Exception:
            pass  # rolled back to the savepoint: the transaction goes on
        await d.scalar(c, f"INSERT INTO {table} VALUES (%s)", (k + 1,))
        return {"k": k}

    with TestClient(app, raise_server_exceptions=False) as client:
        with caplog.at_level(logging.ERROR, logger="tether"):
            r = client.post("/caught/1")
        assert r.status_code == 500, r.text
        assert postgres.sql(f"SELECT k FROM {table}") == []
        message = SAID[driver_name] + FIX.format(savepoint=SAVEPOINT[driver_name])
        assert any(message in record.getMessage() for record in caplog.records), [
            record.getMessage() for record in caplog.records
        ]
        # The connection went back clean: the next units of work commit.
        r = client.post("/savepoint/10")
        assert r.status_code == 200, r.text
        assert sorted(postgres.sql(f"SELECT k FROM {table}")) == [(10,), (11,)]
        for _ in range(3):  # through every connection of the pool (2)
            assert client.post("/savepoint/20").status_code == 200
        assert d.checked_out() == 0
    deadline = time.monotonic() + 5  # a closed backend leaves pg_stat_activity as it exits
    while postgres.sql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        [f"failed-tx-{driver_name}"],
    ):
        assert time.monotonic() < deadline, "a backend of the app outlived its shutdown"
        time.sleep(0.02)
