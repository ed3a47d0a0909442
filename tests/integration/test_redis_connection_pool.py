"""redis ``client(lc, url, connection_pool=...)``: tether makes and owns the pool, and redis-py
passed ``connection_pool=`` on to each connection, so the app failed at startup with
"AbstractConnection.__init__() got an unexpected keyword argument 'connection_pool'".
Refused at declaration now, saying what to give instead."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

import tether
from tests.servers import Redis
from tests.unit._messages import exactly
from tether.integrations import redis as tredis

pytestmark = [pytest.mark.fastapi_free]

MESSAGE = (
    "Redis client 'redis': connection_pool= cannot be given: client() makes the connection "
    "pool from the URL and owns it (it closes it at shutdown), and redis-py would pass "
    "connection_pool= on to each connection, which refuses it at startup. Give the pool's "
    "options as keywords instead (max_connections=, pool_timeout=, connection_class=, ...), "
    "or declare an app resource of your own returning "
    "redis.asyncio.Redis(connection_pool=...) to use a pool you make."
)


@pytest.mark.parametrize("max_connections", [None, 4])
@pytest.mark.parametrize("given", ["a pool", "None"])
def test_connection_pool_is_refused_at_declaration(max_connections: int | None, given: str) -> None:
    lc = tether.Lifecycle()
    pool = aioredis.ConnectionPool.from_url("redis://x") if given == "a pool" else None
    with pytest.raises(TypeError, match=exactly(MESSAGE)):
        tredis.client(lc, "redis://x", max_connections=max_connections, connection_pool=pool)
    assert lc.resources == {}


@pytest.mark.servers
@pytest.mark.anyio
async def test_the_pools_options_as_keywords_work(redis_server: Redis) -> None:
    """What the message says to do instead: the pool's size as max_connections=."""
    lc = tether.Lifecycle()
    r = tredis.client(lc, redis_server.url, max_connections=3)
    async with lc.run(), lc.scope() as s:
        client = await s.get(r)
        assert await client.ping()
        assert client.connection_pool.max_connections == 3
