"""A short run of the soak (`tests/soak.py`; reliability.md, test 18): one warm-up cycle of
every fault, then one measured cycle, against a real PostgreSQL and a real uvicorn. `make soak`
runs it for 30 minutes."""

from pathlib import Path

import pytest

from tests.servers import Postgres
from tests.soak import FAULTS, soak

pytestmark = [pytest.mark.servers, pytest.mark.soak]


def test_a_short_soak_with_every_fault_twice(postgres: Postgres, tmp_path: Path) -> None:
    report = soak(postgres, tmp_path, 0.0, seed=1, fault_seconds=1.5, quiet_seconds=0.8)
    print(report.summary())
    assert report.problems == []
    assert report.faults == {name: 2 for name in FAULTS}
    assert report.answers["pg 200"] > 100
    assert report.answers["sa 200"] > 100
    assert report.answers["left mid-query"] > 10
