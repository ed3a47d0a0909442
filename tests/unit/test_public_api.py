"""The public surface: `tether.__all__` is sorted, complete, and every name resolves."""

from __future__ import annotations

import subprocess
import sys
import typing

import tether
import tether.fastapi
import tether.testing


def test_all_is_sorted_and_complete() -> None:
    """Every public name of `tether` is in `__all__`, sorted, and importable."""
    # (pytest rewrites the asserts of a distribution with a pytest plugin: "@py_builtins")
    public = {name for name in dir(tether) if not name.startswith(("_", "@"))} - {
        "annotations",
        "TYPE_CHECKING",
        "fastapi",
        "integrations",
        "metrics",
        "cli",
        "demo",
        "pytest_plugin",
        "testing",
    }
    assert sorted(tether.__all__) == list(tether.__all__)
    assert set(tether.__all__) - {"__version__"} == public
    for name in tether.__all__:
        assert getattr(tether, name) is not None


def test_contract_names() -> None:
    """The names DESIGN.md promises users are there."""
    for name in [
        "Lifecycle",
        "Resource",
        "TetherError",
        "StartupError",
        "ResourceUnavailable",
        "ResourceClosedError",
        "DependencyCycleError",
        "ScopeError",
        "UnknownResourceError",
    ]:
        assert name in tether.__all__
    assert all(
        issubclass(getattr(tether, n), tether.TetherError)
        for n in tether.__all__
        if n.endswith("Error") and n != "TetherError"
    )
    assert tether.fastapi.__all__ == [
        "dashboard_router",
        "health_router",
        "idempotent",
        "install",
        "leak_threshold",
        "release",
    ]
    assert tether.testing.__all__ == [
        "assert_pools_returned",
        "assert_released",
        "in_flight",
        "pools_in_use",
        "running",
        "undo_overrides",
    ]


def test_fastapi_facing_hints_resolve() -> None:
    """FastAPI inspects these at runtime: their annotations must resolve."""
    typing.get_type_hints(tether.fastapi.dashboard_router)
    typing.get_type_hints(tether.fastapi.health_router)
    typing.get_type_hints(tether.fastapi.install)
    typing.get_type_hints(tether.fastapi.idempotent)
    typing.get_type_hints(tether.fastapi.release)
    typing.get_type_hints(tether.fastapi.leak_threshold)


def test_fastapi_integration_without_starlette_says_what_to_install() -> None:
    """The core installs without Starlette; importing tether.fastapi then names the extra."""
    code = (
        "import sys\n"
        "sys.modules['starlette'] = None  # as if it were not installed\n"
        "import tether\n"
        "try:\n"
        "    import tether.fastapi\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out == "tether.fastapi needs Starlette or FastAPI: pip install 'tether[fastapi]'\n"


def test_a_bare_import_reaches_the_submodules_on_first_use() -> None:
    """`import tether` then `tether.fastapi.install(...)`, as the docs write it: the
    submodule is imported on first use (before: AttributeError), and not before (the core
    imports no FastAPI); a name that is no submodule is still an AttributeError."""
    code = (
        "import sys\n"
        "import tether\n"
        "print('fastapi' in sys.modules, 'tether.fastapi' in sys.modules)\n"
        "print(tether.fastapi.health_router.__module__, tether.testing.running.__module__)\n"
        "import tether.integrations.sqlalchemy\n"
        "print(tether.integrations.sqlalchemy.engine.__name__)\n"
        "try:\n"
        "    tether.fastapy\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.splitlines() == [
        "False False",
        "tether.fastapi tether.testing",
        "engine",
        "module 'tether' has no attribute 'fastapy'",
    ]
