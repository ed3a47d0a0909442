"""Session-wide throwaway servers (tests/servers.py) for the integration tests.

Each fixture starts its server once per session, on a free 127.0.0.1 port, and stops it at
the end. A server that cannot start (e.g. a missing Debian package: run
`bash scripts/system-deps.sh`) makes the tests that need it error, never skip.
"""

from collections.abc import Iterator

import pytest

from tests.servers import PgBouncer, Postgres, Redis


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with Postgres() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    with Redis() as server:
        yield server


@pytest.fixture(scope="session")
def pgbouncer(postgres: Postgres) -> Iterator[PgBouncer]:
    with PgBouncer(postgres) as server:
        yield server
