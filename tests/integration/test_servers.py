"""The throwaway servers of tests/servers.py work: PostgreSQL, Redis, PgBouncer."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest
import redis

from tests import servers
from tests.servers import PgBouncer, Postgres, Redis

pytestmark = [pytest.mark.servers, pytest.mark.fastapi_free]


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port_hex = fields[1].partition(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


# --- PostgreSQL ------------------------------------------------------------------------------


def test_postgres_password_dsn(postgres: Postgres) -> None:
    assert postgres.dsn == (f"postgresql://tether:s3cret-pw@127.0.0.1:{postgres.port}/tether")
    assert (postgres.host, postgres.user, postgres.password, postgres.database) == (
        "127.0.0.1",
        "tether",
        "s3cret-pw",
        "tether",
    )
    with psycopg.connect(postgres.dsn) as conn:
        assert conn.execute("SHOW max_connections").fetchone() == ("100",)
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "tether",
            "tether",
        )
        # the role really has the password (scram), so tests can look for it in outputs
        row = conn.execute(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%%', rolsuper FROM pg_authid "
            "WHERE rolname = 'tether'"
        ).fetchone()
        assert row == (True, True)


def test_postgres_settings(postgres: Postgres) -> None:
    settings = dict(
        postgres.sql(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            [
                [
                    "listen_addresses",
                    "unix_socket_directories",
                    "fsync",
                    "synchronous_commit",
                    "full_page_writes",
                ]
            ],
        )
    )
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(postgres.directory),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    assert postgres.log_path.is_file()
    assert _listening_addresses(postgres.port) == {"0100007F"}  # 127.0.0.1 only


def test_postgres_sql_helper(postgres: Postgres) -> None:
    assert postgres.sql("SELECT 1, 'a'") == [(1, "a")]
    assert postgres.sql("SELECT %s::int + 1", [41]) == [(42,)]
    assert postgres.sql("CREATE TABLE IF NOT EXISTS sql_helper (x int)") == []
    assert postgres.sql("DROP TABLE sql_helper") == []


def test_postgres_activity(postgres: Postgres) -> None:
    name = "tether-test-activity"
    assert postgres.activity(name) == []
    with psycopg.connect(postgres.dsn, application_name=name, autocommit=True) as conn:
        conn.execute("SELECT 42")
        rows = postgres.activity(name)
        assert len(rows) == 1
        row = rows[0]
        assert row["pid"] == conn.info.backend_pid
        assert row["state"] == "idle"
        assert row["query"] == "SELECT 42"
        assert row["backend_start"] is not None
        assert row["usename"] == "tether"
        # the helpers' own connections are never reported
        assert all(r["application_name"] != servers.ADMIN_APPLICATION_NAME for r in rows)
        assert any(r["pid"] == conn.info.backend_pid for r in postgres.activity())
    assert _eventually(lambda: postgres.activity(name) == [])


def test_postgres_terminate(postgres: Postgres) -> None:
    name = "tether-test-terminate"
    with psycopg.connect(postgres.dsn, application_name=name, autocommit=True) as conn:
        conn.execute("SELECT 1")
        assert postgres.terminate(name) == 1
        assert postgres.activity(name) == []
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert postgres.terminate(name) == 0


def test_postgres_restart(postgres: Postgres) -> None:
    port = postgres.port
    with psycopg.connect(postgres.dsn, autocommit=True) as old:
        old_pid = old.info.backend_pid
        postgres.restart()
        with pytest.raises(psycopg.OperationalError):
            old.execute("SELECT 1")
    assert postgres.port == port
    assert postgres.running
    with psycopg.connect(postgres.dsn, autocommit=True) as new:
        assert new.execute("SELECT 1").fetchone() == (1,)
        assert new.info.backend_pid != old_pid


def test_postgres_own_cluster_kill_and_start() -> None:
    with Postgres(max_connections=7) as pg:
        directory = pg.directory
        assert pg.sql("SHOW max_connections") == [("7",)]
        pg.kill()
        assert not pg.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn, connect_timeout=2).close()
        pg.start()  # same cluster again, after crash recovery
        assert pg.directory == directory
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("tether",)
    assert not directory.exists()


# --- Redis -----------------------------------------------------------------------------------


def test_redis_ping_and_client_list(redis_server: Redis) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.command("PING") == "PONG"
    assert _listening_addresses(redis_server.port) == {"0100007F"}
    name = "tether-test-client"
    with redis.Redis.from_url(redis_server.url, client_name=name) as client:
        assert client.ping() is True
        clients = redis_server.client_list(name)
        assert len(clients) == 1
        assert clients[0]["addr"].startswith("127.0.0.1:")
        assert clients[0]["name"] == name
        assert any(c["name"] == name for c in redis_server.client_list())
    assert _eventually(lambda: redis_server.client_list(name) == [])


# --- PgBouncer -------------------------------------------------------------------------------


def test_pgbouncer_asyncpg(pgbouncer: PgBouncer, postgres: Postgres) -> None:
    assert pgbouncer.dsn == f"postgresql://tether:s3cret-pw@127.0.0.1:{pgbouncer.port}/tether"
    assert pgbouncer.port != postgres.port
    assert _listening_addresses(pgbouncer.port) == {"0100007F"}

    async def main() -> tuple[int, str]:
        conn = await asyncpg.connect(pgbouncer.dsn, statement_cache_size=0)
        try:
            value = await conn.fetchval("SELECT $1::int + 1", 41)
            user = await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()
        return value, user

    assert asyncio.run(main()) == (42, "tether")


def test_pgbouncer_psycopg_and_console(pgbouncer: PgBouncer) -> None:
    with psycopg.connect(pgbouncer.dsn, prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    pools = {row["database"]: row for row in pgbouncer.show("POOLS")}
    assert pools["tether"]["pool_mode"] == "transaction"
    config = {row["key"]: row["value"] for row in pgbouncer.show("CONFIG")}
    assert config["default_pool_size"] == "10"
    assert config["listen_addr"] == "127.0.0.1"


def test_pgbouncer_survives_postgres_restart(pgbouncer: PgBouncer, postgres: Postgres) -> None:
    with psycopg.connect(pgbouncer.dsn, prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    postgres.restart()  # pgbouncer's pooled server connection dies with it
    # server_login_retry = 1: pgbouncer reconnects at once (the default waits 15 s)
    deadline = time.monotonic() + 5
    while True:
        try:
            with psycopg.connect(pgbouncer.dsn, prepare_threshold=None, autocommit=True) as conn:
                assert conn.execute("SELECT 2").fetchone() == (2,)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_pgbouncer_wrong_password_is_refused(pgbouncer: PgBouncer) -> None:
    dsn = pgbouncer.dsn.replace("s3cret-pw", "wrong")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5).close()


# --- errors ----------------------------------------------------------------------------------


def test_missing_binary_names_the_package() -> None:
    with pytest.raises(RuntimeError, match=r"'tether-pkg'.*scripts/system-deps\.sh"):
        servers._find_binary("tether-no-such-binary", "tether-pkg")
