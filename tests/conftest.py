from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

pytest_plugins = ["pytester"]  # tests/unit/test_pytest_plugin.py runs pytest on test files

# The machine's client and server settings must not reach the suite's clients, nor the
# processes it starts (they inherit this environment): httpx (trust_env) and urllib (`tether
# stats`) send requests for the suite's own 127.0.0.1 servers to HTTP_PROXY/ALL_PROXY unless
# NO_PROXY names 127.0.0.1, and a lowercase http_proxy/no_proxy beats the uppercase one the
# proxy tests set; libpq and asyncpg read PG* (PGSSLMODE=require, PGSERVICE, ...) for every
# connection, the harness's own too; uvicorn starts WEB_CONCURRENCY workers when not given
# --workers, and tether counts them (and GUNICORN_CMD_ARGS's) in a pool's connection budget;
# PYTHONSAFEPATH keeps a `python -c` child from importing `tests`. The tests that use a proxy
# or a worker count set their own.
_CLIENT_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
_SERVER_VARIABLES = {"WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "PYTHONSAFEPATH"}
for _name in list(os.environ):
    if _name.startswith("PG") or _name.lower() in _CLIENT_VARIABLES or _name in _SERVER_VARIABLES:
        del os.environ[_name]


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
