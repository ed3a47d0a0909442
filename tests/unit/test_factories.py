"""Factory kinds, dependencies by parameter name, renaming, configuration parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType

import pytest

import tether

pytestmark = pytest.mark.anyio


class TestFactoryKinds:
    async def test_async_generator_yields_value_and_cleans_up(self) -> None:
        """An async generator's value is handed out; code after `yield` runs at scope end."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        async def conn() -> AsyncIterator[str]:
            events.append("open")
            yield "async-gen"
            events.append("close")

        async with lc.scope() as s:
            assert await s.get(conn) == "async-gen"
            assert events == ["open"]
        assert events == ["open", "close"]

    async def test_sync_generator_yields_value_and_cleans_up(self) -> None:
        """A sync generator's yielded value is handed out; code after `yield` runs at scope end."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        def conn() -> Iterator[str]:
            events.append("open")
            yield "sync-gen"
            events.append("close")

        async with lc.scope() as s:
            assert await s.get(conn) == "sync-gen"
            assert events == ["open"]
        assert events == ["open", "close"]

    async def test_asynccontextmanager_factory(self) -> None:
        """An @asynccontextmanager factory is entered on first use and exited at scope end."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @asynccontextmanager
        async def make() -> AsyncIterator[str]:
            events.append("enter")
            yield "async-cm"
            events.append("exit")

        conn = lc.resource(make, name="conn")
        async with lc.scope() as s:
            assert await s.get(conn) == "async-cm"
            assert events == ["enter"]
        assert events == ["enter", "exit"]

    async def test_contextmanager_factory(self) -> None:
        """A @contextmanager factory is entered on first use and exited at scope end."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        @contextmanager
        def conn() -> Iterator[str]:
            events.append("enter")
            yield "sync-cm"
            events.append("exit")

        async with lc.scope() as s:
            assert await s.get(conn) == "sync-cm"
            assert events == ["enter"]
        assert events == ["enter", "exit"]

    async def test_class_with_aenter_aexit(self) -> None:
        """A class with __aenter__/__aexit__ is instantiated, entered, and exited at scope end."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        class Client:
            async def __aenter__(self) -> str:
                events.append("aenter")
                return "async-class"

            async def __aexit__(
                self,
                et: type[BaseException] | None,
                e: BaseException | None,
                tb: TracebackType | None,
            ) -> None:
                events.append(f"aexit:{et}")

        async with lc.scope() as s:
            assert await s.get(Client) == "async-class"
        assert events == ["aenter", "aexit:None"]

    async def test_class_with_enter_exit(self) -> None:
        """A class with __enter__/__exit__ is instantiated, entered, and exited at scope end."""
        lc = tether.Lifecycle()
        events: list[str] = []

        @lc.resource
        class Handle:
            def __enter__(self) -> str:
                events.append("enter")
                return "sync-class"

            def __exit__(
                self,
                et: type[BaseException] | None,
                e: BaseException | None,
                tb: TracebackType | None,
            ) -> None:
                events.append(f"exit:{et}")

        async with lc.scope() as s:
            assert await s.get(Handle) == "sync-class"
        assert events == ["enter", "exit:None"]

    async def test_plain_async_function(self) -> None:
        """A plain async function's return value is the value; there is nothing to clean up."""
        lc = tether.Lifecycle()

        @lc.resource
        async def token() -> str:
            return "async-func"

        async with lc.scope() as s:
            assert await s.get(token) == "async-func"

    async def test_plain_sync_function(self) -> None:
        """A plain sync function's return value is the value; there is nothing to clean up."""
        lc = tether.Lifecycle()

        @lc.resource
        def token() -> str:
            return "sync-func"

        async with lc.scope() as s:
            assert await s.get(token) == "sync-func"

    @pytest.mark.parametrize("kind", ["async_gen", "sync_gen", "async_cm", "sync_cm", "func"])
    async def test_every_kind_works_as_app_resource(self, kind: str) -> None:
        """Each factory kind opens as an app resource in `lc.run()` and is closed on exit."""
        lc = tether.Lifecycle()
        events: list[str] = []

        async def agen() -> AsyncIterator[str]:
            events.append("open")
            yield kind
            events.append("close")

        def sgen() -> Iterator[str]:
            events.append("open")
            yield kind
            events.append("close")

        def func() -> str:
            events.append("open")
            return kind

        factories = {
            "async_gen": agen,
            "sync_gen": sgen,
            "async_cm": asynccontextmanager(agen),
            "sync_cm": contextmanager(sgen),
            "func": func,
        }
        res = lc.resource(factories[kind], scope="app", name="thing")
        async with lc.run():
            assert lc.get(res) == kind
            assert events == ["open"]
        assert events == (["open"] if kind == "func" else ["open", "close"])


class TestDependencies:
    async def test_dependencies_resolved_by_parameter_name(self) -> None:
        """A factory receives the values of the resources its parameters name."""
        lc = tether.Lifecycle()

        @lc.resource
        def host() -> str:
            return "db.local"

        @lc.resource
        def port() -> int:
            return 5432

        @lc.resource
        async def dsn(port: int, host: str) -> str:
            return f"{host}:{port}"

        async with lc.scope() as s:
            assert await s.get(dsn) == "db.local:5432"

    async def test_name_renames_the_resource(self) -> None:
        """`name=` is the name dependents use, instead of the function's name."""
        lc = tether.Lifecycle()

        @lc.resource(name="db")
        def make_database_handle() -> str:
            return "handle"

        @lc.resource
        def repo(db: str) -> str:
            return f"repo({db})"

        assert make_database_handle.name == "db"
        assert set(lc.resources) == {"db", "repo"}
        async with lc.scope() as s:
            assert await s.get(repo) == "repo(handle)"

    async def test_parameters_with_defaults_are_configuration(self) -> None:
        """A parameter with a default is not a dependency: its default is used."""
        lc = tether.Lifecycle()

        @lc.resource
        def base() -> str:
            return "base"

        @lc.resource
        def client(base: str, retries: int = 3, *, verbose: bool = False) -> str:
            return f"{base}/{retries}/{verbose}"

        lc.validate()
        async with lc.scope() as s:
            assert await s.get(client) == "base/3/False"

    async def test_shared_dependency_is_one_value(self) -> None:
        """Two dependents of one resource in one unit of work get the very same value."""
        lc = tether.Lifecycle()

        @lc.resource
        def conn() -> object:
            return object()

        @lc.resource
        def users(conn: object) -> object:
            return conn

        @lc.resource
        def orders(conn: object) -> object:
            return conn

        async with lc.scope() as s:
            assert await s.get(users) is await s.get(orders) is await s.get(conn)

    async def test_resource_repr_and_bare_decorator_default_scope(self) -> None:
        """A bare `@lc.resource` makes a request resource named after the function."""
        lc = tether.Lifecycle()

        @lc.resource
        def conn() -> int:
            return 1

        assert isinstance(conn, tether.Resource)
        assert conn.scope == "request"
        assert repr(conn) == "<tether.Resource 'conn' scope='request'>"
