"""A sweeper hook that raises never ends the sweep, nor the app scope (on trio, one tore
down the app scope's task group and closed every pool)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_failing_sweeper_hook_is_logged_once_and_the_app_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = tether.Lifecycle(sweep_interval=0.01)
    events: list[str] = []

    @lc.resource(scope="app")
    async def pool() -> AsyncIterator[str]:
        yield "pool"
        events.append("pool close")

    calls: list[float] = []

    def broken(now: float) -> None:
        raise RuntimeError("a hook bug")

    lc._sweepers.append(broken)
    lc._sweepers.append(calls.append)  # the hooks after it still run
    with caplog.at_level(logging.ERROR, logger="tether"):
        async with lc.run():
            await anyio.sleep(0.3)
            assert events == []  # the pool is still open
            assert lc.state is tether.State.RUNNING
            assert lc.get(pool) == "pool"
            assert len(calls) > 3
    failures = [r for r in caplog.records if "a sweeper hook" in r.getMessage()]
    assert len(failures) == 1  # once per hook, with its traceback
    assert failures[0].exc_info is not None
    assert "failed: RuntimeError: a hook bug; the sweep goes on" in failures[0].getMessage()
    assert events == ["pool close"]
