"""A resource asked for an attribute of its value: code written for the engine or the pool
itself (`metadata.create_all(engine)`, `engine.connect()`, `Session(engine)`), kept after the
engine became a tether resource. It said `'Resource' object has no attribute
'_run_ddl_visitor'`; it now says what the resource is and how to take its value."""

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether


def make() -> tuple[tether.Lifecycle, Any, Any]:
    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def engine() -> AsyncIterator[object]:
        yield object()

    @lc.resource
    async def session(engine: object) -> AsyncIterator[object]:
        yield object()

    return lc, engine, session


def test_an_attribute_of_the_value_asked_of_an_app_resource() -> None:
    _, engine, _ = make()
    with pytest.raises(AttributeError) as caught:
        engine.connect()
    assert str(caught.value) == (
        "tether.Resource 'engine' has no attribute 'connect': it declares the value and opens "
        "it, and is not the value itself. Take the value with lc.get(engine) while the app "
        "runs (in a script or job, inside `async with lc.run():`), or Depends(engine) in a "
        "route."
    )


def test_an_attribute_of_the_value_asked_of_a_request_resource() -> None:
    _, _, session = make()
    with pytest.raises(AttributeError) as caught:
        session._run_ddl_visitor  # noqa: B018
    assert str(caught.value) == (
        "tether.Resource 'session' has no attribute '_run_ddl_visitor': it declares the value "
        "and opens it, and is not the value itself. Take the value with Depends(session) in a "
        "route, or `await unit.get(session)` inside `async with lc.scope() as unit:` "
        "elsewhere."
    )


def test_probes_for_attributes_still_find_none() -> None:
    """hasattr and getattr with a default, as libraries probe a callable, and copying: as
    before."""
    _, engine, _ = make()
    assert not hasattr(engine, "connect")
    assert getattr(engine, "_is_coroutine", None) is None
    assert getattr(engine, "__wrapped__", "none") == "none"
    assert copy.copy(engine).name == "engine"
