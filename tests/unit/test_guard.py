"""`guard=True`: a value used after its scope closed raises ResourceClosedError (a leak)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import tether

pytestmark = pytest.mark.anyio

CLOSED = re.escape(
    "Resource 'conn' was used after its scope closed. Do not keep request resources beyond "
    "their unit of work: background work should open its own `async with lc.scope()`."
)


class Connection:
    def __init__(self) -> None:
        self.dsn = "postgresql://db"
        self.queries: list[str] = []

    def execute(self, sql: str) -> str:
        self.queries.append(sql)
        return f"ran {sql}"

    def __call__(self, sql: str) -> str:
        return self.execute(sql)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def _guarded_lifecycle() -> tuple[tether.Lifecycle, tether.Resource[Any]]:
    lc = tether.Lifecycle()

    @lc.resource(guard=True)
    async def conn() -> AsyncIterator[Connection]:
        yield Connection()

    return lc, conn


class TestGuard:
    async def test_value_works_inside_its_scope(self) -> None:
        """Inside the scope, a guarded value behaves like the value itself."""
        lc, conn = _guarded_lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)
            assert c.dsn == "postgresql://db"
            assert c.execute("SELECT 1") == "ran SELECT 1"
            assert c("SELECT 2") == "ran SELECT 2"
            c.dsn = "changed"
            assert c.dsn == "changed"
            async with c as inner:
                assert isinstance(inner, Connection)
            assert c.queries == ["SELECT 1", "SELECT 2"]
        assert lc.stats().resources["conn"].leaks == 0

    async def test_attribute_access_after_close_raises(self) -> None:
        """Using an attribute of a guarded value after its scope closed raises, counting a leak."""
        lc, conn = _guarded_lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$") as info:
            c.execute("SELECT 1")
        assert info.value.resource == "conn"
        assert lc.stats().resources["conn"].leaks == 1

    async def test_call_after_close_raises(self) -> None:
        """Calling a guarded value after its scope closed raises and counts a leak."""
        lc, conn = _guarded_lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
            c("SELECT 1")
        assert lc.stats().resources["conn"].leaks == 1

    async def test_every_use_after_close_raises_and_the_value_is_one_leak(self) -> None:
        """Each use after close raises again, setting attributes too; the value counts as one
        leak (`tether_resource_leaks_total` counts values: a retry loop on a stale value
        made it count every try)."""
        lc, conn = _guarded_lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
            _ = c.dsn
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
            c.dsn = "x"
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
            async with c:
                pass  # pragma: no cover
        assert lc.stats().resources["conn"].leaks == 1
        async with lc.scope() as s:
            d = await s.get(conn)
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
            _ = d.dsn
        assert lc.stats().resources["conn"].leaks == 2  # another value

    async def test_a_value_held_too_long_then_used_after_close_is_one_leak(self) -> None:
        """Held past the leak threshold (reported, counted), then used after its scope
        closed: still the one value, one leak (it counted two)."""
        lc = tether.Lifecycle(leak_threshold=0.05, sweep_interval=0.02)

        @lc.resource(guard=True)
        async def conn() -> AsyncIterator[Connection]:
            yield Connection()

        async with lc.run():
            async with lc.scope("slow job") as s:
                c = await s.get(conn)
                with anyio.fail_after(5):
                    while not lc.stats().resources["conn"].leaks:
                        await anyio.sleep(0.02)
            with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
                c.execute("SELECT 1")
        assert lc.stats().resources["conn"].leaks == 1

    async def test_guarded_plain_function_value(self) -> None:
        """A guarded value from a plain function (no cleanup) is also closed with its scope."""
        lc = tether.Lifecycle()

        @lc.resource(guard=True)
        def conn() -> Connection:
            return Connection()

        async with lc.scope() as s:
            c = await s.get(conn)
            assert c.execute("x") == "ran x"
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
            c.execute("y")
        stats = lc.stats().resources["conn"]
        assert (stats.opened, stats.closed, stats.leaks) == (1, 1, 1)

    async def test_repr_shows_state(self) -> None:
        """A guarded value's repr tells whether its scope is open or closed."""
        lc, conn = _guarded_lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)
            assert repr(c).startswith("<tether guarded 'conn' (open): <")
        assert repr(c).startswith("<tether guarded 'conn' (closed): <")

    async def test_unguarded_value_is_the_value(self) -> None:
        """Without `guard=True` the value handed out is the factory's own object."""
        lc = tether.Lifecycle()
        made: list[Connection] = []

        @lc.resource
        async def conn() -> AsyncIterator[Connection]:
            made.append(Connection())
            yield made[-1]

        async with lc.scope() as s:
            assert await s.get(conn) is made[0]


class Cache(dict[str, int]):
    """A mapping value (a Redis-like cache, a row): used by item access, `in`, iteration."""

    async def __aiter__(self) -> AsyncIterator[str]:
        for key in list(self):
            yield key


class TestGuardedContainers:
    """Item access, `in` and iteration on a guarded value (leak review #9: `c["k"]` after
    close was a TypeError, "'Guarded' object is not subscriptable", not a
    ResourceClosedError; and inside the scope it did not work at all)."""

    @staticmethod
    def _lifecycle() -> tuple[tether.Lifecycle, tether.Resource[Any]]:
        lc = tether.Lifecycle()

        @lc.resource(guard=True)
        async def conn() -> AsyncIterator[Cache]:
            yield Cache(a=1)

        return lc, conn

    async def test_they_reach_the_value_inside_its_scope(self) -> None:
        lc, conn = self._lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)
            assert c["a"] == 1
            c["b"] = 2
            del c["a"]
            assert "b" in c
            assert "a" not in c
            assert list(c) == ["b"]
            assert [k async for k in c] == ["b"]
            assert c  # truth is the proxy's, as before: not the value's len()
        assert lc.stats().resources["conn"].leaks == 0

    async def test_each_raises_after_the_scope_closed_and_counts_one_leak(self) -> None:
        lc, conn = self._lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)

        async def iterate_async() -> None:
            async for _ in c:
                pass  # pragma: no cover

        def assign() -> None:
            c["k"] = 1

        def delete() -> None:
            del c["k"]

        for use in (lambda: c["k"], assign, delete, lambda: "k" in c, lambda: list(c)):
            with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
                use()
        with pytest.raises(tether.ResourceClosedError, match=rf"^{CLOSED}$"):
            await iterate_async()
        assert lc.stats().resources["conn"].leaks == 1

    async def test_a_value_that_is_no_container_fails_as_it_would_unguarded(self) -> None:
        lc, conn = _guarded_lifecycle()
        async with lc.scope() as s:
            c = await s.get(conn)
            with pytest.raises(TypeError, match="'Connection' object is not subscriptable"):
                c["k"]
            with pytest.raises(TypeError, match="'Connection' object is not iterable"):
                iter(c)
            with pytest.raises(TypeError, match="'Connection' object is not an async iterable"):
                aiter(c)
