"""The public contract as written, where the code did otherwise (the contract review): on/off
options that are not bools, numbers of the FastAPI glue given as strings, keyword-only
dependencies, FastAPI markers under ``from __future__ import annotations``, generator factories
behind an ordinary decorator, ``lc.override`` with a ``functools.partial``, and ``timed_out``
of a resource's own ``timeout=``."""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
import pytest
from fastapi import Depends, FastAPI, Header
from fastapi.testclient import TestClient

import tether
from tests.unit._messages import exactly, not_a_bool
from tether.fastapi import dashboard_router, health_router, idempotent

if TYPE_CHECKING:
    from tests.unit.no_such_module import Principal  # type: ignore[import-not-found]

F = TypeVar("F", bound=Callable[..., Any])

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------- bool options


class TestBoolOptions:
    @pytest.mark.parametrize(
        ("option", "value", "kind"),
        [
            ("expose_errors", "false", "a str"),
            ("expose_errors", 0, "an int"),
            ("expose_errors", None, "None"),
            ("track_stacks", "no", "a str"),
        ],
    )
    def test_lifecycle_refuses_an_on_off_option_that_is_not_a_bool(
        self, option: str, value: object, kind: str
    ) -> None:
        """`Lifecycle(expose_errors="false")` (an environment variable's value) was stored as
        true: the 503 bodies of a public service then carried the causes it meant to hide."""
        with pytest.raises(TypeError, match=not_a_bool("Lifecycle()", option, value, kind)):
            tether.Lifecycle(**{option: value})

    def test_the_bools_of_lifecycle_are_taken(self) -> None:
        lc = tether.Lifecycle(expose_errors=False, track_stacks=False)
        assert lc.expose_errors is False
        assert lc.track_stacks is False

    @pytest.mark.parametrize(
        ("options", "option", "value", "kind", "none"),
        [
            ({"thread": "no"}, "thread", "no", "a str", True),
            ({"guard": "yes"}, "guard", "yes", "a str", False),
            ({"guard": 1}, "guard", 1, "an int", False),
            ({"scope": "app", "required": "no"}, "required", "no", "a str", False),
        ],
    )
    def test_a_resource_refuses_an_on_off_option_that_is_not_a_bool(
        self, options: dict[str, Any], option: str, value: object, kind: str, none: bool
    ) -> None:
        lc = tether.Lifecycle()

        def conn() -> str:
            return "c"

        expected = not_a_bool("Resource 'conn'", option, value, kind, none=none)
        with pytest.raises(TypeError, match=expected):
            lc.resource(**options)(conn)
        assert "conn" not in lc.resources

    def test_the_bools_of_a_resource_are_taken(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource(thread=None, guard=True)
        def conn() -> str:
            return "c"

        @lc.resource(scope="app", required=False, thread=True)
        def pool() -> str:
            return "p"

        assert (conn.thread, conn.guard, pool.thread, pool.required) == (False, True, True, False)

    def test_dashboard_router_refuses_an_include_in_schema_that_is_not_a_bool(self) -> None:
        expected = not_a_bool("dashboard_router()", "include_in_schema", "false", "a str")
        with pytest.raises(TypeError, match=expected):
            dashboard_router(tether.Lifecycle(), include_in_schema="false")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- numbers


class TestNumbersOfTheGlue:
    def test_idempotent_refuses_a_string_for_retries(self) -> None:
        """It raised `'<' not supported between instances of 'str' and 'int'`."""
        with pytest.raises(
            TypeError,
            match=exactly(
                "idempotent(): retries='2' is a str, not a whole number. Pass a whole number, "
                "1 or more, e.g. retries=2 (a setting read from the environment is a string: "
                "convert it with int())."
            ),
        ):
            idempotent(retries="2")  # type: ignore[call-overload]

    def test_idempotent_refuses_a_float_for_retries(self) -> None:
        with pytest.raises(
            TypeError,
            match=exactly(
                "idempotent(): retries=1.5 is a float, not a whole number. Pass a whole "
                "number, 1 or more, e.g. retries=2."
            ),
        ):
            idempotent(retries=1.5)  # type: ignore[call-overload]

    def test_health_router_refuses_a_string_for_cache(self) -> None:
        """A string was a ValueError; the README: a string is a TypeError, never converted."""
        with pytest.raises(
            TypeError,
            match=exactly(
                "health_router(): cache='5' is a str, not a number of seconds. Pass a number of "
                "seconds >= 0, e.g. cache=1.0, or 0 for every probe (a setting read from the "
                "environment is a string: convert it with float())."
            ),
        ):
            health_router(tether.Lifecycle(), cache="5")  # type: ignore[arg-type]

    def test_dashboard_router_refuses_a_string_for_refresh(self) -> None:
        with pytest.raises(
            TypeError,
            match=exactly(
                "dashboard_router(): refresh='5' is a str, not a number of seconds. Pass a "
                "positive number of seconds, e.g. refresh=2.0 (a setting read from the "
                "environment is a string: convert it with float())."
            ),
        ):
            dashboard_router(tether.Lifecycle(), refresh="5")  # type: ignore[arg-type]

    def test_a_number_out_of_range_keeps_its_message(self) -> None:
        with pytest.raises(ValueError, match=r"^idempotent\(retries=0\): retries must be 1 or"):
            idempotent(retries=0)
        with pytest.raises(ValueError, match=r"^health_router\(cache=-1\): cache is how long"):
            health_router(tether.Lifecycle(), cache=-1)
        with pytest.raises(ValueError, match=r"^dashboard_router\(refresh=0\): refresh is how"):
            dashboard_router(tether.Lifecycle(), refresh=0)


# --------------------------------------------------------------------------- keyword-only


class TestKeywordOnlyDependencies:
    """A keyword-only parameter names a resource like any other, and is passed by keyword
    (it was passed positionally: a TypeError when the resource opened)."""

    async def test_request_resources_get_them_by_keyword(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        def settings() -> str:
            return "s"

        @lc.resource
        async def pool() -> str:
            return "p"

        @lc.resource
        async def conn(pool: str, *, settings: str, debug: bool = False) -> AsyncIterator[str]:
            yield f"conn({pool},{settings},{debug})"

        @lc.resource
        def only(*, conn: str) -> str:
            return f"only({conn})"

        @lc.resource(thread=True)
        def threaded(*, settings: str) -> Iterator[str]:
            yield f"threaded({settings})"

        assert conn.params == ("pool", "settings")
        async with lc.run(), lc.scope() as s:
            assert await s.get(only) == "only(conn(p,s,False))"
            assert await s.get(threaded) == "threaded(s)"

    async def test_app_resources_get_them_by_keyword(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        def settings() -> str:
            return "s"

        @lc.resource(scope="app", timeout=5)
        async def pool(*, settings: str) -> AsyncIterator[str]:
            yield f"pool({settings})"

        async with lc.run():
            assert lc.get(pool) == "pool(s)"

    def test_a_route_gets_them_by_keyword(self) -> None:
        """The ASGI glue opens a plain resource inline: the same call."""
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        def settings() -> str:
            return "s"

        @lc.resource
        async def conn(*, settings: str) -> AsyncIterator[str]:
            yield f"conn({settings})"

        @lc.resource
        def cursor(conn: str, *, settings: str) -> str:
            return f"cursor({conn},{settings})"

        app = FastAPI(lifespan=lc.lifespan)

        @app.get("/")
        async def index(  # locals: not in Annotated, which FastAPI reads from the globals
            first: str = Depends(conn), value: str = Depends(cursor)
        ) -> str:
            return value

        with TestClient(app) as client:
            response = client.get("/")
        assert (response.status_code, response.json()) == (200, "cursor(conn(s),s)")

    def test_a_factory_with_no_keyword_only_dependency_is_called_as_it_is(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource
        def conn(*, debug: bool = False) -> str:
            return "c"

        assert conn.call is conn.factory


# --------------------------------------------------------------------------- future annotations


def get_admin() -> str:
    return "admin"


class TestFastAPIMarkersAsStrings:
    """This module has `from __future__ import annotations`: every annotation is a string.
    FastAPI's markers in an `Annotated` one were not seen, and the parameter was taken for a
    resource of that name (here, silently, another resource's value)."""

    def test_depends_in_a_string_annotation_is_refused(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource
        async def user() -> str:
            return "anonymous"

        async def audit(user: Annotated[str, Depends(get_admin)]) -> str:
            return f"audit as {user}"

        with pytest.raises(
            TypeError,
            match=exactly(
                "Resource 'audit': parameter 'user' is FastAPI's Depends(get_admin), which "
                "tether does not resolve: tether calls a resource's factory itself, and passes "
                "it only other resources, by parameter name. Register get_admin as a resource, "
                "@lc.resource(name='user'), and drop the Depends()."
            ),
        ):
            lc.resource(audit)

    def test_header_in_a_string_annotation_is_refused(self) -> None:
        lc = tether.Lifecycle()

        def tenant(x_tenant: Annotated[str, Header()]) -> str:
            return x_tenant

        with pytest.raises(
            TypeError,
            match=exactly(
                "Resource 'tenant': parameter 'x_tenant' is FastAPI's Header(), which tether "
                "does not resolve: tether calls a resource's factory itself, and passes it only "
                "other resources, by parameter name. Read it in the route (`x_tenant: "
                "Annotated[str, Header()]`) and pass it to the work there, or drop the parameter."
            ),
        ):
            lc.resource(tenant)

    def test_an_annotation_that_does_not_evaluate_is_read_as_text(self) -> None:
        """A name imported under TYPE_CHECKING only: the annotation cannot be evaluated, and
        its text is read for the markers, with the same message."""
        lc = tether.Lifecycle()

        def audit(user: Annotated[Principal, Depends(get_admin)]) -> str:
            return "audit"

        with pytest.raises(TypeError, match=r"^Resource 'audit': parameter 'user' is FastAPI's "):
            lc.resource(audit)
        with pytest.raises(TypeError, match=r"Depends\(get_admin\), which tether does not"):
            lc.resource(audit)

    def test_an_annotation_that_does_not_evaluate_is_no_marker_otherwise(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource
        def principal() -> str:
            return "p"

        @lc.resource
        def audit(principal: Principal) -> str:
            return f"audit({principal})"

        assert audit.params == ("principal",)


# --------------------------------------------------------------------------- wrapped factories


def logged(calls: list[str]) -> Callable[[F], F]:
    """An ordinary decorator (logging, tracing): it passes the call through."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


class TestWrappedFactories:
    """A generator function behind a `functools.wraps` decorator was taken for an
    `@(async)contextmanager` function (its `__wrapped__` is a generator function): opening
    it failed with `AttributeError: 'async_generator' object has no attribute '__aenter__'`."""

    async def test_a_wrapped_async_generator_is_an_async_generator(self) -> None:
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        @logged(events)
        async def conn() -> AsyncIterator[str]:
            events.append("open")
            yield "c"
            events.append("close")

        async with lc.scope() as s:
            assert await s.get(conn) == "c"
        assert events == ["conn", "open", "close"]

    async def test_an_object_wrapping_a_coroutine_function_is_called_as_it_is(self) -> None:
        """An object made with `functools.update_wrapper` (asgiref's `AsyncToSync`) may run
        the function it wraps: only a function's decorator is followed (the diff reviewer
        saw one awaited as a coroutine function)."""
        lc = tether.Lifecycle()

        async def make() -> str:
            return "made"

        class RunsIt:
            def __init__(self, fn: Any) -> None:
                self.fn = fn
                functools.update_wrapper(self, fn)

            def __call__(self) -> str:
                return "ran it"  # (AsyncToSync runs the coroutine in a loop of its own)

        value = lc.resource(name="value", thread=False)(RunsIt(make))
        async with lc.scope() as s:
            assert await s.get(value) == "ran it"

    async def test_a_wrapped_sync_generator_is_a_sync_generator(self) -> None:
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        @logged(events)
        def conn() -> Iterator[str]:
            events.append(f"open in {threading.current_thread() is threading.main_thread()}")
            yield "c"
            events.append("close")

        async with lc.scope() as s:
            assert await s.get(conn) == "c"
        assert events == ["conn", "open in False", "close"]  # in a thread, as a generator

    async def test_a_wrapped_coroutine_function_is_awaited(self) -> None:
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        @logged(events)
        async def conn() -> str:
            return "c"

        async with lc.scope() as s:
            assert await s.get(conn) == "c"

    async def test_context_manager_functions_stay_context_managers(self) -> None:
        """`@asynccontextmanager` and `@contextmanager` functions, also behind an ordinary
        decorator, or given their options with `functools.partial`."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @asynccontextmanager
        async def acm(label: str = "a") -> AsyncIterator[str]:
            events.append(f"enter {label}")
            yield label
            events.append(f"exit {label}")

        @contextmanager
        def cm(label: str = "s") -> Iterator[str]:
            events.append(f"enter {label}")
            yield label
            events.append(f"exit {label}")

        one = lc.resource(acm, name="one")
        two = lc.resource(logged(events)(acm), name="two")
        three = lc.resource(functools.partial(acm, label="p"), name="three")
        four = lc.resource(cm, name="four")
        five = lc.resource(functools.partial(cm, label="q"), name="five")
        async with lc.scope() as s:
            values = [await s.get(r) for r in (one, two, three, four, five)]
        assert values == ["a", "a", "p", "s", "q"]
        assert events == [
            "enter a",
            "acm",
            "enter a",
            "enter p",
            "enter s",
            "enter q",
            "exit q",
            "exit s",
            "exit p",
            "exit a",
            "exit a",
        ]


# --------------------------------------------------------------------------- overrides


class TestOverrideWithAPartial:
    async def test_a_partial_is_a_factory(self) -> None:
        """`lc.override(conn, partial(fake, ...))` handed out the partial itself."""
        lc = tether.Lifecycle()

        @lc.resource
        def settings() -> str:
            return "s"

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            yield "real"

        events: list[str] = []

        async def fake(settings: str, label: str) -> AsyncIterator[str]:
            events.append("open")
            yield f"fake {label} ({settings})"
            events.append("close")

        with lc.override(conn, functools.partial(fake, label="p")):
            async with lc.scope() as s:
                assert await s.get(conn) == "fake p (s)"
        assert events == ["open", "close"]


# --------------------------------------------------------------------------- timed_out


class TestOwnTimeout:
    async def test_a_request_resources_own_timeout_is_timed_out(self) -> None:
        """`ResourceUnavailable.timed_out` was False, while stats counted a timeout."""
        lc = tether.Lifecycle()

        @lc.resource(timeout=0.05, retry_after=2)
        async def slow() -> AsyncIterator[int]:
            await anyio.sleep(5)
            yield 1

        async with lc.run(), lc.scope() as s:
            with pytest.raises(tether.ResourceUnavailable) as info:
                await s.get(slow)
        assert info.value.timed_out is True
        assert info.value.retry_after == 2
        figures = lc.stats().resources["slow"]
        assert (figures.timeouts, figures.open_errors) == (1, 1)  # counted once

    async def test_an_app_resources_own_timeout_counts_each_attempt_once(self) -> None:
        lc = tether.Lifecycle()

        @lc.resource(scope="app", timeout=0.05, retries=1, backoff=0.01)
        async def slow() -> AsyncIterator[int]:
            await anyio.sleep(5)
            yield 1

        with pytest.raises(tether.StartupError) as info:
            async with lc.run():
                pass
        cause = info.value.__cause__
        assert isinstance(cause, tether.ResourceUnavailable)
        assert cause.timed_out is True
        figures = lc.stats().resources["slow"]
        assert (figures.timeouts, figures.open_errors) == (2, 2)

    async def test_a_resource_down_at_startup_counts_its_timeouts(self) -> None:
        lc = tether.Lifecycle()
        attempts: list[int] = []

        @lc.resource(scope="app", timeout=0.05, required=False, backoff=0.01)
        async def flaky() -> AsyncIterator[int]:
            attempts.append(1)
            if len(attempts) < 3:
                await anyio.sleep(5)
            yield 1

        async with lc.run():
            with anyio.fail_after(5):
                while True:
                    try:
                        assert lc.get(flaky) == 1
                        break
                    except tether.ResourceUnavailable:
                        await anyio.sleep(0.01)
            figures = lc.stats().resources["flaky"]
        assert figures.timeouts == 2
