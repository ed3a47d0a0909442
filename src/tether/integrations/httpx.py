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
  ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` when ``trust_env`` and no
  ``transport=``), go through httpx's own transport with the client's ``limits``,
  ``verify``, ``cert``, ``http1`` and ``http2`` (or through ``transport=``, or a transport
  given in ``mounts=``).
* A server (or proxy) that cannot be reached (``ConnectError``, ``ConnectTimeout``), or no
  connection free in the pool within the pool timeout (``PoolTimeout``, counted in the
  resource's ``timeouts``), on any of those routes, raises an error
  that is both httpx's (so ``except httpx.ConnectError`` still works) and a
  :class:`~tether.ResourceUnavailable`: left uncaught, the request is answered 503 with
  ``Retry-After``, naming the client and its pool's size, connections in use and waiters.
  A TLS handshake that fails on the settings (a certificate not trusted, a host name
  mismatch) is no 503: an ``httpx.ConnectError`` naming ``verify=`` and ``cert=``.
* Its figures (``lc.stats().pools``) and readiness read the pool of the route its
  ``health_url`` (else its ``base_url``) takes, direct or through a proxy; with neither,
  the sum of every route's pool.
* A streamed response (``client.send(..., stream=True)``, ``client.stream(...)``) opened in
  a unit of work (a request, ``lc.scope()``) and still open when the unit ends (after the
  response's last byte, so a body streamed to the client is read first) is closed by
  tether, its connection back in the pool, with a warning naming the unit, the URL and
  where it was opened, and counted in the resource's ``leaks``; one whose body was being
  read when the upstream failed mid-body or the unit was cancelled (a relay's
  ``BackgroundTask(response.aclose)`` then does not run) is closed at INFO, not counted.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import logging
import math
import os
import ssl
import sys
import time
import weakref
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

import anyio

try:
    import httpx
except ImportError as exc:  # pragma: no cover - import guard
    msg = "tether.integrations.httpx needs httpx: pip install 'tether[httpx]'"
    raise ImportError(msg) from exc

from .._errors import (
    ClientDisconnected,
    ResourceUnavailable,
    _a_type,
    check_bool,
    check_number,
    is_seconds,
)
from .._resource import Resource
from .._stats import PoolStats
from ._common import (
    Dsn,
    caller_outside,
    check_check,
    check_dsn_value,
    did_you_mean,
    not_an_option,
    per_unit,
    redact,
    resolve_dsn,
    saturation,
    unavailable,
    unit_now,
)

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle
    from .._resource import Check

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


def _reap_unconnected(transport: Any) -> None:
    """Drop from *transport*'s pool the connections left connecting for no request: a
    request cancelled (or timed out) after the pool gave it a new connection, and before
    that connection connected, leaves it ``[CONNECTING]`` for good, a slot of the pool lost
    (httpcore 1.0.9, encode/httpcore#1093). tether cancels a request whose client went away,
    so a burst of callers giving up at once lost one slot after another, until every call
    was a 503 with the upstream healthy (trial 25). Run as a request fails, after httpcore's
    own cleanup; queued requests are then given the slots. Best effort: httpcore's internals
    as in 1.0."""
    pool = getattr(transport, "_pool", None)
    try:
        connections = pool._connections  # type: ignore[union-attr]
        requests = pool._requests  # type: ignore[union-attr]
        lock = pool._optional_thread_lock  # type: ignore[union-attr]
    except AttributeError:
        return
    with lock:
        taken = {id(r.connection) for r in requests if getattr(r, "connection", None) is not None}
        lost = [
            c
            for c in connections
            if getattr(c, "_connection", False) is None
            and getattr(c, "_connect_failed", True) is False
            and id(c) not in taken
        ]
        if not lost:
            return
        for connection in lost:
            connections.remove(connection)
        closing = pool._assign_requests_to_connections()  # type: ignore[union-attr]
    log.debug("tether: %d connection(s) left connecting for no request dropped", len(lost))
    if closing and asyncio._get_running_loop() is not None:  # (on trio: left to the GC)
        # Idle ones past the keep-alive limit: closed from a task, this one is failing.
        task = asyncio.get_running_loop().create_task(pool._close_connections(closing))  # type: ignore[union-attr]
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)


#: The closes `_reap_unconnected` started, until they end.
_CLOSING: set[asyncio.Task[None]] = set()


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
            try:
                response = await self.inner.handle_async_request(request)
            except BaseException:
                _reap_unconnected(self.inner)
                raise
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
            refused = _tls_refusal(exc)
            if refused is not None:  # a configuration error: no retry mends it, no 503
                raise httpx.ConnectError(self._tls(request, refused), request=request) from exc
            raise self._unavailable(ConnectUnavailable, request, exc) from exc

    def _tls(self, request: httpx.Request, refused: ssl.SSLError) -> str:
        """The message of a TLS handshake that failed on the settings, not on an outage."""
        target = redact(str(request.url.copy_with(path="/", query=None, fragment=None)))
        through = f" through the proxy {redact(self.via)}" if self.via else ""
        said = str(refused).rstrip(". ") or type(refused).__name__
        return (
            f"HTTP client {self.name!r}: the TLS handshake with {target}{through} failed: "
            f"{type(refused).__name__}: {said}. A retry will not mend it (no 503): it is the "
            f"client's TLS settings or the server's certificate. Give the client verify= (a CA "
            f"bundle, or an ssl.SSLContext, that trusts the server's certificate, issued for "
            f"the URL's host) and, if the server asks for a client certificate, cert=."
        )

    def figures(self) -> tuple[int | None, int | None, int | None]:
        """Size, connections in use and requests waiting, read from the transport's pool
        (httpcore's, in httpx's own transport); ``None`` where there is no such pool. A
        request that timed out waiting is off the pool's queue: not counted, as the
        database pools do not count the unit that timed out."""
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
            waiting: int | None = queued
        except Exception:
            waiting = None
        return size, in_use, waiting

    def _unavailable(
        self, cls: type[_Unavailable], request: httpx.Request, exc: Exception
    ) -> _Unavailable:
        timed_out = isinstance(exc, httpx.PoolTimeout)
        size, in_use, waiting = self.figures()
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


#: The TLS failures of the settings, by OpenSSL's reason, which a retry would not mend: TLS
#: spoken to a plain HTTP port, no protocol or cipher both sides take, a certificate or a
#: client certificate refused. Any other (the peer closing the connection during the
#: handshake, a server's internal error alert, a corrupted record) stays a 503.
_TLS_SETTINGS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "NO_SHARED_CIPHER",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_UNRECOGNIZED_NAME",
    }
)


def _tls_refusal(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` in *exc*'s cause chain that a retry would not mend (a
    certificate refused, a host name mismatch, a client certificate refused, TLS spoken to a
    plain HTTP port), if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause  # the server's certificate: not trusted, or not the host's
        if isinstance(cause, ssl.SSLError):
            reason = getattr(cause, "reason", None) or ""
            return cause if reason in _TLS_SETTINGS or "CERTIFICATE" in reason else None
        cause = cause.__cause__ or cause.__context__
    return None


#: httpx's own frames: where `client.stream()` passes, skipped in where a stream was opened.
_HTTPX_DIR = os.path.dirname(os.path.abspath(httpx.__file__)) + os.sep


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
            cut = _cut_short(response, failure)
            if cut is not None:
                # Its body was being read (relayed) when the upstream failed or the unit was
                # cancelled (a server's shutdown timeout): the code closes it after the body
                # (a `BackgroundTask(response.aclose)`), which then does not run.
                log.info(
                    "tether: %s ended (%s) with a streamed response of httpx client %r still "
                    "open (%s): tether closed it.",
                    self.label, cut, res.name, what,
                )  # fmt: skip
                continue
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


def _cut_short(response: httpx.Response, failure: BaseException | None) -> str | None:
    """Why the unit of work ended while *response*'s body was being read, if it did: the
    server it calls failed mid-body (an ``httpx.TransportError``), or the unit was cancelled
    (a server's shutdown timeout); ``None`` otherwise."""
    if failure is None or not response.is_stream_consumed:  # its body not being read
        return None
    if isinstance(failure, httpx.TransportError):
        # Its own body's failure only (httpx names the request it read for): another call
        # of the unit failing leaves a stream dropped half-read a leak.
        if getattr(failure, "_request", None) is not response.request:
            return None
        return f"the server it calls failed mid-body: {type(failure).__name__}"
    if isinstance(failure, anyio.get_cancelled_exc_class()):
        return "cancelled while the body was being read"
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
        unit = unit_now(lc)
        if unit is None:
            return await super().send(request, stream=True, **kw)
        streams = await unit.get(streams_res)
        streams.label = unit.label
        response = await super().send(request, stream=True, **kw)
        streams.add(response, caller_outside(_HTTPX_DIR))
        return response


def client(
    lc: Lifecycle,
    *,
    name: str = "http",
    base_url: Dsn = "",
    timeout: float | tuple[float | None, ...] | httpx.Timeout | None = 10.0,
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
        timeout: seconds for each of connect, read, write and the pool wait (a number, or
            ``None`` for none), a tuple of them ``(connect, read, write, pool)`` (as httpx
            takes it: the last two may be left out), or an ``httpx.Timeout``.
        limits: the pool: ``max_connections`` (its size), ``max_keepalive_connections``,
            ``keepalive_expiry``.
        health_url: a URL (relative to *base_url*) the check GETs, expecting 2xx; a
            relative one without *base_url* is refused.
        check: ``True``: the client is open (and *health_url* answers, if given);
            ``False``: no check; or a function given the client.
        http2: use HTTP/2 where the server offers it (needs ``httpx[http2]``).
        kw: passed to ``httpx.AsyncClient`` (``headers``, ``auth``, ``verify``, ``cert``,
            ``proxy``, ``mounts``, ``trust_env``, ``transport``, ``event_hooks``, ...).
            The proxies (``proxy``, or without ``transport`` the environment's, as in httpx)
            get transports like the direct one: the same settings, and 503s; so do the
            transports given in ``mounts``.
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
    _check_options(kw, where)
    timeout = _check_timeout(timeout, where)
    _check_limits(limits, where)
    check_bool(http2, "http2", where)
    if http2 and importlib.util.find_spec("h2") is None:
        # httpx's client refuses it so; its transport, which tether makes, went on in HTTP/1.1.
        msg = (
            f"{where}: http2=True, but the 'h2' package is not installed, so every request "
            f"would go out in HTTP/1.1. Install httpx with its http2 extra: "
            f"`pip install httpx[http2]`, or drop http2=True."
        )
        raise ImportError(msg)
    check_check(
        check,
        where,
        default="the client is open, and health_url answers if given",
        of="client",
        example='lambda client: client.get("/health")',
    )
    given_health: object = health_url  # checked as what a caller may pass
    if given_health is not None and not isinstance(given_health, str | httpx.URL):
        msg = (
            f"{where}: health_url={health_url!r} is {_a_type(health_url)}, not a URL: pass "
            f'the path (relative to base_url) or the URL the check GETs, e.g. health_url="/health".'
        )
        raise TypeError(msg)
    if health_url is not None and base_url == "":
        _check_health_url(health_url, where, returned=False)
    for option in ("trust_env", "follow_redirects"):  # httpx's on/off options
        if option in kw:
            check_bool(kw[option], option, where)

    async def open_client() -> AsyncIterator[httpx.AsyncClient]:
        options = dict(kw)
        given: httpx.AsyncBaseTransport | None = options.pop("transport", None)
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        # httpx's own transports, for the direct route and for each proxy (proxy=, or
        # HTTP(S)_PROXY / ALL_PROXY / NO_PROXY when trust_env and no transport=), built as
        # httpx builds them but with tether's settings and 503 errors. (Given transport=,
        # httpx still makes proxy='s transport itself, from these settings: so does tether.)
        settings: dict[str, Any] = {
            "limits": limits,
            "http1": options.get("http1", True),
            "http2": http2,
            "verify": options.pop("verify", True),
            "cert": options.pop("cert", None),
            "trust_env": options.get("trust_env", True),
        }
        from_env = settings["trust_env"] and given is None  # as httpx reads the environment
        for key, proxy in _proxies(options, from_env).items():
            mounts[key] = None if proxy is None else wrapped(proxy=proxy, **settings)
        transport = wrapped(**settings) if given is None else wrapped_given(given)
        # The user's own mounts, over the proxies' as in httpx: with 503s too.
        for key, mounted in (options.pop("mounts", None) or {}).items():
            mounts[key] = None if mounted is None else wrapped_given(mounted)
        url = resolve_dsn(
            base_url, where, what="base_url", example="\"https://api.example.com\"", empty=True,
            objects=(httpx.URL,),
        )  # fmt: skip
        if health_url is not None and not url:  # a function returned ""
            _check_health_url(health_url, where, returned=True)
        c = _Client(base_url=url, timeout=timeout, transport=transport, mounts=mounts, **options)
        c._tether = (lc, streams)
        _transports[c] = _measured(c, transport, health_url)
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

    def wrapped_given(given: httpx.AsyncBaseTransport) -> _Transport:
        transport = _Transport(given, name)
        transport.resource = res
        return transport

    res: Resource[httpx.AsyncClient] = lc.resource(
        scope="app", name=name, check=_client_check(check, health_url)
    )(open_client)
    res.pool_stats = lambda c: _pool_stats(name, c)
    res.counts_waits = True
    res.async_api = "an httpx.AsyncClient"

    # The streamed responses of a unit of work, closed at its end if still open.
    streams = per_unit(
        lc,
        f"{name} streamed responses",
        _Streams,
        lambda opened, f: opened.close(res, f),
        owner=res,
        held="its streamed responses: client.stream(...), send(..., stream=True)",
    )
    # Readiness reads a full pool instead of queueing the health_url GET behind the traffic
    # (it would fail its timeout while the server answers everyone else).
    within = timeout.pool if isinstance(timeout, httpx.Timeout) else timeout
    res.saturation = lambda c: saturation(
        _pool_stats(name, c),
        max((t.served for t in _transports[c]), default=time.monotonic()),
        within,
        "the pool timeout",
        timed_out_at=max((t.timed_out_at for t in _transports[c]), default=-math.inf),
        holders="the requests holding them",
        backend="the server it calls",
        served_as=("the last response came", "no response came"),
    )
    return res


#: The keyword arguments of client() besides those of ``httpx.AsyncClient``: its own, and
#: httpx < 0.28's ``proxies`` (which tether still takes, as a mapping of routes to proxies).
_OWN_OPTIONS = ("name", "health_url", "check", "proxies")


@functools.cache
def _client_options() -> frozenset[str] | None:
    """The keyword arguments this httpx's ``AsyncClient`` takes; ``None`` if it takes any
    (``**kwargs``) or its signature cannot be read."""
    try:
        params = inspect.signature(httpx.AsyncClient.__init__).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a signature inspect cannot read
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None  # pragma: no cover - an httpx taking **kwargs
    return frozenset(
        p.name
        for p in params
        if p.name != "self"
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def _check_options(kw: dict[str, Any], where: str) -> None:
    """Refuse a keyword argument neither client() nor this httpx's ``AsyncClient`` takes
    (``verfy=False``, httpx < 0.28's ``app=``) at the declaration: httpx would refuse it
    only when the app starts."""
    accepted = _client_options()
    if accepted is None:
        return  # pragma: no cover - an httpx taking **kwargs
    for key in kw:
        if key in accepted or key in _OWN_OPTIONS:
            continue
        if key == "app":  # httpx < 0.28's app=, removed in 0.28
            fix = (
                "Since httpx 0.28 an app is called through a transport: pass "
                "transport=httpx.ASGITransport(app=app) instead."
            )
        else:
            fix = did_you_mean(key, accepted | set(_OWN_OPTIONS))
        of = f"httpx.AsyncClient (httpx {httpx.__version__})"
        raise not_an_option(where, key, "client()", of, fix)


_TIMEOUT_PARTS = ("connect", "read", "write", "pool")


def _check_timeout(timeout: object, where: str) -> float | httpx.Timeout | None:
    """*timeout* as httpx takes it (a number of seconds, ``None``, a tuple of 2 to 4 of
    them, an ``httpx.Timeout``), checked; a tuple is made an ``httpx.Timeout``."""
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if isinstance(timeout, tuple | list):
        example = "timeout=(5.0, 30.0, 30.0, 1.0)"
        if isinstance(timeout, list):
            msg = (
                f"{where}: timeout={timeout!r} is a list: httpx takes the seconds for "
                f"(connect, read, write, pool) as a tuple, not a list. Pass "
                f"timeout={tuple(timeout)!r}, or an httpx.Timeout, e.g. "
                f"timeout=httpx.Timeout(10.0, pool=1.0)."
            )
            raise TypeError(msg)
        if not 2 <= len(timeout) <= 4:
            msg = (
                f"{where}: timeout={timeout!r} has {len(timeout)} item"
                f"{'' if len(timeout) == 1 else 's'}: a tuple gives the seconds for "
                f"(connect, read, write, pool), 2 to 4 of them (write and pool may be left "
                f"out). Pass e.g. {example}, or a number for all four."
            )
            raise ValueError(msg)
        for part, seconds in zip(_TIMEOUT_PARTS, timeout, strict=False):
            if seconds is None or is_seconds(seconds):
                continue
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                msg = (
                    f"{where}: timeout={timeout!r}: its {part} timeout {seconds!r} is "
                    f"{_a_type(seconds)}, not a number of seconds. Pass a positive number of "
                    f"seconds (or None) for each of (connect, read, write, pool), e.g. "
                    f"{example}."
                )
                raise TypeError(msg)
            msg = (
                f"{where}: timeout={timeout!r}: its {part} timeout {seconds!r} must be a "
                f"positive number of seconds (or None)."
            )
            raise ValueError(msg)
        return httpx.Timeout(timeout)
    if timeout is not None and not isinstance(timeout, str | int | float):
        msg = (
            f"{where}: timeout={timeout!r} is {_a_type(timeout)}, not a timeout. Pass a "
            f"positive number of seconds (or None), e.g. timeout=10, a tuple of them for "
            f"(connect, read, write, pool), or an httpx.Timeout, e.g. "
            f"timeout=httpx.Timeout(10.0, pool=1.0)."
        )
        raise TypeError(msg)
    check_number(timeout, "timeout", where, above=True, none=True, example="10")
    return timeout  # type: ignore[return-value]


def _check_limits(limits: object, where: str) -> None:
    """Refuse *limits* that is not an ``httpx.Limits`` (``limits=5``) at the declaration:
    httpx would fail on it only when the app starts."""
    if isinstance(limits, httpx.Limits):
        return
    example = "max_connections=100"
    if isinstance(limits, int) and not isinstance(limits, bool):
        example = f"max_connections={limits}"
    elif isinstance(limits, dict) and limits and all(isinstance(k, str) for k in limits):
        example = ", ".join(f"{k}={v!r}" for k, v in limits.items())
    kind = "is not" if limits is None else f"is {_a_type(limits)}, not"
    msg = (
        f"{where}: limits={limits!r} {kind} an httpx.Limits. Pass "
        f"httpx.Limits({example}) (max_connections is the pool's size; it also takes "
        f"max_keepalive_connections= and keepalive_expiry=), or leave limits out for "
        f"httpx.Limits(max_connections=100, max_keepalive_connections=20)."
    )
    raise TypeError(msg)


def _check_health_url(health_url: str, where: str, *, returned: bool) -> None:
    """Refuse a relative *health_url* with no base_url to resolve it against: base_url left
    out, or (*returned*) the function given for it returned ``""``."""
    try:
        relative = httpx.URL(health_url).is_relative_url
    except Exception:  # not a URL: httpx says so at the check
        return
    if not relative:
        return
    given = 'its base_url function returned ""' if returned else "it has no base_url"
    msg = (
        f"{where}: health_url {health_url!r} is relative, and {given} to resolve it "
        f"against: every readiness check would fail. Pass base_url (e.g. "
        f'base_url="https://api.example.com"), or an absolute health_url '
        f'(e.g. "https://api.example.com/health").'
    )
    raise ValueError(msg)


#: The transports of each client tether opened that its figures and readiness read: the
#: one its health_url (else its base_url) goes through, the direct route's or a proxy's
#: (or a mount's); with neither, all of them (the direct route's, each proxy's, each mount's).
_transports: weakref.WeakKeyDictionary[httpx.AsyncClient, list[_Transport]] = (
    weakref.WeakKeyDictionary()
)


def _measured(c: httpx.AsyncClient, direct: _Transport, health_url: str | None) -> list[_Transport]:
    """The transports of *c* whose pools its figures and readiness read."""
    every = [direct]
    for mounted in c._mounts.values():
        if isinstance(mounted, _Transport) and mounted not in every:
            every.append(mounted)
    probe = health_url if health_url is not None else str(c.base_url)
    if not probe:
        return every
    try:
        route = c._transport_for_url(c._merge_url(probe))
    except Exception:  # an httpx without these (private) methods, or no URL at all
        return every
    return [route] if isinstance(route, _Transport) else every


def _pool_stats(name: str, c: httpx.AsyncClient) -> PoolStats:
    """The client's connection pool (httpcore's) on the route its health_url (else its
    base_url) takes, the direct one or a proxy's; with neither, the sum of every route's
    pools (those with an httpx pool): the size, the connections open, busy (a request on
    it, or a response still being read) and idle, and the requests waiting for one;
    ``None`` where no transport has such a pool."""
    totals: list[int | None] | None = None
    for transport in _transports.get(c, ()):
        pool = getattr(transport.inner, "_pool", None)
        if pool is None:
            continue  # a transport of the user's without httpx's pool: no figures
        size, in_use, waiting = transport.figures()
        try:
            opened: int | None = len(pool.connections)
        except Exception:
            opened = None
        figures = [size, opened, in_use, waiting]
        if totals is None:
            totals = figures
        else:
            totals = [
                None if a is None or b is None else a + b
                for a, b in zip(totals, figures, strict=True)
            ]
    size, opened, in_use, waiting = totals or [None, None, None, None]
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
            try:
                response = await c.get(health_url)
            except httpx.TimeoutException as exc:
                # httpx's says nothing ("ReadTimeout"): the check's report names the URL
                # and the bound that ran out.
                # (httpx's own class: tether's 503 errors, for a connect or pool timeout,
                # take more than a message: a TypeError was the report: trial 25.)
                plain = next(k for k in type(exc).__mro__ if k.__module__.startswith("httpx"))
                raise plain(_timed_out_check(c, exc), request=exc.request) from exc
            response.raise_for_status()

    return is_open


def _timed_out_check(c: httpx.AsyncClient, exc: httpx.TimeoutException) -> str:
    """What a check's GET of ``health_url`` that timed out says."""
    phase: dict[type[Exception], tuple[str, str]] = {
        httpx.ConnectTimeout: ("connect", "could not connect"),
        httpx.ReadTimeout: ("read", "got no answer"),
        httpx.WriteTimeout: ("write", "could not send the request"),
        httpx.PoolTimeout: ("pool", "got no connection from the client's pool"),
    }
    kind = next((k for k in phase if isinstance(exc, k)), None)  # tether's 503s are subclasses
    key, what = phase[kind] if kind is not None else ("read", "timed out")
    bound = getattr(c.timeout, key, None)
    within = f" within the client's {key} timeout ({bound:g} s)" if bound is not None else ""
    try:
        url = redact(str(exc.request.url))
    except RuntimeError:  # (httpx's: no request set)
        url = "health_url"
    # (tether's 503 for it says the pool's figures and "retry shortly": not the check's.)
    said = f": {exc}" if str(exc) and not isinstance(exc, _Unavailable) else ""
    return f"GET {url} {what}{within}{said}"
