"""tether's Prometheus series with `uvicorn --workers 2` (prometheus-client's multiprocess
mode): a scrape answered by either worker reports the requests of both."""

import os
import signal
import time
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.serving import Server

APP = "tests.e2e.app_prometheus_workers:app"
REFRESH_INTERVAL = 1.0  # tether writes a worker's figures every second
OPENS = "tether_resource_wait_time_seconds_count"
CLOSES = "tether_resource_use_time_seconds_count"


def values(samples: list[Sample]) -> dict[str, float]:
    """Each sample of the request resource `session` (or with no labels) by name."""
    found: dict[str, float] = {}
    for sample in samples:
        if sample.labels.get("pool_name", "session") == "session":
            found[sample.name] = sample.value
    return found


def scrape(server: Server) -> dict[str, float]:
    for _ in range(20):
        response = httpx.get(f"{server.base_url}/metrics/", timeout=10)
        if response.status_code != 500:
            break
        # prometheus-client's own race, not tether's: a worker uvicorn starts creates its
        # files while another worker's MultiProcessCollector reads them, and the read of one
        # still empty raises `struct.error` (a 500). The next scrape reads it whole.
        time.sleep(0.1)
    response.raise_for_status()
    text = response.text
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), f"a family reported twice: {names}"
    return values([sample for family in families for sample in family.samples])


def request(server: Server, served: dict[int, int]) -> None:
    pid = httpx.get(server.base_url, timeout=10).json()
    served[pid] = served.get(pid, 0) + 1


def settled(server: Server, n: int) -> None:
    """Once each worker has written its figures, every scrape reports the *n* requests."""
    # Each worker writes its figures every REFRESH_INTERVAL; on a loaded machine a fixed
    # wait of two intervals may end before one has: wait for a scrape that adds up first.
    deadline = time.monotonic() + 10 * REFRESH_INTERVAL + 20
    while True:
        figures = scrape(server)
        counts = (figures.get("app_served_total"), figures.get(OPENS), figures.get(CLOSES))
        if counts == (n, n, n):
            break
        assert time.monotonic() < deadline, f"{n} requests: {figures}"
        time.sleep(0.1)
    for _ in range(10):
        figures = scrape(server)
        assert figures["app_served_total"] == n
        assert (figures[OPENS], figures[CLOSES]) == (n, n), f"{n} requests: {figures}"
        assert figures["tether_resource_in_use"] == 0
        assert figures["tether_lifecycle_running"] == 1


def test_a_scrape_adds_up_the_workers_and_never_goes_back(tmp_path: Path) -> None:
    """Requests spread over two workers: every scrape after them (whichever worker answers)
    reports all of them, as prometheus-client's own counter does; scrapes taken meanwhile
    never go backwards, nor when a worker dies and uvicorn starts another, nor once the
    server stopped (the files keep the counts, and the workers' last figures)."""
    files = tmp_path / "prometheus"
    files.mkdir()
    server = Server(APP, tmp_path, "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(files)})
    try:
        served: dict[int, int] = {}
        seen: list[float] = []
        deadline = time.monotonic() + 60
        while min(served.values(), default=0) < 10 or len(served) < 2:
            assert time.monotonic() < deadline, f"requests did not reach both workers: {served}"
            request(server, served)
            if sum(served.values()) % 5 == 0:
                opens = scrape(server).get(OPENS, 0.0)
                assert opens <= sum(served.values())
                seen.append(opens)
        assert seen == sorted(seen), f"the count of opens went backwards: {seen}"
        n = sum(served.values())
        settled(server, n)

        killed = next(iter(served))
        os.kill(killed, signal.SIGKILL)  # uvicorn starts another worker
        mark_process_dead(killed, str(files))  # its live gauges go (gunicorn's child_exit)
        for _ in range(10):
            request(server, served)
            opens = scrape(server)[OPENS]
            assert n <= opens <= sum(served.values()), f"{n} before the worker died: {opens}"
        settled(server, sum(served.values()))
    finally:
        server.stop()
    stopped = values(
        [
            sample
            for family in MultiProcessCollector(None, str(files)).collect()
            for sample in family.samples
        ]
    )
    n = sum(served.values())
    assert (stopped[OPENS], stopped[CLOSES]) == (n, n)
    # The workers stopped wrote their last figures: nothing open, in flight or running.
    assert stopped["tether_resource_in_use"] == 0
    assert stopped["tether_units_in_flight"] == 0
    assert stopped["tether_lifecycle_running"] == 0


def test_workers_stopped_before_their_first_sweep_report_nothing_running(
    tmp_path: Path,
) -> None:
    """A worker's last figures are written when its app scope ends even if no sweep ran yet
    (a worker uvicorn had just started again, stopped at once): they read
    `tether_lifecycle_running` 1 for good, the figures a scrape wrote (promflake review,
    reproduced 3 of 3 with the sweeps switched off)."""
    files = tmp_path / "prometheus"
    files.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(files), "APP_SWEEP_INTERVAL": "1000"}
    server = Server(APP, tmp_path, "--workers", "2", env=env)
    try:
        served: dict[int, int] = {}
        for _ in range(6):
            request(server, served)
        assert scrape(server)["tether_lifecycle_running"] == 1
    finally:
        server.stop()
    stopped = values(
        [
            sample
            for family in MultiProcessCollector(None, str(files)).collect()
            for sample in family.samples
        ]
    )
    assert stopped["tether_lifecycle_running"] == 0
    assert stopped["tether_resource_in_use"] == 0
