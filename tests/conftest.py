from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest_plugins = ["pytester"]  # tests/unit/test_pytest_plugin.py runs pytest on test files


@pytest.fixture
def anyio_backend() -> str:
    """tether's ASGI glue targets asyncio (uvicorn's loop); the core uses anyio only
    (tests/unit/test_trio.py runs it on trio)."""
    return "asyncio"


# asyncpg asks the server for TLS before each connection it opens (its default,
# sslmode=prefer), its CancelRequest connections included. When that connect is cancelled
# just after its TCP connect (a timeout, or asyncpg's own terminate() cancelling an
# in-flight CancelRequest), asyncpg's TLSUpgradeProto leaves its probe's future holding
# ConnectionError("unexpected connection_lost() call"), never retrieved. asyncio reports it
# to the loop's exception handler, and anyio's test runner fails whichever test is running.
# It is asyncpg's, it changes nothing a user sees but a log line (docs/integrations/
# asyncpg.md, "A log line that is asyncpg's"), and under load it comes once in a few runs
# of the suite. This lets exactly that report through to asyncio's default handler (a log
# line) instead of failing the test; anything else goes where it went.
_report = asyncio.BaseEventLoop.call_exception_handler


def _call_exception_handler(self: asyncio.BaseEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    if (
        context.get("message") == "Future exception was never retrieved"
        and type(exc) is ConnectionError
        and str(exc) == "unexpected connection_lost() call"
    ):
        self.default_exception_handler(context)
        return
    _report(self, context)


asyncio.BaseEventLoop.call_exception_handler = _call_exception_handler  # type: ignore[method-assign]
