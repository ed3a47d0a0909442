"""/health/ready under a storm of probes: one round of checks per `cache=` seconds."""

import logging
import time
from typing import Annotated

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import tether
from tests.inprocess import client_of
from tests.unit._messages import exactly
from tether.fastapi import health_router

CACHE = 2.0


def test_ready_reuses_its_report_for_cache_seconds_and_runs_one_round_at_a_time() -> None:
    """A storm of probes costs the database one round of checks per `cache=` seconds:
    probes within it get the last report, probes that come while the checks run wait
    for that round; past it the checks run again. Draining fails readiness at once,
    whatever the cache holds."""
    lc = tether.Lifecycle(drain_timeout=5)
    calls: list[float] = []
    state = {"up": True}
    release = anyio.Event()

    async def probe(value: str) -> None:
        calls.append(time.monotonic())
        await anyio.sleep(0.1)  # a round trip to the database
        if not state["up"]:
            raise ConnectionError("connection refused")

    @lc.resource(scope="app", check=probe)
    def db() -> str:
        return "db"

    @lc.resource
    def conn(db: str) -> str:
        return f"conn of {db}"

    app = FastAPI(lifespan=lc.lifespan)
    # A round that started more than `cache` ago counts as stuck, and a probe starts
    # another: a loaded machine can stall the loop half a second within the storm.
    app.include_router(health_router(lc, cache=CACHE))

    @app.get("/hold")
    async def hold(c: Annotated[str, Depends(conn)]) -> str:
        await release.wait()
        return c

    async def storm(client: httpx.AsyncClient) -> list[int]:
        codes: list[int] = []

        async def one() -> None:
            codes.append((await client.get("/health/ready")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        return codes

    async def main() -> None:
        async with client_of(app) as client:
            async with anyio.create_task_group() as tg:
                async with lc.lifespan(app):
                    assert await storm(client) == [200] * 20
                    assert len(calls) == 1  # twenty probes at once, one round of checks
                    state["up"] = False
                    assert (await client.get("/health/ready")).status_code == 200  # cached
                    assert len(calls) == 1
                    await anyio.sleep(CACHE + 0.1)
                    assert await storm(client) == [503] * 20
                    assert len(calls) == 2
                    state["up"] = True
                    await anyio.sleep(CACHE + 0.1)
                    assert (await client.get("/health/ready")).status_code == 200
                    tg.start_soon(client.get, "/hold")  # in flight: holds the drain open
                    while not lc.stats().units_in_flight:
                        await anyio.sleep(0.01)

                    async def while_draining() -> None:
                        while lc.state is not tether.State.DRAINING:
                            await anyio.sleep(0.01)
                        ready = await client.get("/health/ready")  # the cache holds a 200
                        assert ready.status_code == 503
                        assert ready.json()["state"] == "draining"
                        release.set()

                    tg.start_soon(while_draining)
                assert release.is_set()

    anyio.run(main)


@pytest.mark.parametrize("cache", [-1, float("nan")])
def test_a_cache_that_is_not_a_duration_is_refused(cache: object) -> None:
    """Out of range; a string or a bool is a TypeError (tests/unit/test_contract.py)."""
    lc = tether.Lifecycle()
    with pytest.raises(
        ValueError,
        match=exactly(
            f"health_router(cache={cache!r}): cache is how long, in seconds, /ready reuses the "
            f"checks' report, and must be a number >= 0; e.g. cache=1.0, or 0 to run the checks "
            f"for every probe."
        ),
    ):
        health_router(lc, cache=cache)  # type: ignore[arg-type]


def test_a_probe_does_not_wait_behind_a_round_stuck_longer_than_the_cache() -> None:
    """A round of checks stuck on a database that does not answer (until `check_timeout`)
    is waited for only by the probes of its first `cache=` seconds: later ones run a round
    of their own, and answer as soon as the database does."""
    lc = tether.Lifecycle(check_timeout=10)
    rounds: list[str] = []

    async def probe(value: str) -> None:
        rounds.append("stuck" if not rounds else "quick")
        if len(rounds) == 1:
            await anyio.sleep(8)  # the first round's query gets no answer

    @lc.resource(scope="app", check=probe)
    def db() -> str:
        return "db"

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc, cache=0.5))

    async def main() -> None:
        async with lc.lifespan(app), client_of(app) as client, anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/health/ready")  # the stuck round
            while not rounds:
                await anyio.sleep(0.01)
            await anyio.sleep(0.6)  # past the cache
            t0 = time.monotonic()
            ready = await client.get("/health/ready")
            assert time.monotonic() - t0 < 2  # not the 7 s left of the stuck round
            assert ready.status_code == 200
            assert rounds == ["stuck", "quick"]
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_probes_answered_after_sigterm_say_stopping_even_from_a_round_begun_before() -> None:
    """With `drain_delay`, SIGTERM fails readiness at once: the probe whose round of checks
    was under way when it came, and the probes waiting on that round, answer 503
    "stopping" too (before, they answered that round's 200)."""
    lc = tether.Lifecycle(drain_delay=30)
    started = anyio.Event()

    async def probe(value: str) -> None:
        started.set()
        await anyio.sleep(0.3)  # a round trip to the database

    @lc.resource(scope="app", check=probe)
    def db() -> str:
        return "db"

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc, cache=1.0))

    async def main() -> None:
        answers: list[httpx.Response] = []

        async def ask(client: httpx.AsyncClient) -> None:
            answers.append(await client.get("/health/ready"))

        async with lc.lifespan(app), client_of(app) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, client)  # starts the round
                await started.wait()
                tg.start_soon(ask, client)  # waits on it
                await anyio.sleep(0.05)
                lc._stopping = True  # what tether's SIGTERM handler does (drain_delay)
            lc._stopping = False
        assert [(r.status_code, r.json()["state"]) for r in answers] == [(503, "stopping")] * 2

    anyio.run(main)


def test_expose_errors_false_keeps_the_causes_out_of_client_bodies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With `Lifecycle(expose_errors=False)` a 503's body names the resource only, and the
    readiness report says which check fails, not why (the server's address, the driver's
    error): the message goes to the log. By default both carry it."""
    reason = "'pool' cannot reach postgresql://app:***@db.internal:5432/notes: refused"
    for expose in (True, False):
        lc = tether.Lifecycle(expose_errors=expose)

        @lc.resource(scope="app", check=lambda p: p.ping())
        async def pool() -> object:
            class Pool:
                def ping(self) -> None:
                    raise ConnectionError(reason)

            return Pool()

        @lc.resource
        async def conn(pool: object) -> str:
            raise tether.ResourceUnavailable(reason, resource="pool", retry_after=2)

        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(health_router(lc, cache=0))

        @app.get("/notes")
        async def notes(c: Annotated[str, Depends(conn)]) -> str:
            return c

        with caplog.at_level(logging.WARNING, logger="tether"), TestClient(app) as client:
            caplog.clear()
            answer = client.get("/notes")
            ready = client.get("/health/ready")
            client.get("/health/ready")  # the same failure: logged once
            logged = [m for m in caplog.messages if "readiness check" in m]
        assert (answer.status_code, answer.headers["retry-after"]) == (503, "2")
        check = ready.json()["checks"]["pool"]
        if expose:
            assert answer.json() == {"detail": reason}
            assert check["error"] == f"ConnectionError: {reason}"
        else:
            assert answer.json() == {"detail": "'pool' is unavailable now. Retry later."}
            assert "error" not in check
            assert check["status"] == "failing"
            assert logged == [f"tether: readiness check 'pool' fails: ConnectionError: {reason}"]
        assert reason in caplog.text  # the log has it either way


def test_a_report_is_not_reused_by_the_next_app_scope_nor_after_an_override() -> None:
    """Each test's app (its own `TestClient`) runs its own checks, and so does a probe after
    an `lc.override`: before, the router kept the last report for `cache=` seconds whatever
    ran since, and a test got the previous test's readiness (a test of a failing check
    passed after a healthy app's probe, and the other way round)."""
    from fastapi.testclient import TestClient

    lc = tether.Lifecycle()

    class Cache:
        async def ping(self) -> bool:
            return True

    @lc.resource(scope="app", check=lambda cache: cache.ping())
    def cache() -> Cache:
        return Cache()

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc, cache=60))

    class Down:
        async def ping(self) -> bool:
            raise ConnectionError("connection refused")

    with lc.override(cache, Down()), TestClient(app) as client:
        assert client.get("/health/ready").status_code == 503
    with TestClient(app) as client:  # the next test: the real resource
        assert client.get("/health/ready").status_code == 200
        with lc.override(cache, Down()):  # an override while the app runs
            assert client.get("/health/ready").status_code == 503
        assert client.get("/health/ready").status_code == 200
        assert client.get("/health/ready").status_code == 200  # (reused, within the run)


def test_a_failing_check_is_logged_once_while_only_its_figures_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With expose_errors=False a check's error is logged when it changes: a saturated
    pool's ("none handed out for 7.2 s") changed at every probe, a line a second (trial
    14). Its figures aside it is the same error; its end is logged too."""
    lc = tether.Lifecycle(expose_errors=False)
    state = {"failing": True, "probes": 0}

    def check(pool: object) -> None:
        state["probes"] += 1
        if state["failing"]:
            raise ConnectionError(f"none handed out for {state['probes'] * 1.5:.1f} s")

    @lc.resource(scope="app", check=check)
    def pool() -> object:
        return object()

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc, cache=0))
    with caplog.at_level(logging.INFO, logger="tether"), TestClient(app) as client:
        caplog.clear()
        for _ in range(3):
            assert client.get("/health/ready").status_code == 503
        state["failing"] = False
        assert client.get("/health/ready").status_code == 200
        state["failing"] = True
        assert client.get("/health/ready").status_code == 503
        logged = [m for m in caplog.messages if "readiness check" in m]
    assert logged == [
        "tether: readiness check 'pool' fails: ConnectionError: none handed out for 1.5 s",
        "tether: readiness check 'pool' passes again",
        "tether: readiness check 'pool' fails: ConnectionError: none handed out for 7.5 s",
    ]


@pytest.mark.parametrize("optional", [True, False])
def test_an_optional_resource_down_or_failing_does_not_fail_readiness(optional: bool) -> None:
    """The recipe's cache the app can run without (required=False): down, it failed
    readiness, and so took every instance out of rotation at once (trial 16). Named in
    optional=, it is reported, failing, and /ready stays 200; a required check still
    fails it."""
    lc = tether.Lifecycle()
    state = {"db": True}

    def db_check(db: object) -> None:
        if not state["db"]:
            raise ConnectionError("db down")

    @lc.resource(scope="app", check=db_check)
    def db() -> object:
        return object()

    @lc.resource(scope="app", required=False, retries=0)
    def cache() -> object:
        raise ConnectionError("cache down")

    def upstream_check(upstream: object) -> None:
        raise ConnectionError("upstream down")

    @lc.resource(scope="app", check=upstream_check)
    def upstream() -> object:
        return object()

    app = FastAPI(lifespan=lc.lifespan)
    names = ["cache", "upstream"] if optional else []
    app.include_router(health_router(lc, cache=0, optional=names))
    with TestClient(app) as client:
        ready = client.get("/health/ready")
        body = ready.json()
        assert body["checks"]["cache"]["status"] == "failing"
        assert body["checks"]["upstream"]["status"] == "failing"
        if optional:
            assert (ready.status_code, body["status"]) == (200, "ok")
            assert body["checks"]["cache"]["optional"] is True
            assert body["checks"]["upstream"]["optional"] is True
            assert "optional" not in body["checks"]["db"]
            assert "retry-after" not in ready.headers
        else:
            assert (ready.status_code, body["status"]) == (503, "unavailable")
        state["db"] = False  # a required one: readiness fails whatever the others do
        failed = client.get("/health/ready")
        assert (failed.status_code, failed.json()["status"]) == (503, "unavailable")
        assert failed.headers["retry-after"] == "5"


def test_optional_names_declared_resources() -> None:
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def cache() -> object:
        return object()

    with pytest.raises(ValueError, match=exactly(
        "health_router(optional=...): 'cahce' is no resource of this Lifecycle (did you "
        "mean 'cache'?). Name a declared resource, declared before health_router() is "
        "called; its resources: 'cache'."
    )):  # fmt: skip
        health_router(lc, optional=["cahce"])
    with pytest.raises(TypeError, match=exactly(
        "health_router(optional=...): optional='cache' is a str, not a list of resource "
        "names: pass them in a list, e.g. optional=[\"cache\"]."
    )):  # fmt: skip
        health_router(lc, optional="cache")
    with pytest.raises(TypeError, match=exactly(
        "health_router(optional=...): the resource 'cache' itself is no resource name: pass "
        "the names, e.g. optional=[\"cache\"] (a resource's name is its .name)."
    )):  # fmt: skip
        health_router(lc, optional=[cache])  # type: ignore[list-item]
