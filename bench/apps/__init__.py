"""The benchmark apps: one module per variant, each serving the same routes.

Every module defines ``app``. A variant whose module cannot be imported (a peer not installed,
tether's core not there yet) is skipped by the harness with the import error as the reason.
"""

from __future__ import annotations

import importlib
import traceback
from types import ModuleType

# variant name -> module under bench.apps
VARIANTS: dict[str, str] = {
    "starlette-raw": "starlette_raw",
    "fastapi-manual": "fastapi_manual",
    "fastapi-yield": "fastapi_yield",
    "wrapper-floor": "wrapper_floor",
    "handler-floor": "handler_floor",
    "features-floor": "features_floor",
    "tether": "tether_app",
    "dishka": "dishka_app",
    "svcs": "svcs_app",
    "wireup": "wireup_app",
    "that-depends": "that_depends_app",
}
# Measured on demand only (`--only`, `bench.concurrent`), not in `make bench`.
ON_DEMAND = ("features-floor",)
PEERS = ("dishka", "svcs", "wireup", "that-depends")
FLOOR = "fastapi-manual"


def app_path(variant: str) -> str:
    return f"bench.apps.{VARIANTS[variant]}:app"


def load(variant: str) -> tuple[ModuleType | None, str]:
    """Imports a variant's module; returns it, or None and the reason it cannot be used."""
    return load_module(VARIANTS[variant])


def load_module(name: str) -> tuple[ModuleType | None, str]:
    """Imports ``bench.apps.<name>``; returns it, or None and the reason it cannot be used."""
    try:
        return importlib.import_module(f"bench.apps.{name}"), ""
    except Exception as exc:  # any failure means: skip this variant, say why
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
        return None, f"{type(exc).__name__}: {exc} ({where})"
