"""docs/examples/worker.py (docs/recipes.md, "A worker process that stops on SIGTERM"), run as
its users run it: a process of its own against a real PostgreSQL, stopped with SIGTERM, as
Kubernetes and systemd stop it. A worker written without it (the job recipe alone) died at
once on SIGTERM, with no line logged, and its query ran on in the server, holding its
transaction open, for as long as it had left."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_examples_drivers import fresh_database
from tests.servers import Postgres
from tests.serving import ROOT

pytestmark = pytest.mark.servers


class Worker:
    def __init__(self, url: str, grace: float, log: Path) -> None:
        env = {**os.environ, "DATABASE_URL": url, "WORKER_GRACE": str(grace)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log = log
        with log.open("w") as out:  # (the child has its own copy)
            self.proc = subprocess.Popen(  # noqa: S603 - our own example, by path
                [sys.executable, "-m", "docs.examples.worker"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.02)

    def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code, and the seconds it took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        return code, time.monotonic() - started


@pytest.fixture
def queue(postgres: Postgres) -> tuple[Postgres, str, str]:
    name = "worker_jobs"
    url = fresh_database(postgres, name)
    postgres.sql(
        "CREATE TABLE jobs (id serial PRIMARY KEY, seconds float NOT NULL, done_at timestamptz)",
        database=name,
    )
    postgres.sql("GRANT ALL ON jobs, jobs_id_seq TO tether", database=name)
    return postgres, url, name


def done(postgres: Postgres, database: str) -> list[tuple[int, bool]]:
    rows = postgres.sql("SELECT id, done_at IS NOT NULL FROM jobs ORDER BY id", database=database)
    return [(int(r[0]), bool(r[1])) for r in rows]


def backends(postgres: Postgres, database: str) -> list[dict[str, object]]:
    return [r for r in postgres.activity() if r["datname"] == database]


@pytest.mark.parametrize(
    ("seconds", "grace", "finished"),
    [
        pytest.param(1.5, 20, True, id="the job in hand finishes within the grace"),
        pytest.param(60, 1, False, id="past the grace it is cancelled and rolls back"),
    ],
)
def test_sigterm_during_a_job(
    queue: tuple[Postgres, str, str], tmp_path: Path, seconds: float, grace: float, finished: bool
) -> None:
    postgres, url, name = queue
    postgres.sql(
        "INSERT INTO jobs (seconds) VALUES (%s), (0)", [seconds], database=name
    )  # a second job, which must not start
    worker = Worker(url, grace, tmp_path / "worker.log")
    try:
        worker.wait_for("job 1: started")
        code, took = worker.stop()
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
    output = worker.output()
    assert code == 0, output
    assert "SIGTERM: no new job; the job in hand has" in output
    assert "worker stopped" in output
    assert "Traceback" not in output, output
    assert done(postgres, name) == [(1, finished), (2, False)]
    if finished:
        assert "job 1: done" in output
        assert took < seconds + 10
    else:
        assert "the job in hand ran past 1 s: cancelled, rolled back" in output
        assert took < 1 + 10  # not the job's 60 s
    deadline = time.monotonic() + 5  # no backend left on the server, no query running on
    while backends(postgres, name):
        assert time.monotonic() < deadline, backends(postgres, name)
        time.sleep(0.05)


def test_sigterm_while_waiting_for_a_job_stops_at_once(
    queue: tuple[Postgres, str, str], tmp_path: Path
) -> None:
    postgres, url, name = queue
    worker = Worker(url, 20, tmp_path / "worker.log")
    try:
        worker.wait_for("app resources open")
        time.sleep(0.3)  # looking at the empty queue
        code, took = worker.stop()
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
    assert code == 0, worker.output()
    assert took < 5, worker.output()  # not the grace
    assert "worker stopped" in worker.output()
