"""``r.client()`` on tether's Redis client: redis-py's client holding one connection of the
pool for itself until it is closed, the documented way to run ``WATCH``/``MULTI``/``EXEC`` by
hand. It is tether's client too: named as the resource in its refusals, and still refusing
what would outlive it in the pool (``SELECT``, ``AUTH``, ...). The transaction commands run
on it; redis-py's pool resets nothing when the connection comes back, so one given back
inside a transaction or watching keys (a request that failed between ``MULTI`` and ``EXEC``,
or was cancelled) is disconnected first: the next command, another request's, finds it clean
instead of answered ``QUEUED``. Against a real Redis, with a pool of one connection, so that
every command gets the same one."""

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
import tether.fastapi  # noqa: F401  # imported here, not by the lifespan in TestClient's thread
from tests.servers import Redis
from tests.unit._messages import exactly
from tether.integrations import redis as tredis

pytestmark = pytest.mark.servers

SHARED = "and redis-py hands that connection to any later command, another request's too: "
REFUSED = "refused, nothing was sent."


def unique() -> str:
    return f"tt-dedicated-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def one(redis_server: Redis) -> AsyncIterator[aioredis.Redis]:
    """tether's client named 'cache', with a pool of one connection, open."""
    lc = tether.Lifecycle()
    cache = tredis.client(
        lc, redis_server.url, name="cache", max_connections=1, decode_responses=True
    )
    async with lc.run():
        yield lc.get(cache)


async def clean(r: aioredis.Redis) -> None:
    """The pool's one connection as the client opened it: database 0, the default user, no
    transaction."""
    info = await r.client_info()
    assert (info["db"], info["user"], info["multi"], info["flags"]) == (0, "default", -1, "N")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            ("SELECT", 3),
            f"SELECT 3 would leave the pooled connection it runs on using database 3, not the "
            f"client's, {SHARED}{REFUSED} A client's database is fixed: use a client of its own "
            f"for database 3, its number in the URL (tredis.client(lc, "
            f"'redis://host:6379/3', name=...)), or redis.asyncio.Redis(db=3) in a script.",
        ),
        (
            ("AUTH", "ops", "ops-secret-pw"),
            f"AUTH would leave the pooled connection it runs on authenticated as another user, "
            f"{SHARED}{REFUSED} Use a client of its own for each ACL user: the user and "
            f"password in its URL (redis://user:password@host/0), or username= and password=.",
        ),
        (
            ("SUBSCRIBE", "news"),
            f"SUBSCRIBE would leave the pooled connection it runs on in subscribed mode, where "
            f"it answers nothing else, {SHARED}{REFUSED} Subscribe through a PubSub object, "
            f"which holds a connection of its own: async with r.pubsub() as ps: await "
            f"ps.subscribe(channel).",
        ),
    ],
    ids=["select", "auth", "subscribe"],
)
async def test_a_dedicated_client_refuses_what_would_outlive_it_naming_the_resource(
    one: aioredis.Redis, command: tuple[Any, ...], message: str
) -> None:
    """The clone is tether's client, named 'cache' as the resource (it said 'redis'): these
    would stay with the connection after the clone gives it back to the pool."""
    async with one.client() as c:
        with pytest.raises(tether.ScopeError, match=exactly(f"Redis client 'cache': {message}")):
            await c.execute_command(*command)
        assert await c.set("k", "v") is True  # answered, not QUEUED
    await clean(one)


@pytest.mark.anyio
async def test_watch_multi_exec_run_on_a_dedicated_client(
    redis_server: Redis, one: aioredis.Redis
) -> None:
    """Optimistic locking by hand, as redis-py documents it: the transaction runs, one whose
    watched key changed meanwhile does not (EXEC answers nil), UNWATCH and DISCARD work; a
    connection given back after its transaction ended is kept (the same CLIENT ID), clean."""
    key = unique()
    async with one.client() as c:
        held = await c.client_id()
        await c.execute_command("WATCH", key)
        assert await c.get(key) is None
        assert await c.execute_command("MULTI") == "OK"
        assert await c.execute_command("INCR", key) == "QUEUED"
        assert await c.execute_command("INCR", key) == "QUEUED"
        assert await c.execute_command("EXEC") == [1, 2]

        await c.execute_command("WATCH", key)
        redis_server.command("SET", key, "changed")  # another client, meanwhile
        await c.execute_command("MULTI")
        await c.execute_command("INCR", key)
        assert await c.execute_command("EXEC") is None  # not run: the key changed

        await c.execute_command("WATCH", key)
        await c.execute_command("UNWATCH")
        await c.execute_command("MULTI")
        await c.execute_command("INCR", key)
        assert await c.execute_command("DISCARD") == "OK"
    assert await one.get(key) == "changed"
    assert await one.client_id() == held  # not disconnected: nothing was left open on it
    await clean(one)
    await one.delete(key)


@pytest.mark.anyio
async def test_a_dedicated_client_cancelled_inside_multi_gives_back_a_clean_connection(
    one: aioredis.Redis,
) -> None:
    """Cancelled between MULTI and EXEC (a client that went away): the connection goes back
    to the pool disconnected, and the next command is answered, not QUEUED."""
    key = unique()
    with anyio.move_on_after(0.2):
        async with one.client() as c:
            await c.execute_command("MULTI")
            await c.execute_command("INCR", key)
            await anyio.sleep(10)
    assert await one.incr(key) == 1
    await clean(one)
    await one.delete(key)


LOST = "Redis client 'cache': the connection of r.client() was lost "
AGAIN = "Retry shortly; if it persists, check the Redis server."


@pytest.mark.anyio
async def test_a_connection_lost_while_watching_is_not_reconnected_without_the_watch(
    redis_server: Redis, one: aioredis.Redis
) -> None:
    """redis-py's retry reconnects a connection that went away and sends the command again:
    after WATCH, on a connection the server forgot the watched keys with, so EXEC ran
    although the key had changed. The command fails instead (a 503 that says the unit may be
    run again), and the transaction, run again, runs on a new connection."""
    key = unique()
    async with one.client() as c:
        held = await c.client_id()
        await c.execute_command("WATCH", key)
        redis_server.command("CLIENT", "KILL", "ID", str(held))
        message = (
            f"{LOST}while watching keys (after WATCH): the server forgot the watched keys "
            f"with it. It was not reconnected, which would run the next commands unguarded by "
            f"the watched keys: run the transaction again, from WATCH. {AGAIN}"
        )
        with pytest.raises(tredis.RedisUnavailable, match=exactly(message)) as info:
            await c.get(key)
        assert (info.value.lost, info.value.resource) == (True, "cache")

        await c.execute_command("WATCH", key)
        assert await c.client_id() != held
        await c.execute_command("MULTI")
        await c.execute_command("INCR", key)
        assert await c.execute_command("EXEC") == [1]
    await clean(one)
    await one.delete(key)


@pytest.mark.anyio
async def test_a_connection_lost_inside_multi_runs_none_of_the_transaction(
    redis_server: Redis, one: aioredis.Redis
) -> None:
    """After MULTI, the retry's new connection ran the next command at once, outside the
    transaction (the server had dropped it, and the INCR queued before): now that command
    fails, and neither INCR ran."""
    key = unique()
    async with one.client() as c:
        held = await c.client_id()
        await c.execute_command("MULTI")
        assert await c.execute_command("INCR", key) == "QUEUED"
        redis_server.command("CLIENT", "KILL", "ID", str(held))
        message = (
            f"{LOST}inside a transaction (after MULTI): the server dropped the transaction "
            f"with it, and ran none of its queued commands. It was not reconnected, which "
            f"would run the next commands outside the transaction: run the transaction again, "
            f"from MULTI (or WATCH). {AGAIN}"
        )
        with pytest.raises(tredis.RedisUnavailable, match=exactly(message)):
            await c.execute_command("INCR", key)
    assert await one.get(key) is None
    await clean(one)


@pytest.mark.anyio
async def test_a_health_check_due_inside_multi_does_not_end_the_transaction(
    redis_server: Redis,
) -> None:
    """redis-py pings a connection idle past health_check_interval before its next command:
    inside MULTI the PING was queued, not answered, redis-py took the connection for dead
    and reconnected it, and the next command ran outside the transaction (EXEC then failed:
    "EXEC without MULTI"). No health check runs inside MULTI."""
    key = unique()
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, health_check_interval=1, decode_responses=True)
    async with lc.run():
        r = lc.get(cache)
        async with r.client() as c:
            held = await c.client_id()
            await c.execute_command("MULTI")
            await anyio.sleep(1.2)
            assert await c.execute_command("INCR", key) == "QUEUED"
            assert await c.execute_command("EXEC") == [1]
            assert await c.client_id() == held
        await r.delete(key)


def make_app(url: str) -> FastAPI:
    lc = tether.Lifecycle()
    cache = tredis.client(lc, url, name="cache", max_connections=1, decode_responses=True)
    R = Annotated[aioredis.Redis, Depends(cache)]
    app = FastAPI(lifespan=lc.lifespan)

    @app.post("/bump/{key}")
    async def bump(key: str, r: R, fail: bool = False) -> Any:
        """Increments *key* in a WATCH/MULTI/EXEC transaction on a dedicated connection;
        *fail*: raises after MULTI, before EXEC."""
        async with r.client() as c:
            await c.execute_command("WATCH", key)
            value = int(await c.get(key) or 0)
            await c.execute_command("MULTI")
            await c.execute_command("SET", key, value + 1)
            if fail:
                raise RuntimeError("the request failed inside its transaction")
            return await c.execute_command("EXEC")

    @app.post("/watch/{key}")
    async def watch(key: str, r: R) -> None:
        async with r.client() as c:
            await c.execute_command("WATCH", key)
            raise RuntimeError("the request failed while watching")

    @app.post("/forget/{key}")
    async def forget(key: str, r: R, multi: bool = False) -> None:
        """Takes a dedicated connection and never closes it (*multi*: inside a MULTI)."""
        c = r.client()
        await c.set(key, "forgotten")
        if multi:
            await c.execute_command("MULTI")
            await c.execute_command("SET", key, "queued")

    @app.post("/incr/{key}")
    async def incr(key: str, r: R) -> dict[str, Any]:
        return {"value": await r.incr(key)}

    @app.post("/pipeline/{key}")
    async def pipeline(key: str, r: R) -> dict[str, Any]:
        async with r.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            return {"value": (await pipe.execute())[0]}

    return app


def test_a_request_that_raises_after_multi_leaves_the_next_request_a_clean_connection(
    redis_server: Redis,
) -> None:
    """The request fails between MULTI and EXEC; its dedicated client is closed on the way
    out, and gives the pool's one connection back disconnected: the next request's INCR is
    answered (it was answered 'QUEUED', and never ran), and the failed transaction never
    ran."""
    key, other = unique(), unique()
    with TestClient(make_app(redis_server.url), raise_server_exceptions=False) as client:
        assert client.post(f"/bump/{key}").json() == ["OK"]
        assert client.post(f"/bump/{key}", params={"fail": True}).status_code == 500
        response = client.post(f"/incr/{other}")
        assert (response.status_code, response.json()) == (200, {"value": 1})
        assert client.post(f"/bump/{key}").json() == ["OK"]
    assert redis_server.command("GET", key) in ("2", b"2")
    assert redis_server.command("GET", other) in ("1", b"1")
    redis_server.command("DEL", key, other)


def test_a_request_that_raises_while_watching_leaves_no_key_watched(
    redis_server: Redis,
) -> None:
    """The request fails after WATCH: had the connection gone back watching the key, the
    next request's transaction (a pipeline, on that connection) would fail with a
    WatchError once the key changed."""
    key = unique()
    with TestClient(make_app(redis_server.url), raise_server_exceptions=False) as client:
        assert client.post(f"/watch/{key}").status_code == 500
        redis_server.command("SET", key, "5")  # another client
        response = client.post(f"/pipeline/{key}")
        assert (response.status_code, response.json()) == (200, {"value": 6})
    redis_server.command("DEL", key)


@pytest.mark.parametrize("multi", [False, True], ids=["plain", "inside-multi"])
def test_a_dedicated_connection_never_closed_goes_back_at_the_end_of_the_request(
    redis_server: Redis, multi: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that takes `r.client()` and never closes it: redis-py keeps its connection
    out of the pool for good (with a pool of one, every later command waited `pool_timeout`
    and got a 503). tether gives it back when the request ends (disconnected first if inside
    a transaction: the queued SET never runs), warns naming the line, and counts a leak."""
    key, other = unique(), unique()
    app = make_app(redis_server.url)
    with caplog.at_level(logging.WARNING, logger="tether"):
        with TestClient(app) as client:
            assert client.post(f"/forget/{key}", params={"multi": multi}).status_code == 200
            response = client.post(f"/incr/{other}")
            assert (response.status_code, response.json()) == (200, {"value": 1})
    assert redis_server.command("GET", key) in ("forgotten", b"forgotten")
    (message,) = [r.getMessage() for r in caplog.records if "still held by" in r.getMessage()]
    assert message.startswith(
        "tether: POST /forget/{key} ended with a connection of redis client 'cache' still "
        f"held by r.client() (taken at {__file__}:"
    )
    assert message.endswith(
        "in forget): tether gave it back to the pool. Close it: `async with r.client() as "
        "c:`, or `await c.aclose()`."
    )
    redis_server.command("DEL", key, other)


@pytest.mark.anyio
async def test_a_pubsub_held_past_the_leak_threshold_is_reported_and_counted_as_the_client(
    redis_server: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit of work (a WebSocket's, a job's) holding a PubSub past its leak threshold: the
    report named "'cache dedicated connections'", a resource the app never declared, and
    counted its leak nowhere the app reads (`lc.stats()`, the metrics)."""
    lc = tether.Lifecycle()
    cache = tredis.client(lc, redis_server.url, name="cache", max_connections=2)
    caplog.set_level(logging.WARNING, "tether")
    async with lc.run():
        async with lc.scope("chat", leak_threshold=0.2) as unit:
            r = await unit.get(cache)
            async with r.pubsub() as ps:
                await ps.subscribe("room")
                with anyio.move_on_after(5):
                    while not any("held for" in m for m in caplog.messages):
                        await anyio.sleep(0.05)
        assert lc.stats().resources["cache"].leaks == 1
    reports = [m for m in caplog.messages if "held for" in m]
    assert len(reports) == 1
    assert reports[0].startswith(
        "tether: resource 'cache' (its dedicated connections: pubsub(), a pipeline after "
        "watch(), client()) held for "
    )
    assert "(leak_threshold=0.2 s) by chat" in reports[0]
