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
* A server that cannot be reached (``ConnectError``, ``ConnectTimeout``), or no
  connection free in the pool within the pool timeout (``PoolTimeout``), raises an error
  that is both httpx's (so ``except httpx.ConnectError`` still works) and a
  :class:`~tether.ResourceUnavailable`: left uncaught, the request is answered 503 with
  ``Retry-After``, naming the client and its pool's size, connections in use and waiters.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.httpx needs httpx: pip install 'tether[httpx]'"
    raise ImportError(msg) from exc

from .._errors import ResourceUnavailable
from ._common import Dsn, redact, resolve_dsn, unavailable

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check, Resource

__all__ = ["ConnectUnavailable", "PoolUnavailable", "TimeoutUnavailable", "client"]

log = logging.getLogger("tether")

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class _Unavailable(ResourceUnavailable):
    def __init__(
        self, message: str, *, resource: str, retry_after: float, request: httpx.Request
    ) -> None:
        super().__init__(message, resource=resource, retry_after=retry_after)
        self.request = request


class ConnectUnavailable(_Unavailable, httpx.ConnectError):
    """The server cannot be reached: an ``httpx.ConnectError`` and a ResourceUnavailable."""


class TimeoutUnavailable(_Unavailable, httpx.ConnectTimeout):
    """Connecting timed out: an ``httpx.ConnectTimeout`` and a ResourceUnavailable."""


class PoolUnavailable(_Unavailable, httpx.PoolTimeout):
    """No connection came free in time: an ``httpx.PoolTimeout`` and a ResourceUnavailable."""


class _Transport(httpx.AsyncBaseTransport):
    """httpx's own transport, with its connection failures made ResourceUnavailable."""

    def __init__(self, inner: httpx.AsyncBaseTransport, name: str, limits: httpx.Limits) -> None:
        self.inner = inner
        self.name = name
        self.limits = limits
        self.in_flight = 0  # requests between sending and their response headers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        try:
            return await self.inner.handle_async_request(request)
        except httpx.PoolTimeout as exc:
            raise self._unavailable(PoolUnavailable, request, exc) from exc
        except httpx.ConnectTimeout as exc:
            raise self._unavailable(TimeoutUnavailable, request, exc) from exc
        except httpx.ConnectError as exc:
            raise self._unavailable(ConnectUnavailable, request, exc) from exc
        finally:
            self.in_flight -= 1

    def _unavailable(
        self, cls: type[_Unavailable], request: httpx.Request, exc: Exception
    ) -> _Unavailable:
        size = self.limits.max_connections
        pool = getattr(self.inner, "_pool", None)  # httpcore's pool, if it is one
        in_use: int | None = None
        try:
            in_use = sum(not c.is_idle() for c in pool.connections)  # type: ignore[union-attr]
        except Exception:
            pass
        waiting = max(self.in_flight - (in_use or 0), 0) if in_use is not None else None
        if isinstance(exc, httpx.PoolTimeout):
            reason = "no connection came free within the pool timeout (max_connections reached)"
        else:
            said = str(exc).rstrip(". ") or type(exc).__name__
            target = redact(str(request.url.copy_with(path="/", query=None, fragment=None)))
            reason = f"cannot reach {target}: {type(exc).__name__}: {said}"
        plain = unavailable(
            self.name,
            reason,
            size=size,
            in_use=in_use,
            waiting=waiting,
            backend="the server it calls",
        )
        return cls(str(plain), resource=self.name, retry_after=plain.retry_after, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


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
            ``transport``, ``event_hooks``, ...).
    """

    async def open_client() -> AsyncIterator[httpx.AsyncClient]:
        options = {key: value for key, value in kw.items() if key != "transport"}
        inner: httpx.AsyncBaseTransport | None = kw.get("transport")
        if inner is None:
            inner = httpx.AsyncHTTPTransport(
                limits=limits,
                http2=http2,
                verify=options.pop("verify", True),
                cert=options.pop("cert", None),
                trust_env=options.get("trust_env", True),
            )
        transport = _Transport(inner, name, limits)
        url = resolve_dsn(base_url)
        c = httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport, **options)
        try:
            log.info("tether: httpx client %r open (base_url=%s)", name, redact(url) or "-")
            yield c
        finally:
            await c.aclose()

    return lc.resource(scope="app", name=name, check=_client_check(check, health_url))(open_client)


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
