"""A Lifecycle whose second resource never finishes opening (the CLI's ^C test): what it does
is written to the file named by CLI_INTERRUPT_LOG."""

import os
from collections.abc import AsyncIterator

import anyio

import tether

lc = tether.Lifecycle()


def note(text: str) -> None:
    with open(os.environ["CLI_INTERRUPT_LOG"], "a") as log:
        log.write(text + "\n")


@lc.resource(scope="app")
async def first() -> AsyncIterator[str]:
    note("first opened")
    try:
        yield "first"
    finally:
        note("first closed")


@lc.resource(scope="app")
async def second(first: str) -> AsyncIterator[str]:
    note("second opening")
    await anyio.sleep(3600)
    yield "second"
