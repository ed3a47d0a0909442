"""Run by test_fork.py: open a pool, fork inside the running app scope, and have the child try
to use the parent's pool. Prints what the child was told and whether the parent still works."""

import asyncio
import json
import os
import sys
from typing import Any

import tether


def declare(lc: tether.Lifecycle, driver: str, dsn: str, url: str) -> tether.Resource[Any]:
    if driver == "asyncpg":
        from tether.integrations import asyncpg as tpg

        return tpg.connection(lc, tpg.pool(lc, dsn, name="pg", min_size=1, max_size=2))
    if driver == "psycopg":
        from tether.integrations import psycopg as tpsy

        return tpsy.connection(lc, tpsy.pool(lc, dsn, name="pg", min_size=1, max_size=2))
    from tether.integrations import sqlalchemy as tsa

    return tsa.session(lc, tsa.engine(lc, url, name="pg", pool_size=2))


async def backend_pid(conn: Any) -> int:
    from sqlalchemy import text

    if hasattr(conn, "fetchval"):
        return int(await conn.fetchval("SELECT pg_backend_pid()"))
    if hasattr(conn, "get_bind"):
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
    row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
    return int(row[0])


async def take(pool: Any) -> None:
    """Take a connection straight from the driver's pool."""
    if hasattr(pool, "sync_engine"):  # an AsyncEngine
        async with pool.connect():
            return
    if hasattr(pool, "getconn"):  # psycopg
        async with pool.connection():
            return
    async with pool.acquire():
        return


async def main(driver: str, dsn: str, url: str) -> None:
    lc = tether.Lifecycle()
    conn = declare(lc, driver, dsn, url)
    async with lc.run():
        async with lc.scope("parent") as s:
            before = await backend_pid(await s.get(conn))
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child goes on running this coroutine, on its copy of the loop
            os.close(read)
            said = []
            try:  # through a unit of work
                async with lc.scope("child") as s:
                    await backend_pid(await s.get(conn))
                said.append("the child used the parent's pool")
            except tether.ScopeError as exc:
                said.append(str(exc))
            try:  # straight from the pool
                await take(lc.get(lc.resources["pg"]))
                said.append("the child used the parent's pool")
            except tether.ScopeError as exc:
                said.append(str(exc))
            os.write(write, json.dumps(said).encode())
            os._exit(0)  # no cleanup: the parent's sockets are not the child's to close
        os.close(write)
        os.waitpid(child, 0)
        said = json.loads(os.read(read, 65536).decode())
        async with lc.scope("parent again") as s:
            after = await backend_pid(await s.get(conn))
    print(json.dumps({"child": said, "parent": os.getpid(), "child_pid": child,
                      "same_backend": before == after}))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
