"""A Lifecycle whose resources depend on each other, for the CLI tests."""

import tether

lc = tether.Lifecycle()


@lc.resource(scope="app")
def a(b: str) -> str:
    return "a"  # pragma: no cover


@lc.resource(scope="app")
def b(a: str) -> str:
    return "b"  # pragma: no cover
