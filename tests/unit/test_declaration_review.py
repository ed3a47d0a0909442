"""Fixes from the docs-vs-code review: the background retry of a required=False resource
never spins, a non-finite retry_after and an unknown budget= are refused at declaration,
and a secret in a URL's query is hidden without the parameters after it."""

import logging
import math
import re

import anyio
import pytest

import tether
import tether._errors
from tether._errors import redact
from tether.integrations import asyncpg as tasyncpg
from tether.integrations import psycopg as tpsycopg


@pytest.mark.anyio
async def test_background_retry_with_backoff_0_does_not_spin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """backoff=0 (retry at once, for the startup retries) made 55,884 attempts a second."""
    lc = tether.Lifecycle()
    attempts = 0

    @lc.resource(scope="app", required=False, backoff=0)
    async def cache() -> int:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError("connection refused")

    with caplog.at_level(logging.INFO, logger="tether"):
        async with lc.run():
            await anyio.sleep(1.5)
    # One at startup, one after 1 s (the floor), none more before 3 s.
    assert attempts <= 3
    assert len([r for r in caplog.records if r.name.startswith("tether")]) <= 5


@pytest.mark.anyio
async def test_startup_retries_with_backoff_0_are_still_at_once() -> None:
    lc = tether.Lifecycle()
    attempts = 0

    @lc.resource(scope="app", retries=3, backoff=0)
    async def cache() -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 4:
            raise ConnectionRefusedError("connection refused")
        return 1

    with anyio.fail_after(0.5):
        async with lc.run():
            pass
    assert attempts == 4


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_retry_after_is_refused(value: float) -> None:
    lc = tether.Lifecycle()
    with pytest.raises(ValueError) as info:
        lc.resource(lambda: 1, name="db", retry_after=value)
    assert str(info.value) == (
        f"Resource 'db': retry_after={value!r} is not a finite number: retry_after is the "
        f"seconds sent in the Retry-After header of its 503 answers, as a whole number, "
        f"which {value!r} cannot be made (every such answer would fail as a 500). Pass a "
        f"finite number of seconds, e.g. retry_after=1."
    )


@pytest.mark.parametrize("make", [tasyncpg.pool, tpsycopg.pool])
@pytest.mark.parametrize(
    ("budget", "fix"),
    [
        ("Error", "Did you mean budget='error'? The values are lower case."),
        ("OFF", "Did you mean budget='off'? The values are lower case."),
        ("strict", 'Pass "warn" (the default), "error" or "off".'),
        (None, 'Pass "warn" (the default), "error" or "off".'),
    ],
)
def test_unknown_budget_is_refused(make: object, budget: object, fix: str) -> None:
    lc = tether.Lifecycle()
    with pytest.raises(ValueError) as info:
        make(lc, "postgresql://app@h/db", budget=budget)  # type: ignore[operator]
    assert str(info.value) == (
        f"Pool 'pool': budget={budget!r} is not one of 'warn', 'error', 'off' (what to do "
        f"when the connection budget exceeds the server's max_connections). {fix}"
    )


@pytest.mark.parametrize("budget", ["warn", "error", "off"])
def test_known_budgets_are_accepted(budget: str) -> None:
    lc = tether.Lifecycle()
    tasyncpg.pool(lc, "postgresql://app@h/db", budget=budget)  # type: ignore[arg-type]
    tpsycopg.pool(lc, "postgresql://app@h/db", name="pool2", budget=budget)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "postgresql://u@h/d?sslpassword=x&sslmode=require&application_name=api",
            "postgresql://u@h/d?sslpassword=***&sslmode=require&application_name=api",
        ),
        ("https://api/x?access_token=abc&b=1", "https://api/x?access_token=***&b=1"),
        ("https://api/x?a=1&access_token=abc&b=1", "https://api/x?a=1&access_token=***&b=1"),
        ("postgresql://u@h/d?sslpassword=hun/ter2&x=1", "postgresql://u@h/d?sslpassword=***&x=1"),
        # libpq reads a '#' in a query's value as part of it: hidden with it.
        ("postgresql://u@h/d?sslpassword=ab#cd&x=1", "postgresql://u@h/d?sslpassword=***&x=1"),
        # Outside a URL's query an '&' is part of the value.
        ("host=h password=a&b dbname=d", "host=h password=*** dbname=d"),
    ],
)
def test_query_secret_stops_at_ampersand(
    text: str, shown: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tether._errors, "_secrets", ())
    assert redact(text) == shown
    assert not re.search(r"abc|hun/ter2|ab#cd|a&b", redact(text))
