"""Benchmarks: tether against hand-written code, FastAPI's own dependencies and peer libraries.

Run with ``python -m bench.run`` (full, under 10 minutes) or ``python -m bench.run --quick``.
"""
