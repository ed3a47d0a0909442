"""The examples of docs/integrations/{asyncpg,psycopg,redis,httpx}.md, run as users run them:
each under a real uvicorn, configured from the environment, against the real servers."""

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Postgres, Redis
from tests.serving import Server

pytestmark = pytest.mark.servers


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[Server]]:
    servers: list[Server] = []

    class Bound(Server):
        def __init__(self, target: str, env: dict[str, str] | None = None) -> None:
            super().__init__(target, tmp_path, env=env)
            servers.append(self)

    yield Bound
    for server in servers:
        server.stop()


def fresh_database(postgres: Postgres, name: str) -> str:
    postgres.sql(f"DROP DATABASE IF EXISTS {name}")
    postgres.sql(f"CREATE DATABASE {name} OWNER tether")
    return postgres.url(database=name)


def stopped_cleanly(server: Server) -> None:
    server.stop()
    output = server.output()
    assert "Traceback" not in output, output
    assert "ERROR" not in output, output


@pytest.mark.parametrize(
    ("example", "application_name"),
    [
        pytest.param("asyncpg_app", "notes-asyncpg", id="asyncpg"),
        pytest.param("psycopg_app", "notes-psycopg", id="psycopg"),
    ],
)
def test_notes_example(
    example: str, application_name: str, postgres: Postgres, serve: type[Server]
) -> None:
    """The notes service: create, list, get, a rolled-back write, health; closed at exit."""
    dsn = fresh_database(postgres, f"{example}_db")
    server = serve(f"docs.examples.{example}:app", env={"DATABASE_URL": dsn})
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        assert http.get("/health/ready").status_code == 200
        created = http.post("/notes", json={"text": "hello"})
        assert created.status_code == 201
        assert created.json() == {"id": 1, "text": "hello"}
        # An empty note is inserted, then refused: the transaction rolls the INSERT back.
        assert http.post("/notes", json={"text": " "}).status_code == 422
        assert http.get("/notes").json() == [{"id": 1, "text": "hello"}]
        assert http.get("/notes/1").json() == {"id": 1, "text": "hello"}
        assert http.get("/notes/99").status_code == 404
    assert postgres.sql("SELECT count(*) FROM notes", database=f"{example}_db") == [(1,)]
    assert postgres.activity(application_name)
    stopped_cleanly(server)
    assert postgres.activity_after_close(application_name) == []


def test_redis_example(redis_server: Redis, serve: type[Server]) -> None:
    """The view counter counts, its client is in CLIENT LIST, and leaves with the app."""
    server = serve("docs.examples.redis_app:app", env={"REDIS_URL": redis_server.url})
    page = f"home-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        assert http.get("/health/ready").status_code == 200
        assert http.post(f"/views/{page}").json() == {"views": 1}
        assert http.post(f"/views/{page}").json() == {"views": 2}
        assert http.get(f"/views/{page}").json() == {"views": 2}
    assert redis_server.client_list("views-example")
    stopped_cleanly(server)
    assert redis_server.client_list("views-example") == []


def test_httpx_example(serve: type[Server]) -> None:
    """The gateway calls the upstream; with the upstream gone it answers 503, not 500."""
    upstream = serve("docs.examples.httpx_app:upstream")
    gateway = serve("docs.examples.httpx_app:app", env={"UPSTREAM_URL": upstream.base_url})
    with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
        assert http.get("/health/ready").status_code == 200
        assert http.get("/greet/ada").json() == {"greeting": "Hello, Ada!"}
        upstream.stop()
        gone = http.get("/greet/ada")
        assert gone.status_code == 503
        assert gone.headers["retry-after"] == "1"
        assert "Pool 'names'" in gone.json()["detail"]
        # /health/ready reuses its last report for a second (health_router's cache=)
        deadline = time.monotonic() + 5
        while (ready := http.get("/health/ready")).status_code == 200:
            assert time.monotonic() < deadline, "readiness still passes with the upstream gone"
            time.sleep(0.1)
        assert ready.status_code == 503
    stopped_cleanly(gateway)
