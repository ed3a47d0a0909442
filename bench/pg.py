"""The PostgreSQL server for the benchmarks: a throwaway one from tests/servers.py, on CPU 1."""

from __future__ import annotations

from typing import Any

from bench import procs


def start(max_connections: int = 200, others: procs.Others | None = None) -> tuple[Any | None, str]:
    """Starts PostgreSQL pinned to the load CPU; returns it, or None and why not. Its
    processes count as ours for ``others``."""
    try:
        from tests.servers import Postgres
    except ImportError as exc:
        return None, f"tests/servers.py not importable: {exc}"
    try:
        pg = Postgres(max_connections=max_connections).start()
    except Exception as exc:
        return None, f"PostgreSQL did not start: {exc}"
    try:
        with open(pg.data_dir / "postmaster.pid") as f:
            postmaster = int(f.readline())
        procs.pin_tree(postmaster, procs.LOAD_CPU)
        if others is not None:
            others.add_root(postmaster)
    except (OSError, ValueError):
        pass  # unpinned is noisier, not wrong
    return pg, ""
