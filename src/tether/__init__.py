"""tether: connection lifecycle management for FastAPI.

Pools and clients live for the application, connections, sessions and transactions for
one unit of work; every one is opened in order, closed exactly once in reverse order,
and observed while it lives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import (
    ClientDisconnected,
    DependencyCycleError,
    DuplicateResourceError,
    FailedResponse,
    ResourceClosedError,
    ResourceUnavailable,
    ScopeError,
    ShutdownError,
    StartupError,
    TetherError,
    UnknownResourceError,
)
from ._health import CheckResult, HealthReport
from ._lifecycle import Lifecycle, Override, State
from ._resource import Resource
from ._scope import Unit
from ._stats import PoolStats, ResourceStats, Stats

__version__ = "0.1.0"

# The submodules a bare `import tether` reaches on first use (`tether.fastapi.install(app,
# lc)`, as the docs write it), without importing FastAPI, Starlette or a driver before then.
_SUBMODULES = frozenset({"cli", "fastapi", "integrations", "metrics", "testing"})

if TYPE_CHECKING:
    from . import cli as cli
    from . import fastapi as fastapi
    from . import integrations as integrations
    from . import metrics as metrics
    from . import testing as testing
else:

    def __getattr__(name: str) -> object:
        if name in _SUBMODULES:
            import importlib

            return importlib.import_module(f"{__name__}.{name}")
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)


__all__ = [
    "CheckResult",
    "ClientDisconnected",
    "DependencyCycleError",
    "DuplicateResourceError",
    "FailedResponse",
    "HealthReport",
    "Lifecycle",
    "Override",
    "PoolStats",
    "Resource",
    "ResourceClosedError",
    "ResourceStats",
    "ResourceUnavailable",
    "ScopeError",
    "ShutdownError",
    "StartupError",
    "State",
    "Stats",
    "TetherError",
    "Unit",
    "UnknownResourceError",
    "__version__",
]
