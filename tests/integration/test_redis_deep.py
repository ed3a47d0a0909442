"""tether.integrations.redis against a real Redis: cancellations and connections left held."""

import asyncio
import logging
import time
from typing import Annotated

import anyio
import pytest
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

import tether
from tests.servers import Redis
from tether.integrations import redis as tredis

pytestmark = pytest.mark.servers


class TestCancelScopeAroundGather:
    def test_move_on_after_catches_its_cancellation_in_gather_children(
        self, redis_server: Redis
    ) -> None:
        """``move_on_after`` around ``gather(r.get(..), r.get(..))`` on fresh connections
        catches its own cancellation: on Python 3.11 the send's ``wait_for`` drops it in a
        gather child (not itself in the scope), and tether raising it again without the
        scope's message let a bare ``CancelledError()`` escape the scope (~1 try in 8)."""

        async def main() -> tuple[int, list[tuple[object, ...]]]:
            lc = tether.Lifecycle()
            cache = tredis.client(lc, redis_server.url, max_connections=4, pool_timeout=3)
            escaped: list[tuple[object, ...]] = []
            tries = 0
            async with lc.run():
                r = lc.get(cache)
                deadline = time.monotonic() + 8.0
                while tries < 400 and time.monotonic() < deadline:
                    await r.connection_pool.disconnect()  # every try opens fresh connections
                    budget = (tries % 40) * 0.0001
                    tries += 1
                    try:
                        with anyio.move_on_after(budget):
                            await asyncio.gather(r.get("tt-deep-a"), r.get("tt-deep-b"))
                    except asyncio.CancelledError as exc:
                        escaped.append(exc.args)
                assert r.connection_pool._in_use_connections == set()
            return tries, escaped

        tries, escaped = asyncio.run(main())
        assert tries >= 100
        assert escaped == []


class TestConnectionsLeftHeld:
    """A pipeline left watching keys, or a PubSub left subscribed, kept its connection out of
    the pool for good (redis-py's ``__del__`` never gives it back), uncounted and unreported:
    with ``max_connections=2`` two such units of work made every later command wait
    ``pool_timeout`` and fail. tether gives them back at the unit's end, as ``r.client()``'s."""

    def test_pipeline_watching_and_pubsub_go_back_at_the_end_of_the_unit(
        self, redis_server: Redis, caplog: pytest.LogCaptureFixture
    ) -> None:
        key, channel = f"tt-deep-w-{time.monotonic_ns()}", f"tt-deep-c-{time.monotonic_ns()}"

        async def main() -> tuple[list[int], int, object, int]:
            lc = tether.Lifecycle()
            cache = tredis.client(lc, redis_server.url, max_connections=2, pool_timeout=1)
            in_use: list[int] = []
            async with lc.run():
                r = lc.get(cache)
                pool = r.connection_pool
                with pytest.raises(RuntimeError, match="conflict"):
                    async with lc.scope("watch-job"):
                        pipe = r.pipeline()
                        await pipe.watch(key)
                        in_use.append(len(pool._in_use_connections))
                        raise RuntimeError("conflict")  # before execute()
                in_use.append(len(pool._in_use_connections))
                async with lc.scope("listen-job"):
                    ps = r.pubsub()
                    await ps.subscribe(channel)
                    in_use.append(len(pool._in_use_connections))
                in_use.append(len(pool._in_use_connections))
                # Both connections work for the next commands: the pool of two is whole.
                assert sorted(await asyncio.gather(r.incr(key), r.incr(key))) == [1, 2]
                leaks = lc.stats().resources["redis"].leaks
                numsub = await r.pubsub_numsub(channel)
                await r.delete(key)
            return in_use, leaks, numsub, len(pool._in_use_connections)

        with caplog.at_level(logging.WARNING, logger="tether"):
            in_use, leaks, numsub, after = asyncio.run(main())
        assert in_use == [1, 0, 1, 0]
        assert (leaks, after) == (2, 0)
        assert numsub in ([(channel, 0)], [(channel.encode(), 0)])  # the server forgot it
        messages = [r.getMessage() for r in caplog.records if "still held by" in r.getMessage()]
        assert len(messages) == 2
        assert messages[0].startswith(
            "tether: watch-job ended with a connection of redis client 'redis' still held by a "
            f"pipeline watching keys (r.pipeline(), watch() at {__file__}:"
        )
        assert messages[0].endswith(
            " in main): tether disconnected it (the server forgot the watched keys) and gave "
            "it back to the pool. End the pipeline on every way out, an early return or raise "
            "too: `async with r.pipeline() as pipe:`, or `await pipe.reset()` in a `finally`."
        )
        assert messages[1].startswith(
            "tether: listen-job ended with a connection of redis client 'redis' still held by a "
            f"PubSub (r.pubsub(), first used at {__file__}:"
        )
        assert messages[1].endswith(
            " in main): tether closed it (its subscriptions with it) and gave it back to the "
            "pool. Close it: `async with r.pubsub() as ps:`, or `await ps.aclose()`."
        )

    def test_closed_pipelines_and_pubsubs_are_no_leaks(
        self, redis_server: Redis, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The forms the docs show (``async with``, ``execute()``) give their connection back
        themselves: no warning, no leak counted, the unwatched key's write applied."""
        key, channel = f"tt-deep-ok-{time.monotonic_ns()}", f"tt-deep-okc-{time.monotonic_ns()}"

        async def main() -> tuple[int, int, object]:
            lc = tether.Lifecycle()
            cache = tredis.client(lc, redis_server.url, max_connections=2, pool_timeout=1)
            async with lc.run():
                r = lc.get(cache)
                async with lc.scope("ok"):
                    async with r.pipeline() as pipe:
                        await pipe.watch(key)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.set(key, "v")
                        await pipe.execute()
                    pipe2 = r.pipeline()
                    await pipe2.watch(key)
                    await pipe2.reset()  # type: ignore[no-untyped-call]
                    async with r.pubsub() as ps:
                        await ps.subscribe(channel)
                    await r.get(key)
                value = await r.get(key)
                await r.delete(key)
                return (
                    lc.stats().resources["redis"].leaks,
                    len(r.connection_pool._in_use_connections),
                    value,
                )

        with caplog.at_level(logging.WARNING, logger="tether"):
            leaks, in_use, value = asyncio.run(main())
        assert (leaks, in_use, value) == (0, 0, b"v")
        assert [r for r in caplog.records if "still held by" in r.getMessage()] == []

    def test_an_early_409_between_watch_and_execute_leaves_the_pool_whole(
        self, redis_server: Redis, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The usual optimistic-locking handler, answering 409 between ``watch()`` and
        ``execute()``: with a pool of one, every later request waited ``pool_timeout`` and got
        a 503, for good. The connection goes back when the request ends, counted."""
        key = f"tt-deep-409-{time.monotonic_ns()}"
        lc = tether.Lifecycle()
        cache = tredis.client(lc, redis_server.url, max_connections=1, pool_timeout=1)
        R = Annotated[aioredis.Redis, Depends(cache)]
        app = FastAPI(lifespan=lc.lifespan)

        @app.post("/reserve")
        async def reserve(r: R) -> dict[str, int]:
            pipe = r.pipeline()
            await pipe.watch(key)
            if await pipe.get(key) is None:
                raise HTTPException(409, "nothing to reserve")
            return {"ok": 1}  # pragma: no cover

        @app.post("/incr")
        async def incr(r: R) -> dict[str, int]:
            return {"value": await r.incr(key)}

        with caplog.at_level(logging.WARNING, logger="tether"):
            with TestClient(app) as client:
                assert client.post("/reserve").status_code == 409
                assert client.post("/reserve").status_code == 409
                response = client.post("/incr")
                assert (response.status_code, response.json()) == (200, {"value": 1})
                assert lc.stats().resources["redis"].leaks == 2
        redis_server.command("DEL", key)
        messages = [r.getMessage() for r in caplog.records if "still held by" in r.getMessage()]
        assert len(messages) == 2
        assert messages[0].startswith(
            "tether: POST /reserve ended with a connection of redis client 'redis' still held "
            f"by a pipeline watching keys (r.pipeline(), watch() at {__file__}:"
        )
