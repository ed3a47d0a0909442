"""tether: connection lifecycle management for FastAPI.

Pools and clients live for the application, connections, sessions and transactions for
one unit of work; every one is opened in order, closed exactly once in reverse order,
and observed while it lives.
"""

from __future__ import annotations

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
