"""A Lifecycle whose names and messages a terminal's encoding may not hold (the CLI tests)."""

import tether

lc = tether.Lifecycle()


def refuse(value: str) -> None:
    raise ConnectionError("refused — try again later")


@lc.resource(scope="app", check=refuse)
def café() -> str:
    return "café"
