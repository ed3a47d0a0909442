"""`lc.override(resource, value_or_factory)`: replace a resource for tests, restore it exactly."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import tether

from ._messages import cycle

pytestmark = pytest.mark.anyio


REFUSED_WHILE_RUNNING = (
    "lc.override() of app resource 'pool' while the app runs: {what} needs opening (an async "
    "function, a generator, a context manager, or a factory of other resources), which only "
    "the app's start does. Override it before the app starts (before `with TestClient(app)`, "
    "or the fixture that runs the app), or give a value, or a plain function of no resources."
)


class App:
    """A small graph: settings -> pool (app), conn (request) -> repo (request)."""

    def __init__(self) -> None:
        self.lc = lc = tether.Lifecycle()
        self.events: list[str] = []
        events = self.events

        @lc.resource(scope="app")
        def settings() -> str:
            return "real-settings"

        @lc.resource(scope="app")
        async def pool(settings: str) -> AsyncIterator[str]:
            events.append("open real pool")
            yield f"pool({settings})"
            events.append("close real pool")

        @lc.resource(scope="app")
        def cache(pool: str) -> str:
            return f"cache({pool})"

        @lc.resource
        async def conn(pool: str) -> AsyncIterator[str]:
            events.append("open real conn")
            yield f"conn({pool})"
            events.append("close real conn")

        @lc.resource
        def repo(conn: str) -> str:
            return f"repo({conn})"

        self.settings, self.pool, self.cache = settings, pool, cache
        self.conn, self.repo = conn, repo

    async def request(self, res: tether.Resource[str]) -> str:
        async with self.lc.scope() as s:
            return await s.get(res)


class TestRequestOverrides:
    async def test_override_as_context_manager(self) -> None:
        """Inside `with lc.override(conn, value)` dependents get the value; after, the real one."""
        app = App()
        async with app.lc.run():
            with app.lc.override(app.conn, "fake-conn") as ov:
                assert isinstance(ov, tether.Override)
                assert await app.request(app.repo) == "repo(fake-conn)"
                assert "open real conn" not in app.events
            assert await app.request(app.repo) == "repo(conn(pool(real-settings)))"
        assert app.events.count("open real conn") == 1

    async def test_override_as_plain_call_with_undo(self) -> None:
        """`lc.override(...)` returns an object whose `undo()` restores the resource."""
        app = App()
        async with app.lc.run():
            ov = app.lc.override(app.conn, "fake-conn")
            assert await app.request(app.repo) == "repo(fake-conn)"
            ov.undo()
            ov.undo()
            assert await app.request(app.repo) == "repo(conn(pool(real-settings)))"

    async def test_factory_override_gets_dependencies_by_name(self) -> None:
        """A function override is a factory: its parameters name the resources it depends on."""
        app = App()
        events: list[str] = []

        async def fake_conn(settings: str) -> AsyncIterator[str]:
            events.append("open fake")
            yield f"fake-conn({settings})"
            events.append("close fake")

        async with app.lc.run():
            with app.lc.override(app.conn, fake_conn):
                assert await app.request(app.repo) == "repo(fake-conn(real-settings))"
        assert events == ["open fake", "close fake"]

    async def test_nested_overrides_restore_in_turn(self) -> None:
        """Undoing an inner override of a resource restores the outer one, then the original."""
        app = App()
        async with app.lc.run():
            with app.lc.override(app.conn, "outer"):
                with app.lc.override(app.conn, lambda: "inner"):
                    assert await app.request(app.repo) == "repo(inner)"
                assert await app.request(app.repo) == "repo(outer)"
            assert await app.request(app.repo) == "repo(conn(pool(real-settings)))"

    async def test_override_keeps_counting_for_the_target(self) -> None:
        """An override's opens count in the overridden resource's stats."""
        app = App()
        async with app.lc.run():
            with app.lc.override(app.conn, "fake"):
                await app.request(app.repo)
        stats = app.lc.stats().resources["conn"]
        assert (stats.opened, stats.closed) == (1, 1)


class TestAppOverrides:
    async def test_override_before_run_changes_app_and_request_dependents(self) -> None:
        """Overriding an app resource before `lc.run()` changes what all its dependents get."""
        app = App()
        with app.lc.override(app.pool, "fake-pool"):
            async with app.lc.run():
                assert app.lc.get(app.pool) == "fake-pool"
                assert app.lc.get(app.cache) == "cache(fake-pool)"
                assert await app.request(app.repo) == "repo(conn(fake-pool))"
                async with app.lc.scope() as s:
                    assert await s.get(app.pool) == "fake-pool"
        assert "open real pool" not in app.events
        async with app.lc.run():
            assert app.lc.get(app.pool) == "pool(real-settings)"
            assert app.lc.get(app.cache) == "cache(pool(real-settings))"
            assert await app.request(app.repo) == "repo(conn(pool(real-settings)))"
        assert app.events == [
            "open real conn",
            "close real conn",
            "open real pool",
            "open real conn",
            "close real conn",
            "close real pool",
        ]

    async def test_generator_override_of_app_resource_is_opened_and_closed(self) -> None:
        """A generator override of an app resource opens at startup and closes at shutdown."""
        app = App()
        events: list[str] = []

        def fake_pool(settings: str) -> Iterator[str]:
            events.append("open fake pool")
            yield f"fake-pool({settings})"
            events.append("close fake pool")

        ov = app.lc.override(app.pool, fake_pool)
        try:
            async with app.lc.run():
                assert app.lc.get(app.cache) == "cache(fake-pool(real-settings))"
                assert events == ["open fake pool"]
        finally:
            ov.undo()
        assert events == ["open fake pool", "close fake pool"]
        async with app.lc.run():
            assert app.lc.get(app.cache) == "cache(pool(real-settings))"

    async def test_app_override_with_other_dependencies(self) -> None:
        """An app override may depend on resources the original did not; they open first."""
        lc = tether.Lifecycle()

        @lc.resource(scope="app")
        def pool() -> str:
            return "real-pool"

        @lc.resource(scope="app")
        async def fixture_db() -> AsyncIterator[str]:
            await anyio.sleep(0.02)
            yield "fixture-db"

        @lc.resource(scope="app")
        def cache(pool: str) -> str:
            return f"cache({pool})"

        def fake_pool(fixture_db: str) -> str:
            return f"fake-pool({fixture_db})"

        with lc.override(pool, fake_pool):
            async with lc.run():
                assert lc.get(cache) == "cache(fake-pool(fixture-db))"

    async def test_value_override_of_app_resource_while_running(self) -> None:
        """A plain value may override an app resource while the app runs; requests see it."""
        app = App()
        async with app.lc.run():
            with app.lc.override(app.pool, "live-fake"):
                assert await app.request(app.repo) == "repo(conn(live-fake))"
            assert await app.request(app.repo) == "repo(conn(pool(real-settings)))"

    async def test_an_app_override_while_running_names_what_keeps_the_old_value(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """App resources built from the overridden one at startup keep what they were built
        with: a warning names them and the fix (before, nothing said so)."""
        app = App()
        async with app.lc.run():
            with caplog.at_level("WARNING", logger="tether"):
                with app.lc.override(app.settings, "late"):
                    assert app.lc.get(app.settings) == "late"
                    assert app.lc.get(app.cache) == "cache(pool(real-settings))"
        warnings = [r.getMessage() for r in caplog.records if "overridden while" in r.getMessage()]
        assert warnings == [
            "tether: app resource 'settings' overridden while the app runs: 'cache', 'pool', "
            "opened at startup from its value, keep that value (the override reaches request "
            "resources and what asks for 'settings' itself). Override app resources before "
            "the app starts."
        ]

    async def test_generator_override_of_app_resource_while_running_is_refused(self) -> None:
        """A factory that needs opening cannot override an app resource once the app runs."""
        app = App()

        async def fake_pool() -> AsyncIterator[str]:
            yield "never"  # pragma: no cover

        expected = re.escape(REFUSED_WHILE_RUNNING.format(what=fake_pool.__qualname__))
        async with app.lc.run():
            # Refused where the override is made (it was accepted, and every use failed).
            with pytest.raises(tether.ScopeError, match=rf"^{expected}$"):
                app.lc.override(app.pool, fake_pool)
            assert await app.request(app.conn) == "conn(pool(real-settings))"

    async def test_async_function_override_of_app_resource_while_running_is_refused(
        self,
    ) -> None:
        """An `async def` returns its value only once awaited, as the app scope opens it:
        while the app runs it is refused like a generator (before, every user of it got an
        un-awaited coroutine as the value)."""
        app = App()

        async def fake_pool() -> str:
            return "never"  # pragma: no cover

        expected = re.escape(REFUSED_WHILE_RUNNING.format(what=fake_pool.__qualname__))
        async with app.lc.run():
            with pytest.raises(tether.ScopeError, match=rf"^{expected}$"):
                app.lc.override(app.pool, fake_pool)
            assert app.lc.get(app.pool) == "pool(real-settings)"

    async def test_an_override_made_before_start_and_undone_while_running_says_so(
        self,
    ) -> None:
        """The override stood in for the app resource when the app started, so the resource
        itself was never opened: once it is undone, the error says that, not that the
        resource is overridden."""
        app = App()
        override = app.lc.override(app.pool, "fake")
        async with app.lc.run():
            assert app.lc.get(app.pool) == "fake"
            override.undo()
            with pytest.raises(tether.ScopeError) as info:
                app.lc.get(app.pool)
        assert str(info.value) == (
            "App resource 'pool' was not opened when the app scope started (an override stood "
            "in for it then, undone since): it opens when the app scope next starts. Undo an "
            "override of an app resource after the app stops."
        )


class TestOverrideErrors:
    def test_override_of_foreign_object(self) -> None:
        """Overriding something that is not a resource of this Lifecycle raises TypeError."""
        app, other = App(), App()
        expected = re.escape(
            f"{other.conn!r} is not a resource of this Lifecycle. Pass the object returned "
            f"by @lc.resource on this Lifecycle."
        )
        with pytest.raises(TypeError, match=rf"^{expected}$"):
            app.lc.override(other.conn, "x")

    async def test_override_factory_with_unknown_parameter(self) -> None:
        """A factory override naming no resource is refused at once, and nothing is replaced."""
        app = App()

        def fake_conn(pol: str) -> str:
            return pol  # pragma: no cover

        with pytest.raises(tether.UnknownResourceError) as caught:
            app.lc.override(app.conn, fake_conn)
        # The override's factory is named: 'conn' itself has no such parameter.
        assert str(caught.value) == (
            "lc.override() of resource 'conn': the override's factory "
            "TestOverrideErrors.test_override_factory_with_unknown_parameter.<locals>."
            "fake_conn() has a parameter 'pol' that names no resource. Did you mean 'pool'? "
            "Parameters of a factory name the resources it depends on (registered: cache, "
            "conn, pool, repo, settings): rename the parameter, or give it a default to make "
            "it plain configuration."
        )
        assert caught.value.name == "pol"
        async with app.lc.run():
            assert await app.request(app.repo) == "repo(conn(pool(real-settings)))"

    async def test_override_that_makes_a_cycle(self) -> None:
        """An override depending on its own dependents is a cycle, refused before anything opens."""
        app = App()

        def fake_pool(cache: str) -> str:
            return cache  # pragma: no cover

        with pytest.raises(
            tether.DependencyCycleError,
            match=cycle("pool", "cache", "pool"),
        ):
            app.lc.override(app.pool, fake_pool)
        async with app.lc.run():
            assert app.lc.get(app.cache) == "cache(pool(real-settings))"


def test_an_override_breaking_the_scope_rules_is_named() -> None:
    """The declaration was blamed ("Make 'conn' an app resource, or make 'pool' a request
    resource"), where the override was wrong (trial 16)."""
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def pool() -> int:
        return 1

    @lc.resource
    def conn(pool: int) -> int:
        return 2

    def fake_pool(conn: int) -> int:
        return 5

    with pytest.raises(tether.ScopeError) as refused:
        lc.override(pool, fake_pool)
    assert str(refused.value) == (
        "lc.override() of app resource 'pool': the override's factory "
        "test_an_override_breaking_the_scope_rules_is_named.<locals>.fake_pool() depends on "
        "request resource 'conn', which an app resource, living for the whole application, "
        "cannot hold. Give the override a value, or a factory of app resources only."
    )
    assert not lc._overrides  # nothing left in place


async def test_an_override_by_another_resource_gives_that_resources_value() -> None:
    """`lc.override(replica_session, session)`: the replica's users get the primary's value,
    opened once per unit and closed by tether. The Resource object itself was the value
    before, and the route failed at its first use (trial 21)."""
    lc = tether.Lifecycle()
    events: list[str] = []

    @lc.resource
    async def primary() -> AsyncIterator[str]:
        events.append("open primary")
        yield "primary"
        events.append("close primary")

    @lc.resource
    def replica() -> str:
        return "replica"

    @lc.resource
    def report(replica: str) -> str:
        return f"report({replica})"

    async with lc.run():
        with lc.override(replica, primary):
            async with lc.scope() as unit:
                assert await unit.get(replica) == "primary"
                assert await unit.get(report) == "report(primary)"
                assert await unit.get(primary) == "primary"
        async with lc.scope() as unit:
            assert await unit.get(replica) == "replica"
    assert events == ["open primary", "close primary"]  # once, shared with its own users


def test_an_override_by_itself_or_by_another_lifecycles_resource_is_refused() -> None:
    lc, other = tether.Lifecycle(), tether.Lifecycle()

    @lc.resource
    def session() -> str:
        return "s"

    @other.resource
    def elsewhere() -> str:
        return "e"

    with pytest.raises(TypeError) as caught:
        lc.override(session, session)
    assert str(caught.value) == "lc.override(session, session): a resource overridden by itself."
    with pytest.raises(TypeError) as caught:
        lc.override(session, elsewhere)
    assert str(caught.value) == (
        "lc.override(session, elsewhere): 'elsewhere' is a resource of another Lifecycle. "
        "Override with a resource of this one, or with a factory."
    )
