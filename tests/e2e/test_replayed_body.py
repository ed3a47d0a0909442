"""A middleware whose `receive` replays the body without ever waiting: requests that run
long enough for tether to listen for their client leaving are served (before, that listener
spun on the replayed body: the worker froze, its memory grew until it died)."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import Server


def test_a_replaying_middleware_does_not_freeze_the_worker(serve: type[Server]) -> None:
    server = serve("tests.e2e.app_replay:app")
    for _ in range(2):
        answer = httpx.get(server.base_url + "/slow", timeout=5)
        assert answer.status_code == 200
        assert answer.json() == "conn"
