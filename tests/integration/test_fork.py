"""A process forked after its pools opened (pain.md T5.1): the child is refused the parent's
pool with a clear error, and the parent's connections keep working."""

import json
import subprocess
import sys

import pytest

from tests.servers import Postgres
from tests.serving import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.fastapi_free]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg", "sqlalchemy"])
def test_a_forked_child_is_refused_the_parents_pool(postgres: Postgres, driver: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.fork_child", driver, postgres.dsn,
         postgres.url("postgresql+asyncpg")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    parent, child = out["parent"], out["child_pid"]
    assert out["child"] == [
        f"lc.scope('child') was entered in process {child}, a fork of process {parent}, whose "
        f"app scope opened this Lifecycle's resources: their connections' sockets belong to "
        f"the parent, and sharing them corrupts both. Open them in each process, after the "
        f"fork: in the lifespan of each worker (tether opens nothing at import, so `gunicorn "
        f"--preload` is fine), or with a Lifecycle of the child's own.",
        f"Pool 'pg' was opened in process {parent} and is used in process {child}, a fork of "
        f"it: its connections' sockets belong to the parent, and sharing them corrupts both. "
        f"Open pools in each process, after the fork: in the lifespan of each worker (tether "
        f"opens nothing at import, so `gunicorn --preload` is fine), or with a Lifecycle of "
        f"the child's own.",
    ]
    assert out["same_backend"] is True  # the parent's connection still works, untouched
