"""Serve an app with a real uvicorn subprocess on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import Server

__all__ = ["Server"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[Server]]:
    servers: list[Server] = []

    class Bound(Server):
        def __init__(self, target: str, *args: str) -> None:
            super().__init__(target, tmp_path, *args)
            servers.append(self)

    yield Bound
    for server in servers:
        server.stop()
