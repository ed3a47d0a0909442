"""The graph is validated before anything opens; every message is pinned."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether

from ._messages import cycle, unknown

pytestmark = pytest.mark.anyio


class TestCycles:
    async def test_two_resource_cycle_shows_the_path(self) -> None:
        """A cycle `a -> b -> a` raises DependencyCycleError with the path, and opens nothing."""
        lc = tether.Lifecycle()
        opened: list[str] = []

        @lc.resource(scope="app")
        def a(b: int) -> int:
            opened.append("a")
            return 1

        @lc.resource(scope="app")
        def b(a: int) -> int:
            opened.append("b")
            return 2

        @lc.resource(scope="app")
        def fine() -> int:
            opened.append("fine")
            return 3

        with pytest.raises(tether.DependencyCycleError, match=cycle("a", "b", "a")) as info:
            async with lc.run():
                pass  # pragma: no cover
        assert info.value.path == ("a", "b", "a")
        assert opened == []
        assert lc.state is tether.State.CREATED

    def test_self_dependency_is_a_cycle(self) -> None:
        """A resource naming itself as a parameter is a cycle `a -> a`."""
        lc = tether.Lifecycle()

        @lc.resource
        def a(a: int) -> int:
            return a

        with pytest.raises(tether.DependencyCycleError, match=cycle("a", "a")):
            lc.validate()

    async def test_longer_cycle_in_request_scope(self) -> None:
        """A three-resource cycle is reported on `lc.scope()` before any value opens."""
        lc = tether.Lifecycle()
        opened: list[str] = []

        @lc.resource
        def x(y: int) -> int:
            opened.append("x")
            return 1

        @lc.resource
        def y(z: int) -> int:
            opened.append("y")
            return 1

        @lc.resource
        def z(x: int) -> int:
            opened.append("z")
            return 1

        with pytest.raises(tether.DependencyCycleError, match=cycle("x", "y", "z", "x")):
            async with lc.scope():
                pass  # pragma: no cover
        assert opened == []


class TestScopeRule:
    async def test_app_resource_depending_on_request_resource(self) -> None:
        """An app resource depending on a request resource raises ScopeError naming both."""
        lc = tether.Lifecycle()
        opened: list[str] = []

        @lc.resource
        async def session() -> AsyncIterator[str]:
            opened.append("session")
            yield "s"

        @lc.resource(scope="app")
        def cache(session: str) -> str:
            opened.append("cache")
            return session

        expected = re.escape(
            "App resource 'cache' depends on request resource 'session': an app resource "
            "lives for the whole application and cannot hold a value that lives for one "
            "request. Make 'session' an app resource (scope=\"app\"), or make 'cache' a "
            "request resource."
        )
        with pytest.raises(tether.ScopeError, match=rf"^{expected}$"):
            async with lc.run():
                pass  # pragma: no cover
        assert opened == []

    def test_request_resource_may_depend_on_app_resource(self) -> None:
        """A request resource depending on an app resource is valid."""
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        def pool() -> str:
            return "pool"

        @lc.resource
        def conn(pool: str) -> str:
            return pool

        lc.validate()
        assert conn.deps == (pool,)


class TestUnknownParameter:
    async def test_unknown_parameter_suggests_closest_name(self) -> None:
        """A parameter naming no resource raises UnknownResourceError with the closest name."""
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        def pool() -> str:
            return "pool"

        @lc.resource
        def conn(pool_: str) -> str:
            return pool_

        expected = unknown("conn", "pool_", " Did you mean 'pool'?", "conn, pool")
        with pytest.raises(tether.UnknownResourceError, match=expected) as info:
            async with lc.scope():
                pass  # pragma: no cover
        assert info.value.name == "pool_"
        assert isinstance(info.value, LookupError)

    def test_unknown_parameter_without_close_match(self) -> None:
        """With nothing close, the message lists what is registered and offers no guess."""
        lc = tether.Lifecycle()

        @lc.resource
        def conn(zzzz: str) -> str:
            return zzzz

        expected = unknown("conn", "zzzz", "", "conn")
        with pytest.raises(tether.UnknownResourceError, match=expected):
            lc.validate()

    async def test_unknown_parameter_fails_app_startup_before_anything_opens(self) -> None:
        """`lc.run()` refuses a graph with an unknown name before opening any resource."""
        lc = tether.Lifecycle()
        opened: list[str] = []

        @lc.resource(scope="app")
        def settings() -> str:
            opened.append("settings")
            return "s"

        @lc.resource(scope="app")
        def pool(setings: str) -> str:
            opened.append("pool")
            return setings

        expected = unknown("pool", "setings", " Did you mean 'settings'?", "pool, settings")
        with pytest.raises(tether.UnknownResourceError, match=expected):
            async with lc.run():
                pass  # pragma: no cover
        assert opened == []


class TestRegistration:
    def test_duplicate_name(self) -> None:
        """Registering two resources under one name raises DuplicateResourceError."""
        lc = tether.Lifecycle()

        @lc.resource
        def conn() -> int:
            return 1

        expected = re.escape(
            "A resource named 'conn' is already registered on this Lifecycle. "
            "Give one of them another name: @lc.resource(name=...), or name= of the "
            "integration that declared it (e.g. tpg.connection(lc, replica, "
            "name='replica_conn') beside another connection(), asyncpg's and psycopg's named "
            "'conn' by default)."
        )
        with pytest.raises(tether.DuplicateResourceError, match=rf"^{expected}$"):

            @lc.resource(name="conn")
            def other() -> int:
                return 2

        assert lc.resources["conn"] is conn

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"scope": "global"}, "Resource 'r': scope='global' is not one of 'app', 'request'."),
            (
                {"release": "later"},
                "Resource 'r': release='later' is not one of 'handler', 'response'.",
            ),
            ({"timeout": 0}, "Resource 'r': timeout=0 must be a positive number of seconds."),
            (
                {"timeout": -1.5},
                "Resource 'r': timeout=-1.5 must be a positive number of seconds.",
            ),
            ({"retries": -1}, "Resource 'r': retries=-1 must be 0 or more."),
            ({"concurrency": 0}, "Resource 'r': concurrency=0 must be 1 or more."),
        ],
    )
    def test_bad_arguments(self, options: dict[str, Any], message: str) -> None:
        """An invalid option value raises ValueError naming the resource and the value."""
        lc = tether.Lifecycle()

        def r() -> int:
            return 1

        with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
            lc.resource(**options)(r)
        assert "r" not in lc.resources

    def test_not_callable(self) -> None:
        """Registering something that is not callable raises TypeError."""
        lc = tether.Lifecycle()
        expected = re.escape(
            "@lc.resource was given 42, which is not callable. Decorate a function "
            "(or pass a class or context-manager factory) that makes the value."
        )
        with pytest.raises(TypeError, match=rf"^{expected}$"):
            lc.resource(42)  # type: ignore[call-overload]

    @pytest.mark.parametrize(
        ("name", "error", "message"),
        [
            (
                "my-db",
                ValueError,
                "Resource name='my-db' is not a valid parameter name, and a parameter asks for "
                "a resource by its name: use letters, digits and underscores, not starting "
                "with a digit, e.g. name='my_db'.",
            ),
            (
                "2db",
                ValueError,
                "Resource name='2db' is not a valid parameter name, and a parameter asks for "
                "a resource by its name: use letters, digits and underscores, not starting "
                "with a digit, e.g. name='r_2db'.",
            ),
            (
                "",
                ValueError,
                "Resource name='' is not a valid parameter name, and a parameter asks for a "
                "resource by its name: use letters, digits and underscores, not starting with "
                "a digit, e.g. name='db'.",
            ),
            (
                5,
                TypeError,
                "Resource name=5 is an int, not a string. A parameter asks for a resource by "
                "its name: pass one, e.g. name='db'.",
            ),
        ],
    )
    def test_name_must_be_an_identifier(
        self, name: Any, error: type[Exception], message: str
    ) -> None:
        """A name that is not a valid parameter name is refused, naming it (before, the
        message blamed the function, "Cannot tell the name of resource <function r>", and
        an empty name was replaced by the function's without a word)."""
        lc = tether.Lifecycle()

        def r() -> int:
            return 1

        with pytest.raises(error) as caught:
            lc.resource(name=name)(r)
        assert str(caught.value) == message
        assert not lc.resources

    @pytest.mark.parametrize("options", [{"retries": 2}, {"backoff": 1.0}])
    def test_retries_are_for_app_resources(self, options: dict[str, Any]) -> None:
        """A request resource's open is never retried: retries= or backoff= on one is refused
        (before: accepted, and nothing retried)."""
        lc = tether.Lifecycle()

        def conn() -> int:
            return 1

        with pytest.raises(ValueError) as caught:
            lc.resource(**options)(conn)
        assert str(caught.value) == (
            "Resource 'conn': retries= and backoff= are for app resources (retried while they "
            "come up at startup); a request resource's open is not retried: a request that "
            "cannot open it is answered 503 with Retry-After, for the client to retry. Drop "
            "them, or use scope='app'."
        )
        assert not lc.resources
        lc.resource(scope="app", **options)(conn)  # an app resource's

    def test_a_function_without_a_name_is_refused(self) -> None:
        """A factory whose name is no parameter name (a lambda) is refused, naming the fix."""
        lc = tether.Lifecycle()
        r = lambda: 1  # noqa: E731
        expected = re.escape(
            f"Cannot tell the name of resource {r!r}. Give it one that is a valid "
            f"parameter name: @lc.resource(name=...)."
        )
        with pytest.raises(ValueError, match=rf"^{expected}$"):
            lc.resource(r)

    @pytest.mark.parametrize("owner", ["this", "another"])
    @pytest.mark.parametrize("named", [False, True])
    def test_a_resource_given_to_lc_resource_again_is_refused(
        self, owner: str, named: bool
    ) -> None:
        """A resource registered again (decorated twice, or moved to a second Lifecycle)
        was refused for its name, and with name= accepted, to fail at its first use naming
        a parameter 'connection' the user never wrote (trial 16)."""
        first = tether.Lifecycle()

        @first.resource
        def conn() -> int:
            return 1

        lc = first if owner == "this" else tether.Lifecycle()
        options = {"name": "again"} if named else {}
        with pytest.raises(TypeError) as caught:
            lc.resource(**options)(conn)
        assert str(caught.value) == (
            f"lc.resource() was given <tether.Resource 'conn' scope='request'>, which is a "
            f"resource already (of {owner} Lifecycle). Register its factory function instead, "
            f"or, to use it, name it as a parameter of another resource or pass it to Depends()."
        )
        assert list(lc.resources) == (["conn"] if owner == "this" else [])

    async def test_app_resource_registered_while_running(self) -> None:
        """Registering an app resource after startup raises ScopeError."""
        lc = tether.Lifecycle()

        def late() -> int:
            return 1

        expected = re.escape(
            "Cannot register app resource 'late': the app scope is already running. "
            "Register app resources before the application starts."
        )
        async with lc.run():
            with pytest.raises(tether.ScopeError, match=rf"^{expected}$"):
                lc.resource(scope="app")(late)


class TestLifecycleOptions:
    @pytest.mark.parametrize(
        ("delay", "error"),
        [(-1, ValueError), (True, TypeError), ("5", TypeError), (float("nan"), ValueError)],
    )
    def test_a_drain_delay_that_is_not_a_duration_is_refused(
        self, delay: object, error: type[Exception]
    ) -> None:
        expected = (
            f"Lifecycle(drain_delay={delay!r}): drain_delay is how long, in seconds, readiness "
            f"fails after SIGTERM before the server shuts down, and must be a number >= 0; "
            f"e.g. drain_delay=5, or 0 to leave SIGTERM to the server."
        )
        with pytest.raises(error, match=f"^{re.escape(expected)}$"):
            tether.Lifecycle(drain_delay=delay)  # type: ignore[arg-type]


def test_a_context_manager_decorator_of_the_other_kind_is_refused_when_declared() -> None:
    """`@asynccontextmanager` on a `def` generator (or `@contextmanager` on an `async def`
    one) failed at first use with Python's AttributeError, naming no resource (trial 16)."""
    from contextlib import asynccontextmanager, contextmanager

    lc = tether.Lifecycle()

    def sync_gen() -> Any:
        yield 1

    async def async_gen() -> Any:
        yield 1

    with pytest.raises(TypeError) as refused:
        lc.resource(asynccontextmanager(sync_gen))
    assert str(refused.value) == (
        "A resource factory: @asynccontextmanager is on test_a_context_manager_decorator_of_"
        "the_other_kind_is_refused_when_declared.<locals>.sync_gen, which is a sync generator "
        "function (`def`): make it `async def`, or use @contextmanager."
    )
    with pytest.raises(TypeError) as refused:
        lc.resource(contextmanager(async_gen))  # type: ignore[arg-type]
    assert str(refused.value) == (
        "A resource factory: @contextmanager is on test_a_context_manager_decorator_of_the_"
        "other_kind_is_refused_when_declared.<locals>.async_gen, which is an async generator "
        "function (`async def`): use @asynccontextmanager, or make it a `def`."
    )
    assert not lc.resources
