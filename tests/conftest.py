from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]  # tests/unit/test_pytest_plugin.py runs pytest on test files


@pytest.fixture
def anyio_backend() -> str:
    """tether's ASGI glue targets asyncio (uvicorn's loop); the core uses anyio only
    (tests/unit/test_trio.py runs it on trio)."""
    return "asyncio"
