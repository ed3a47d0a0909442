"""How many worker processes share the database, for the connection budget: read from the
server's own command line where a worker can see it (neither gunicorn nor uvicorn sets
``WEB_CONCURRENCY``: they only read it), before ``WEB_CONCURRENCY``, before 1.

gunicorn is no dependency of tether: its workers are forked from the master, so their
``sys.argv`` is the master's command line, and the tests give ``workers()`` that argv.
uvicorn's ``--workers`` children are spawned, and run here for real.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import Server
from tether.integrations._common import workers

GUNICORN = "/srv/venv/bin/gunicorn"
GUNICORN_M = "/srv/venv/lib/python3.12/site-packages/gunicorn/__main__.py"
UVICORN = "/srv/venv/bin/uvicorn"
WORKER = "uvicorn.workers.UvicornWorker"


@pytest.fixture(autouse=True)
def _no_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([GUNICORN, "app:app", "-k", WORKER, "-w", "3"], 3),
        ([GUNICORN, "app:app", "-w3"], 3),
        ([GUNICORN, "--workers", "4", "app:app"], 4),
        ([GUNICORN, "--workers=5", "-k", WORKER, "app:app"], 5),
        ([GUNICORN_M, "-w", "2", "app:app"], 2),  # python -m gunicorn
        ([GUNICORN, "-w", "2", "-w", "6", "app:app"], 6),  # the last one, as argparse
        ([UVICORN, "app:app", "--workers", "3"], 3),
        ([UVICORN, "app:app", "--workers=4"], 4),
        ([UVICORN, "app:app", "--workers", "4", "--reload"], 1),  # uvicorn ignores it then
    ],
)
def test_workers_read_from_the_server_command_line(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: int
) -> None:
    """`gunicorn -w 3`: 3 workers share the database (before: 1, and a budget of
    3 x 40 + 3 = 123 connections against max_connections=100 passed unsaid)."""
    monkeypatch.setattr(sys, "argv", argv)
    assert workers() == expected


def test_gunicorn_cmd_args_is_read_and_the_command_line_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GUNICORN_CMD_ARGS counts, the command line over it, as gunicorn reads them."""
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--bind 0.0.0.0:80 --workers 4")
    monkeypatch.setattr(sys, "argv", [GUNICORN, "-k", WORKER, "app:app"])
    assert workers() == 4
    monkeypatch.setattr(sys, "argv", [GUNICORN, "-w", "2", "app:app"])
    assert workers() == 2


def test_the_command_line_is_what_the_server_runs_over_web_concurrency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`WEB_CONCURRENCY=2 gunicorn -w 4` runs 4 workers: 4 are counted. WEB_CONCURRENCY
    counts where the command line names no count; `workers=` over everything."""
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    monkeypatch.setattr(sys, "argv", [GUNICORN, "-w", "4", "app:app"])
    assert workers() == 4
    assert workers(7) == 7
    monkeypatch.setattr(sys, "argv", [GUNICORN, "app:app"])
    assert workers() == 2
    monkeypatch.setattr(sys, "argv", [UVICORN, "app:app"])
    assert workers() == 2
    monkeypatch.delenv("WEB_CONCURRENCY")
    assert workers() == 1


def test_other_programs_flags_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `-w` or `--workers` of a program that is not the server (a script, a job runner)
    says nothing about the server's workers; nor does a value that is not a number."""
    for argv in (
        ["/srv/app/manage.py", "--workers", "8"],
        ["/srv/venv/bin/celery", "worker", "-w", "8"],
        [GUNICORN, "-w", "many", "app:app"],
        [GUNICORN, "-k", "uvicorn.workers.UvicornWorker", "app:app"],
        [],
    ):
        monkeypatch.setattr(sys, "argv", argv)
        assert workers() == 1, argv


# A plain ASGI app, served by a real `uvicorn --workers 2`: each worker says what it counts.
async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps({"pid": os.getpid(), "workers": workers()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_uvicorn_workers_each_count_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn spawns its --workers children (no fork), and multiprocessing gives them the
    parent's sys.argv: each of 2 workers counts 2, with WEB_CONCURRENCY unset."""
    server = Server("tests.unit.test_workers_count:app", tmp_path, "--workers", "2")
    try:
        counted: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while len(counted) < 2:
            assert time.monotonic() < deadline, (counted, server.output())
            try:
                said = httpx.get(server.base_url, timeout=5).json()  # a new connection each
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            counted[said["pid"]] = said["workers"]
    finally:
        server.stop()
    assert list(counted.values()) == [2, 2]
