"""Connection metrics are per driver pool, as OpenTelemetry's database-client conventions define
them, against a real PostgreSQL: ``sum(db_client_connection_count{state="used"})`` is the
connections in use, which the server sees busy; resources that are not a pool (a settings
function, an HTTP client, the request's connection drawn from the pool) add no series of
their own; a wait for a connection that times out counts under the pool's name. Both
exporters (Prometheus and OpenTelemetry) read the same Lifecycle.
"""

import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Annotated, Any

import anyio
import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

import tether
from tests.asgi.test_opentelemetry import collect
from tests.asgi.test_prometheus import sample, samples
from tests.servers import Postgres
from tether.integrations import asyncpg as tpg
from tether.metrics import opentelemetry as totel
from tether.metrics import prometheus as tprom

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

N = 3  # queries running at once, and the pool's size


async def busy_backends(pg: Postgres, app_name: str) -> int:
    """The server's count of *app_name*'s backends running a query (ground truth)."""
    conn = await asyncpg.connect(pg.dsn, server_settings={"application_name": "truth"})
    try:
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'"
        )
        return int(await conn.fetchval(sql, app_name))
    finally:
        await conn.close()


def series(found: dict[Any, float], metric: str) -> dict[frozenset[tuple[str, Any]], float]:
    """The samples (or data points) of *metric*, by their labels (or attributes)."""
    return {labels: value for (name, labels), value in found.items() if name == metric}


def used_by_pool(found: dict[Any, float], metric: str, pool: str, state: str) -> dict[str, float]:
    """``db_client_connection_count`` (or its OpenTelemetry name) in *state*, by pool name."""
    return {
        dict(labels)[pool]: value
        for labels, value in series(found, metric).items()
        if dict(labels)[state] == "used"
    }


async def test_connection_count_is_the_pools_connections(postgres: Postgres) -> None:
    app_name = f"pools-{uuid.uuid4().hex[:8]}"
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def settings() -> dict[str, str]:  # configuration: no connection at all
        return {"dsn": postgres.dsn}

    @lc.resource(scope="app")
    async def http_client() -> AsyncIterator[httpx.AsyncClient]:  # not a driver pool
        async with httpx.AsyncClient() as client:
            yield client

    pool = tpg.pool(
        lc, postgres.dsn, name="pg", min_size=1, max_size=N, acquire_timeout=0.5,
        server_settings={"application_name": app_name},
    )  # fmt: skip
    conn = tpg.connection(lc, pool, name="conn")
    registry = CollectorRegistry()
    tprom.register(lc, registry)
    reader = InMemoryMetricReader()
    totel.register(lc, MeterProvider(metric_readers=[reader]))
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/sleep")
    async def sleep(
        c: Annotated[asyncpg.Connection, Depends(conn)],
        config: Annotated[dict[str, str], Depends(settings)],
        client: Annotated[httpx.AsyncClient, Depends(http_client)],
        s: float = 0.0,
    ) -> str:
        return str(await c.fetchval("SELECT pg_sleep($1)::text", s))

    transport = httpx.ASGITransport(app=app)
    statuses: list[int] = []
    async with (
        lc.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        anyio.create_task_group() as tg,
    ):

        async def slow() -> None:
            statuses.append((await client.get("/sleep", params={"s": 4}, timeout=20)).status_code)

        for _ in range(N):
            tg.start_soon(slow)
        with anyio.fail_after(10):
            while await busy_backends(postgres, app_name) < N:
                await anyio.sleep(0.05)
        prom_busy = samples(registry)
        otel_busy, _ = collect(reader)
        busy = await busy_backends(postgres, app_name)
        refused = await client.get("/sleep")  # no connection comes free within acquire_timeout
        prom_after = samples(registry)
        otel_after, _ = collect(reader)

    assert statuses == [200] * N
    assert busy == N
    # During N queries: the sum of the connections in use is N, all of them the pool's; the
    # settings, the HTTP client and the request's connection add no series.
    prom_used = used_by_pool(prom_busy, "db_client_connection_count", "pool_name", "state")
    assert prom_used == {"pg": N}
    assert sum(prom_used.values()) == busy
    assert {
        dict(labels)["pool_name"] for labels in series(prom_busy, "db_client_connection_count")
    } == {"pg"}
    otel_used = used_by_pool(otel_busy, "db.client.connection.count", totel.POOL_NAME, totel.STATE)
    assert otel_used == {"pg": N}
    pool_names = {
        dict(attributes)[totel.POOL_NAME]
        for attributes in series(otel_busy, "db.client.connection.count")
    }
    assert pool_names == {"pg"}
    # What each resource has open is tether's own series.
    for name, scope, open_now in [("settings", "app", 1), ("http_client", "app", 1),
                                  ("pg", "app", 1), ("conn", "request", N)]:  # fmt: skip
        labels = frozenset({("pool_name", name), ("scope", scope)})
        assert series(prom_busy, "tether_resource_in_use")[labels] == open_now, name
        attributes = frozenset({(totel.POOL_NAME, name), (totel.SCOPE, scope)})
        assert series(otel_busy, "tether.resource.in_use")[attributes] == open_now, name

    # The wait that timed out: a 503, counted under the pool's name (and the resource's own).
    assert refused.status_code == 503, refused.text
    assert "Retry-After" in refused.headers
    pg_labels = frozenset({("pool_name", "pg"), ("scope", "app")})
    assert series(prom_busy, "db_client_connection_timeouts_total") == {pg_labels: 0}
    assert series(prom_after, "db_client_connection_timeouts_total") == {pg_labels: 1}
    conn_labels = frozenset({("pool_name", "conn"), ("scope", "request")})
    assert series(prom_after, "tether_resource_timeouts_total")[conn_labels] == 1
    pg_attributes = frozenset({(totel.POOL_NAME, "pg"), (totel.SCOPE, "app")})
    assert series(otel_after, "db.client.connection.timeouts") == {pg_attributes: 1}
    conn_attributes = frozenset({(totel.POOL_NAME, "conn"), (totel.SCOPE, "request")})
    assert series(otel_after, "tether.resource.timeouts")[conn_attributes] == 1


async def test_a_pool_that_counts_its_own_waits_counts_one_timeout_once() -> None:
    """httpx (and Redis) count a wait for their pool that timed out on the pool itself: a
    request resource that calls the client while it opens, and fails on that timeout, adds
    nothing to the pool's `db_client_connection_timeouts` (before, the one timeout counted
    twice there). Its own `tether_resource_timeouts` keeps it."""
    import asyncio

    from tether.integrations import httpx as thx

    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # a server that accepts and never answers

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lc = tether.Lifecycle()
    http = thx.client(
        lc, base_url=f"http://127.0.0.1:{port}", check=False,
        timeout=httpx.Timeout(30.0, pool=0.3), limits=httpx.Limits(max_connections=1),
    )  # fmt: skip

    @lc.resource
    async def user(http: httpx.AsyncClient) -> AsyncIterator[str]:
        yield (await http.get("/whoami")).text  # the request's user, from an auth service

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/me")
    async def me(u: Annotated[str, Depends(user)]) -> str:
        return u

    registry = CollectorRegistry()
    tprom.register(lc, registry=registry)
    try:
        async with lc.lifespan(app):
            holder = asyncio.create_task(lc.get(http).get("/held"))  # the one connection
            await anyio.sleep(0.2)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/me")).status_code == 503
            found = samples(registry)
            holder.cancel()  # and gone before the client closes: its connection back
            with suppress(asyncio.CancelledError):
                await holder
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()
    assert found[sample("db_client_connection_timeouts_total", pool_name="http", scope="app")] == 1
    assert found[sample("tether_resource_timeouts_total", pool_name="user", scope="request")] == 1


@pytest.mark.parametrize("transaction", [False, True], ids=["connection", "transaction"])
async def test_a_connection_resource_never_counts_more_in_use_than_its_pool_holds(
    postgres: Postgres, transaction: bool
) -> None:
    """Twenty units of work take turns on an asyncpg pool of 2: asyncpg hands a returned
    connection to a waiting unit before its release returns to the one giving it back, so
    both counted it for a moment, and `max_in_use` (the dashboard's "max", both exporters'
    `max_in_use`) read 4 of a pool of 2. Never more than the pool's size now."""
    lc = tether.Lifecycle()
    pool = tpg.pool(lc, postgres.dsn, min_size=2, max_size=2, acquire_timeout=30)
    conn = tpg.connection(lc, pool, name="conn", transaction=transaction)
    seen: list[int] = []

    async def unit() -> None:
        async with lc.scope("turns") as scope:
            c = await scope.get(conn)
            seen.append(lc.stats().resources["conn"].in_use)
            await c.fetchval("SELECT pg_sleep(0.02)")

    async with lc.run(), anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(unit)
    stats = lc.stats().resources["conn"]
    assert (max(seen), stats.max_in_use, stats.in_use, stats.opened) == (2, 2, 0, 20)
