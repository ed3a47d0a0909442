"""A connection attempt whose waiter is cancelled: the connection it still makes is closed.

psycopg and aiosqlite make their connection where a cancellation does not reach, and drop
it unclosed when the task waiting for it is cancelled; the integrations connect through
`connect_or_close` (the drivers' own cases run in tests/integration, against real servers,
and the whole suite on Python 3.13, which reports an unclosed sqlite3 connection).
"""

import asyncio

import pytest

from tether.integrations._common import connect_or_close

pytestmark = pytest.mark.anyio


class Conn:
    def __init__(self) -> None:
        self.closed = False


async def test_a_connection_made_after_the_wait_was_cancelled_is_closed() -> None:
    """The cancellation is raised at once; the connection made afterwards is closed."""
    made = asyncio.Event()
    proceed = asyncio.Event()
    conns: list[Conn] = []

    async def connecting() -> Conn:
        made.set()
        await proceed.wait()  # the driver's own work, which a cancellation does not stop
        conns.append(Conn())
        return conns[-1]

    async def close(conn: Conn) -> None:
        await asyncio.sleep(0)
        conn.closed = True

    waiter = asyncio.ensure_future(connect_or_close(connecting(), close))
    await made.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert conns == []  # raised before the attempt was over
    proceed.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(conns) == 1
    assert conns[0].closed


async def test_a_connection_made_in_time_is_handed_over_open() -> None:
    conn = Conn()

    async def connecting() -> Conn:
        await asyncio.sleep(0)
        return conn

    assert await connect_or_close(connecting(), lambda c: setattr(c, "closed", True)) is conn
    assert not conn.closed


async def test_a_failed_attempt_raises_its_own_error() -> None:
    async def connecting() -> Conn:
        await asyncio.sleep(0)
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(ConnectionRefusedError, match="connection refused"):
        await connect_or_close(connecting(), lambda c: None)
