"""tether.redis hands out one client for the app, over redis-py's pool, which gives each
command any free connection and resets nothing. A command that changes the state of the
connection it runs on (``SELECT``, ``MULTI``, ``AUTH``, ...) would reach later commands of any
request that get that connection: with a pool of one, the next request read another
database, had every command answered ``QUEUED``, or acted as another ACL user. The client
refuses those commands before sending anything, naming the form that works; those forms
(a client per database or user, pipelines, PubSub) work. Against a real Redis, with a pool of
one connection, so that every command gets the same one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

import tether
from tests.servers import Redis
from tests.unit._messages import exactly
from tether.integrations import redis as tredis

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

SHARED = "and redis-py hands that connection to any later command, another request's too: "
REFUSED = "refused, nothing was sent."


@pytest.fixture
async def one(redis_server: Redis) -> AsyncIterator[aioredis.Redis]:
    """tether's client with a pool of one connection, open."""
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, max_connections=1, decode_responses=True)
    async with lc.run():
        yield lc.get(cache)


async def clean(r: aioredis.Redis) -> None:
    """The pool's one connection as the client opened it: database 0, the default user, no
    transaction, nothing watched."""
    info = await r.client_info()
    assert (info["db"], info["user"], info["multi"], info["flags"]) == (0, "default", -1, "N")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            lambda r: r.select(3),
            f"SELECT 3 would leave the pooled connection it runs on using database 3, not the "
            f"client's, {SHARED}{REFUSED} A client's database is fixed: use a client of its own "
            f"for database 3, its number in the URL (tredis.client(lc, "
            f"'redis://host:6379/3', name=...)), or redis.asyncio.Redis(db=3) in a script.",
        ),
        (
            lambda r: r.execute_command("MULTI"),
            f"MULTI would leave the pooled connection it runs on inside a transaction, where "
            f"every later command is queued, not run, until EXEC, {SHARED}{REFUSED} Run a "
            f"transaction in a pipeline, which holds one connection for it: async with "
            f"r.pipeline(transaction=True) as pipe: pipe.incr(key); ...; await pipe.execute(). "
            f"Or by hand on a connection of its own: async with r.client() as c: await "
            f"c.execute_command('MULTI'); ...",
        ),
        (
            lambda r: r.execute_command("WATCH", "k"),
            f"WATCH would leave the pooled connection it runs on watching keys until an EXEC, "
            f"{SHARED}{REFUSED} WATCH in a pipeline, which holds one connection until it ends: "
            f"async with r.pipeline() as pipe: await pipe.watch(key); ...; pipe.multi(); ...; "
            f"await pipe.execute(). Or by hand on a connection of its own: async with "
            f"r.client() as c: await c.execute_command('WATCH', key); ...",
        ),
        (
            lambda r: r.auth("ops-secret-pw", "ops"),
            f"AUTH would leave the pooled connection it runs on authenticated as another user, "
            f"{SHARED}{REFUSED} Use a client of its own for each ACL user: the user and "
            f"password in its URL (redis://user:password@host/0), or username= and password=.",
        ),
        (
            lambda r: r.execute_command("HELLO", 2, "AUTH", "ops", "ops-secret-pw"),
            f"HELLO ... AUTH would leave the pooled connection it runs on authenticated as "
            f"another user, {SHARED}{REFUSED} Use a client of its own for each ACL user: the "
            f"user and password in its URL (redis://user:password@host/0), or username= and "
            f"password=.",
        ),
        (
            lambda r: r.client_setname("reports"),
            f"CLIENT SETNAME would leave the pooled connection it runs on with a setting of its "
            f"own, {SHARED}{REFUSED} Give every connection of the client the setting "
            f"(client_name=, ...), or use a client of its own for it.",
        ),
        (
            lambda r: r.execute_command("SUBSCRIBE", "news"),
            f"SUBSCRIBE would leave the pooled connection it runs on in subscribed mode, where "
            f"it answers nothing else, {SHARED}{REFUSED} Subscribe through a PubSub object, "
            f"which holds a connection of its own: async with r.pubsub() as ps: await "
            f"ps.subscribe(channel).",
        ),
    ],
    ids=["select", "multi", "watch", "auth", "hello-auth", "client-setname", "subscribe"],
)
async def test_a_command_that_would_change_the_pooled_connection_is_refused(
    one: aioredis.Redis,
    command: Callable[[aioredis.Redis], Awaitable[Any]],
    message: str,
) -> None:
    """Refused before anything is sent (the password is not shown): the next command, on
    the same connection, finds it as the client opened it."""
    with pytest.raises(tether.ScopeError, match=exactly(f"Redis client 'redis': {message}")):
        await command(one)
    await clean(one)
    assert await one.set("k", "v") is True  # answered, not QUEUED


@pytest.mark.parametrize("transaction", [True, False])
@pytest.mark.parametrize(
    ("buffer", "message"),
    [
        (lambda p: p.select(3), "SELECT 3 would leave the pooled connection it runs on using "),
        (
            lambda p: p.execute_command("MULTI"),
            "MULTI would leave the pooled connection it runs on inside a transaction",
        ),
        (
            lambda p: p.client_setname("hijacked"),
            "CLIENT SETNAME would leave the pooled connection it runs on with a setting",
        ),
    ],
    ids=["select", "multi", "client-setname"],
)
async def test_a_pipeline_that_would_change_the_pooled_connection_is_refused(
    one: aioredis.Redis, transaction: bool, buffer: Callable[[Any], Any], message: str
) -> None:
    """Refused at `execute()`, before anything is sent: a `SELECT 3` in a pipeline had the
    next requests on that connection read database 3, and a `MULTI` had them answered
    `QUEUED`, their writes lost, with 200s (trial 27)."""
    key = f"tt-pipe-{uuid.uuid4().hex[:6]}"
    async with one.pipeline(transaction=transaction) as pipe:
        pipe.incr(key)
        buffer(pipe)
        pipe.incr(key)
        with pytest.raises(tether.ScopeError, match=f"^Redis client 'redis': {message}"):
            await pipe.execute()
    await clean(one)
    assert await one.incr(key) == 1  # nothing of the pipeline ran; answered, not QUEUED
    info = await one.client_info()
    assert info["name"] != "hijacked"


async def test_select_of_the_clients_own_database_is_harmless(one: aioredis.Redis) -> None:
    assert await one.select(0) is True
    await clean(one)


async def test_the_forms_that_change_no_pooled_connection_work(
    redis_server: Redis, one: aioredis.Redis
) -> None:
    """A transaction and WATCH in pipelines, PubSub, a client for another database and one
    for another ACL user: each does what it says, and the shared connection stays clean."""
    key = f"tt-state-{uuid.uuid4().hex[:6]}"
    async with one.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.incr(key)
        assert await pipe.execute() == [1, 2]
    async with one.pipeline() as pipe:
        await pipe.watch(key)
        value = int(await pipe.get(key))
        pipe.multi()
        pipe.set(key, value + 1)
        assert await pipe.execute() == [True]
    await clean(one)
    assert await one.get(key) == "3"

    user, password = f"tt-ops-{uuid.uuid4().hex[:6]}", "ops-secret-pw"
    await one.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    lc = tether.Lifecycle()
    port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    reports = tredis.client(lc, f"redis://127.0.0.1:{port}/3", name="reports")
    ops = tredis.client(lc, f"redis://{user}:{password}@127.0.0.1:{port}/0", name="ops")
    try:
        async with lc.run():
            assert (await lc.get(reports).client_info())["db"] == 3
            assert (await lc.get(ops).acl_whoami()) == user
            async with lc.get(ops).pubsub() as ps:
                await ps.subscribe(key)
                first = await ps.get_message(timeout=2)
                assert first is not None
                assert first["type"] == "subscribe"
                assert await one.publish(key, "hi") == 1
                message = await ps.get_message(timeout=2)
            assert message is not None
            assert message["data"] == b"hi"
    finally:
        await one.acl_deluser(user)
        await one.delete(key)
    await clean(one)


async def test_a_pipeline_watching_keys_sends_no_command_that_changes_its_connection(
    one: aioredis.Redis,
) -> None:
    """After `watch()` a pipeline sends its commands at once: a `SELECT 3` then went out
    unchecked, and the connection went back to the pool in database 3 (trial 28). Refused
    as it is sent; the pipeline's own WATCH passes."""
    key = f"tt-watching-{uuid.uuid4().hex[:6]}"
    async with one.pipeline() as pipe:
        await pipe.watch(key)
        with pytest.raises(tether.ScopeError, match="^Redis client 'redis': SELECT 3 would"):
            await pipe.select(3)
    await clean(one)
    assert await one.set(key, "v") is True
