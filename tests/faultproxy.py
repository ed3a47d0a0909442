"""A TCP proxy on 127.0.0.1 that can cut or blackhole the connections through it.

Put it between an app and a real server to make the network fail the way networks do,
with the server itself still healthy (reliability.md, test 5)::

    with FaultProxy(pg.port) as proxy:
        dsn = pg.dsn_via(proxy.port)    # connect through the proxy
        proxy.blackhole()                # bytes stop flowing both ways; no RST, no FIN
        proxy.restore()                  # they flow again (what was held is delivered)
        proxy.cut()                      # every open connection is reset (RST)
        proxy.latency(0.02)              # each chunk is held 20 ms each way (0: none)
        proxy.linger(1.0)                # a server's close reaches its client 1 s late
        proxy.open_connections           # client connections the proxy still holds

A blackholed connection looks like a peer behind a dead switch: writes succeed (the kernel
buffers them), nothing comes back, and nothing tells the client. New connections made
while blackholed are accepted (it is local) and then hear nothing either, as a connection
whose SYN-ACK got through and then nothing else did.

The proxy runs its own event loop in a daemon thread, so it works under any test client
(sync or async) and keeps forwarding while the test's own loop is blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

__all__ = ["FaultProxy"]

HOST = "127.0.0.1"


class FaultProxy:
    """Forward 127.0.0.1:``port`` (picked free) to 127.0.0.1:*target_port*."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._delay = 0.0  # seconds each chunk is held, each way
        self._linger = 0.0  # seconds a server's close is held before its client's

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> Self:
        started = threading.Event()
        self._thread.start()
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._serve(started)))
        if not started.wait(10):  # pragma: no cover - the loop thread died
            msg = "the fault proxy did not start within 10 s"
            raise RuntimeError(msg)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def blackhole(self) -> None:
        """Stop forwarding, both ways, on every connection, open or new; close nothing."""
        self._call(self._set_flowing(False))

    def restore(self) -> None:
        """Forward again; bytes held while blackholed are delivered."""
        self._call(self._set_flowing(True))

    def latency(self, seconds: float) -> None:
        """Hold each chunk *seconds* before passing it on, both ways (order is kept)."""
        self._delay = seconds

    def linger(self, seconds: float) -> None:
        """Hold the close of a connection the server ended *seconds* before passing it on
        (what it sent before closing is delivered at once): the client reads the server's
        last words, a ``FATAL`` error, well before it learns the connection is gone."""
        self._linger = seconds

    def cut(self) -> None:
        """Reset every open connection (RST to the client, close to the server)."""
        self._call(self._cut())

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    def _call(self, coro: object) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        future.result(10)

    async def _serve(self, started: threading.Event) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()

    async def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self) -> None:
        for pair in list(self._pairs):
            pair.reset()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            pair.reset()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # An aborted transport closes its socket in a callback of the next turn: let those
        # run before the loop stops, or the sockets are left to the garbage collector.
        for _ in range(2):
            await asyncio.sleep(0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        pair = _Pair(client_w, self._pairs.discard)
        self._pairs.add(pair)
        try:
            await self._serve_pair(client_r, client_w, pair)
        except asyncio.CancelledError:
            pass  # stopped with the proxy (asyncio would log a cancelled connection task)
        finally:
            pair.close()

    async def _serve_pair(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        assert self._flowing is not None
        await self._flowing.wait()  # blackholed: the client hears nothing, not even a close
        try:
            server_r, server_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            pair.reset()
            return
        if pair.closed:  # cut (or stopped) while it connected: nothing will close it else
            server_w.transport.abort()
            return
        pair.server_w = server_w
        await asyncio.gather(
            self._pump(client_r, server_w, pair),
            self._pump(server_r, client_w, pair, from_server=True),
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: _Pair,
        *,
        from_server: bool = False,
    ) -> None:
        assert self._flowing is not None
        try:
            while not pair.closed:
                data = await reader.read(65536)
                if not data:
                    if from_server and self._linger:
                        await asyncio.sleep(self._linger)
                    break
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._flowing.wait()
                if pair.closed:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            pair.close()


class _Pair:
    """One client connection and (once connected) its server connection."""

    def __init__(self, client_w: asyncio.StreamWriter, on_close: Callable[[_Pair], None]) -> None:
        self.client_w = client_w
        self.on_close = on_close
        self.server_w: asyncio.StreamWriter | None = None
        self.closed = False

    def reset(self) -> None:
        """Close the client side with RST (SO_LINGER 0), the server side normally."""
        sock = self.client_w.get_extra_info("socket")
        if sock is not None and not self.closed:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_close(self)
        for w in (self.client_w, self.server_w):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.transport.abort()
