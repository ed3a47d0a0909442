"""httpx with tether: one ``AsyncClient`` (and its connection pool) for the app.

::

    from typing import Annotated

    import httpx
    from fastapi import Depends, FastAPI

    import tether
    from tether.integrations import httpx as thttpx

    lc = tether.Lifecycle()
    weather = thttpx.client(
        lc, name="weather", base_url="https://api.example.com", health_url="/health"
    )

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/forecast")
    async def forecast(w: Annotated[httpx.AsyncClient, Depends(weather)]) -> dict:
        return (await w.get("/forecast")).json()

* :func:`client` is an app resource: an ``httpx.AsyncClient`` with explicit limits and
  timeouts, made when the app starts (never at import), shared by every request, closed
  (``aclose()``) at shutdown.
* Its check confirms the client is open and, given ``health_url``, that a ``GET`` of it
  answers 2xx.
* Its requests, straight or through a proxy (``proxy=``, or ``HTTP_PROXY``,
  ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` when ``trust_env``), go through httpx's
  own transport with the client's ``limits``, ``verify``, ``cert`` and ``http2``.
* A server (or proxy) that cannot be reached (``ConnectError``, ``ConnectTimeout``), or no
  connection free in the pool within the pool timeout (``PoolTimeout``, counted in the
  resource's ``timeouts``), raises an error
  that is both httpx's (so ``except httpx.ConnectError`` still works) and a
  :class:`~tether.ResourceUnavailable`: left uncaught, the request is answered 503 with
  ``Retry-After``, naming the client and its pool's size, connections in use and waiters.
* A streamed response (``client.send(..., stream=True)``, ``client.stream(...)``) opened in
  a unit of work (a request, ``lc.scope()``) and still open when the unit ends (after the
  response's last byte, so a body streamed to the client is read first) is closed by
  tether, its connection back in the pool, with a warning naming the unit, the URL and
  where it was opened, and counted in the resource's ``leaks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.httpx needs httpx: pip install 'tether[httpx]'"
    raise ImportError(msg) from exc

from .._errors import ClientDisconnected, ResourceUnavailable, check_bool, check_number
from .._resource import Resource, current_unit
from .._stats import PoolStats
from ._common import Dsn, check_dsn_value, redact, resolve_dsn, saturation, unavailable

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check
    from .._scope import Unit

__all__ = ["ConnectUnavailable", "PoolUnavailable", "TimeoutUnavailable", "client"]

log = logging.getLogger("tether")

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class _Unavailable(ResourceUnavailable):
    def __init__(
        self,
        message: str,
        *,
        resource: str,
        retry_after: float,
        request: httpx.Request,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message, resource=resource, retry_after=retry_after, timed_out=timed_out)
        self.request = request


class ConnectUnavailable(_Unavailable, httpx.ConnectError):
    """The server cannot be reached: an ``httpx.ConnectError`` and a ResourceUnavailable."""


class TimeoutUnavailable(_Unavailable, httpx.ConnectTimeout):
    """Connecting timed out: an ``httpx.ConnectTimeout`` and a ResourceUnavailable."""


class PoolUnavailable(_Unavailable, httpx.PoolTimeout):
    """No connection came free in time: an ``httpx.PoolTimeout`` and a ResourceUnavailable."""


class _Transport(httpx.AsyncBaseTransport):
    """httpx's own transport, with its connection failures made ResourceUnavailable."""

    def __init__(self, inner: httpx.AsyncBaseTransport, name: str, via: str | None = None) -> None:
        self.inner = inner
        self.name = name
        self.via = via  # the proxy it goes through, if any
        self.resource: Resource[Any] | None = None  # its counters count the pool's timeouts
        self.served = time.monotonic()  # when a request last got its response (readiness)
        self.timed_out_at = -math.inf  # when a request's wait for a connection timed out

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.inner.handle_async_request(request)
            self.served = time.monotonic()
            return response
        except httpx.PoolTimeout as exc:
            self.timed_out_at = time.monotonic()
            if self.resource is not None:  # db.client.connection.timeouts
                self.resource.counters.timeouts += 1
            raise self._unavailable(PoolUnavailable, request, exc) from exc
        except httpx.ConnectTimeout as exc:
            raise self._unavailable(TimeoutUnavailable, request, exc) from exc
        except httpx.ConnectError as exc:
            raise self._unavailable(ConnectUnavailable, request, exc) from exc

    def _figures(self, waited: bool) -> tuple[int | None, int | None, int | None]:
        """Size, connections in use and requests waiting, read from the transport's pool
        (httpcore's, in httpx's own transport); ``None`` where there is no such pool.
        *waited*: the failing request waited for a connection, and counts as waiting (the
        pool has already taken it off its queue)."""
        pool = getattr(self.inner, "_pool", None)
        try:
            most = pool._max_connections  # type: ignore[union-attr]
            size = most if isinstance(most, int) and most < sys.maxsize else None
        except Exception:
            size = None
        try:
            # Busy: a request on it, or a response being read (streamed) from it.
            in_use = sum(not c.is_idle() for c in pool.connections)  # type: ignore[union-attr]
        except Exception:
            in_use = None
        try:
            queued = sum(r.is_queued() for r in pool._requests)  # type: ignore[union-attr]
            waiting: int | None = queued + waited
        except Exception:
            waiting = None
        return size, in_use, waiting

    def figures(self) -> tuple[int | None, int | None, int | None]:
        """Size, connections in use and requests waiting, now."""
        return self._figures(False)

    def _unavailable(
        self, cls: type[_Unavailable], request: httpx.Request, exc: Exception
    ) -> _Unavailable:
        timed_out = isinstance(exc, httpx.PoolTimeout)
        size, in_use, waiting = self._figures(timed_out)
        if timed_out:
            reason = "no connection came free within the pool timeout (max_connections reached)"
        else:
            said = str(exc).rstrip(". ") or type(exc).__name__
            target = redact(str(request.url.copy_with(path="/", query=None, fragment=None)))
            through = f" through the proxy {redact(self.via)}" if self.via else ""
            reason = f"cannot reach {target}{through}: {type(exc).__name__}: {said}"
        plain = unavailable(
            self.name,
            reason,
            size=size,
            in_use=in_use,
            waiting=waiting,
            backend="the server it calls",
            unreachable=not timed_out,
        )
        return cls(
            str(plain), resource=self.name, retry_after=plain.retry_after, request=request,
            timed_out=timed_out,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self.inner.aclose()


_HTTPX_DIR = os.path.dirname(httpx.__file__)
_SKIPPED = (__file__, contextlib.__file__)  # and httpx: where `client.stream()` passes


def _opener() -> str:
    """Where a streamed request was sent from: the first frame outside httpx, contextlib
    and this module (cheap: only streamed requests ask)."""
    f: Any = sys._getframe(2)
    while f is not None:
        filename = f.f_code.co_filename
        if not filename.startswith(_HTTPX_DIR) and filename not in _SKIPPED:
            return f"{filename}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back
    return "?"  # pragma: no cover - there is always a caller


class _Streams:
    """The streamed responses opened in one unit of work, closed at its end if still open."""

    __slots__ = ("label", "open")

    def __init__(self) -> None:
        self.label = "the unit of work"
        self.open: list[tuple[httpx.Response, str]] = []

    def add(self, response: httpx.Response, where: str) -> None:
        opened = self.open
        if len(opened) >= 16:  # a long unit (a WebSocket) streaming many: forget the closed
            opened[:] = [pair for pair in opened if not pair[0].is_closed]
        opened.append((response, where))

    async def close(self, res: Resource[Any], failure: BaseException | None) -> None:
        opened, self.open = self.open, []
        for response, where in opened:
            if response.is_closed:
                continue
            try:
                await response.aclose()
            except Exception as exc:  # the connection is dropped by httpcore either way
                log.debug("tether: closing a streamed response failed: %r", exc)
            request = response.request
            # Without its query: a token, an API key or a signature travels there.
            shown = request.url.copy_with(query=None, fragment=None)
            what = f"{request.method} {redact(str(shown))}"
            if isinstance(failure, ClientDisconnected):
                # A body streamed to a client that went away: nothing to fix in the code.
                log.info(
                    "tether: %s ended (the client went away) with a streamed response of "
                    "httpx client %r still open (%s): tether closed it.",
                    self.label, res.name, what,
                )  # fmt: skip
                continue
            res.counters.leaks += 1
            log.warning(
                "tether: %s ended with a streamed response of httpx client %r still open "
                "(%s, opened at %s): tether closed it, so its connection went back to the "
                "pool. Read it within `async with client.stream(...)`, or close it: "
                "`await response.aclose()`.",
                self.label, res.name, what, where,
            )  # fmt: skip


def _unit_now(lc: Lifecycle) -> Unit | None:
    """The unit of work this code runs in: the request's (in the context), or the
    ``lc.scope()`` this task entered; ``None`` outside any."""
    ref = current_unit.get()
    unit = ref() if ref is not None else None
    if unit is not None and unit.lc is lc:
        return None if unit.closed else unit
    tasks = lc._unit_tasks  # the tasks of `lc.scope()`s, on asyncio
    if tasks:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # pragma: no cover - not on asyncio
            return None
        for unit, its in list(tasks.items()):
            if its is task and not unit.closed:
                return unit
    return None


class _Client(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose streamed responses are closed, if forgotten, when
    the unit of work that opened them ends."""

    _tether: tuple[Lifecycle, Resource[_Streams]]

    def send(
        self, request: httpx.Request, *, stream: bool = False, **kw: Any
    ) -> Coroutine[Any, Any, httpx.Response]:
        if not stream:
            return super().send(request, **kw)  # httpx's own coroutine: no frame of ours awaited
        return self._send_streamed(request, kw)

    async def _send_streamed(self, request: httpx.Request, kw: dict[str, Any]) -> httpx.Response:
        lc, streams_res = self._tether
        unit = _unit_now(lc)
        if unit is None:
            return await super().send(request, stream=True, **kw)
        streams = await unit.get(streams_res)
        streams.label = unit.label
        response = await super().send(request, stream=True, **kw)
        streams.add(response, _opener())
        return response


def client(
    lc: Lifecycle,
    *,
    name: str = "http",
    base_url: Dsn = "",
    timeout: float | httpx.Timeout = 10.0,
    limits: httpx.Limits = DEFAULT_LIMITS,
    health_url: str | None = None,
    check: Check | bool = True,
    http2: bool = False,
    **kw: Any,
) -> Resource[httpx.AsyncClient]:
    """Register an ``httpx.AsyncClient`` as an app resource of *lc*; return the resource.

    Args:
        base_url: prefixed to relative request URLs; a string, or a function returning it
            (called when the app starts, so settings can be read then, not at import).
        timeout: seconds for each of connect, read, write and the pool wait (a number),
            or an ``httpx.Timeout``.
        limits: the pool: ``max_connections`` (its size), ``max_keepalive_connections``,
            ``keepalive_expiry``.
        health_url: a URL (relative to *base_url*) the check GETs, expecting 2xx.
        check: ``True``: the client is open (and *health_url* answers, if given);
            ``False``: no check; or a function given the client.
        http2: use HTTP/2 where the server offers it (needs ``httpx[http2]``).
        kw: passed to ``httpx.AsyncClient`` (``headers``, ``auth``, ``verify``, ``cert``,
            ``proxy``, ``mounts``, ``trust_env``, ``transport``, ``event_hooks``, ...).
            Without ``transport``, the proxies (``proxy``, or the environment's) get
            transports like the direct one: the same settings, and 503s.
    """

    where = f"HTTP client {name!r}"
    given: object = base_url  # checked as what a caller may pass
    if given is None:
        msg = (
            f"{where}: base_url is None: is the setting it is read from (an environment "
            f'variable) set? Pass the URL, e.g. base_url="https://api.example.com", or a '
            f"function returning it, or leave base_url out for absolute request URLs."
        )
        raise ValueError(msg)
    if not callable(given) and not isinstance(given, httpx.URL) and given != "":
        check_dsn_value(given, where, what="base_url", example='"https://api.example.com"')
    if not isinstance(timeout, httpx.Timeout):
        check_number(timeout, "timeout", where, above=True, none=True, example="10")
    check_bool(http2, "http2", where)
    for option in ("trust_env", "follow_redirects"):  # httpx's on/off options
        if option in kw:
            check_bool(kw[option], option, where)

    async def open_client() -> AsyncIterator[httpx.AsyncClient]:
        options = dict(kw)
        given: httpx.AsyncBaseTransport | None = options.pop("transport", None)
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        if given is None:
            # httpx's own transports, for the direct route and for each proxy (proxy=, or
            # HTTP(S)_PROXY / ALL_PROXY / NO_PROXY when trust_env), built as httpx builds
            # them but with tether's settings and 503 errors.
            settings: dict[str, Any] = {
                "limits": limits,
                "http2": http2,
                "verify": options.pop("verify", True),
                "cert": options.pop("cert", None),
                "trust_env": options.get("trust_env", True),
            }
            for key, proxy in _proxies(options, settings["trust_env"]).items():
                mounts[key] = None if proxy is None else wrapped(proxy=proxy, **settings)
            transport = wrapped(**settings)
        else:
            transport = _Transport(given, name)
            transport.resource = res
        mounts.update(options.pop("mounts", None) or {})  # the user's own, as httpx does
        url = resolve_dsn(
            base_url, where, what="base_url", example="https://...", empty=True,
            objects=(httpx.URL,),
        )  # fmt: skip
        c = _Client(base_url=url, timeout=timeout, transport=transport, mounts=mounts, **options)
        c._tether = (lc, streams)
        _transports[c] = transport
        try:
            base = str(httpx.URL(url).copy_with(query=None, fragment=None)) if url else ""
            log.info("tether: httpx client %r open (base_url=%s)", name, redact(base) or "-")
            yield c
        finally:
            await c.aclose()

    def wrapped(proxy: httpx.Proxy | None = None, **settings: Any) -> _Transport:
        via = None if proxy is None else str(proxy.url)
        transport = _Transport(httpx.AsyncHTTPTransport(proxy=proxy, **settings), name, via)
        transport.resource = res
        return transport

    res: Resource[httpx.AsyncClient] = lc.resource(
        scope="app", name=name, check=_client_check(check, health_url)
    )(open_client)
    res.pool_stats = lambda c: _pool_stats(name, c)
    res.counts_waits = True

    async def open_streams() -> AsyncIterator[_Streams]:
        opened = _Streams()
        failure: BaseException | None = None
        try:
            yield opened
        except BaseException as exc:
            failure = exc
            raise
        finally:
            await opened.close(res, failure)

    # The streamed responses of a unit of work: a request resource of its own, not
    # registered (it is no resource of the app's), released after the response's last byte
    # (a body streamed from it to the client is read by then), in the unit tether runs.
    streams: Resource[_Streams] = Resource(
        lc, open_streams, name=f"{name} streamed responses", scope="request", check=None,
        timeout=None, release="response", retries=0, backoff=0.0, concurrency=None,
        thread=False, check_timeout=lc.check_timeout, retry_after=1.0, guard=False,
    )  # fmt: skip
    # Readiness reads a full pool instead of queueing the health_url GET behind the traffic
    # (it would fail its timeout while the server answers everyone else).
    within = timeout.pool if isinstance(timeout, httpx.Timeout) else timeout
    res.saturation = lambda c: saturation(
        _pool_stats(name, c),
        _transports[c].served,
        within,
        "the pool timeout",
        timed_out_at=_transports[c].timed_out_at,
        holders="the requests holding them",
        backend="the server it calls",
    )
    return res


#: The transport of each client tether opened (the direct route's): its pool's figures.
_transports: weakref.WeakKeyDictionary[httpx.AsyncClient, _Transport] = weakref.WeakKeyDictionary()


def _pool_stats(name: str, c: httpx.AsyncClient) -> PoolStats:
    """The client's connection pool (httpcore's, on the direct route): its size, the
    connections open, busy (a request on it, or a response still being read) and idle,
    and the requests waiting for one; ``None`` where the transport has no such pool."""
    transport = _transports.get(c)
    size, in_use, waiting = (None, None, None) if transport is None else transport.figures()
    pool = getattr(getattr(transport, "inner", None), "_pool", None)
    try:
        opened: int | None = len(pool.connections)  # type: ignore[union-attr]
    except Exception:
        opened = None
    idle = opened - in_use if opened is not None and in_use is not None else None
    return PoolStats(name=name, max=size, open=opened, in_use=in_use, idle=idle, waiting=waiting)


def _proxies(options: dict[str, Any], trust_env: bool) -> dict[str, httpx.Proxy | None]:
    """The proxies httpx would route through, by URL pattern (``None``: straight there),
    taking ``proxy`` (and httpx < 0.28's ``proxies``) out of *options*."""
    proxy = options.pop("proxy", None)
    if proxy is None:
        proxy = options.pop("proxies", None)
    if proxy is None:
        if not trust_env:
            return {}
        try:
            from httpx._utils import get_environment_proxies  # what httpx itself reads
        except ImportError:  # pragma: no cover - an httpx that moved it
            log.warning("tether: cannot read this httpx's proxy settings from the environment")
            return {}
        return {
            key: None if url is None else httpx.Proxy(url=url)
            for key, url in get_environment_proxies().items()
        }
    if isinstance(proxy, dict):  # httpx < 0.28: proxies={pattern: proxy}
        return {str(key): None if value is None else _proxy(value) for key, value in proxy.items()}
    return {"all://": _proxy(proxy)}


def _proxy(value: Any) -> httpx.Proxy:
    return value if isinstance(value, httpx.Proxy) else httpx.Proxy(url=value)


def _client_check(check: Check | bool, health_url: str | None) -> Check | None:
    if check is False:
        return None
    if check is not True:
        return check

    async def is_open(c: httpx.AsyncClient) -> None:
        if c.is_closed:
            msg = "the client is closed"
            raise RuntimeError(msg)
        if health_url is not None:
            response = await c.get(health_url)
            response.raise_for_status()

    return is_open
