"""`thttpx.client(...)` refuses a wrong `limits=`, a wrong `timeout=` and a keyword argument
httpx.AsyncClient does not take where it is called, not when the app starts (as httpx's own
error inside a StartupError); and takes every timeout httpx takes."""

import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import tether
from tests.unit._messages import exactly
from tether.integrations import httpx as thttpx

pytestmark = pytest.mark.anyio

WHERE = "HTTP client 'http'"
VERSION = httpx.__version__
LIMITS_TAIL = (
    "(max_connections is the pool's size; it also takes max_keepalive_connections= and "
    "keepalive_expiry=), or leave limits out for httpx.Limits(max_connections=100, "
    "max_keepalive_connections=20)."
)
TUPLE_EXAMPLE = "timeout=(5.0, 30.0, 30.0, 1.0)"


def unknown(key: str, fix: str) -> str:
    return (
        f"{WHERE}: {key}= is not an option of client() nor of httpx.AsyncClient (httpx "
        f"{VERSION}), which client() passes its other keyword arguments to. {fix}"
    )


@pytest.mark.parametrize(
    ("declare", "error", "message"),
    [
        (
            lambda lc: thttpx.client(lc, limits=5),  # type: ignore[arg-type]
            TypeError,
            f"{WHERE}: limits=5 is an int, not an httpx.Limits. Pass "
            f"httpx.Limits(max_connections=5) {LIMITS_TAIL}",
        ),
        (
            lambda lc: thttpx.client(lc, limits={"max_connections": 5}),  # type: ignore[arg-type]
            TypeError,
            f"{WHERE}: limits={{'max_connections': 5}} is a dict, not an httpx.Limits. Pass "
            f"httpx.Limits(max_connections=5) {LIMITS_TAIL}",
        ),
        (
            lambda lc: thttpx.client(lc, limits=None),  # type: ignore[arg-type]
            TypeError,
            f"{WHERE}: limits=None is not an httpx.Limits. Pass "
            f"httpx.Limits(max_connections=100) {LIMITS_TAIL}",
        ),
        (
            lambda lc: thttpx.client(lc, timeout=[5, 30]),  # type: ignore[arg-type]
            TypeError,
            f"{WHERE}: timeout=[5, 30] is a list: httpx takes the seconds for (connect, read, "
            f"write, pool) as a tuple, not a list. Pass timeout=(5, 30), or an httpx.Timeout, "
            f"e.g. timeout=httpx.Timeout(10.0, pool=1.0).",
        ),
        (
            lambda lc: thttpx.client(lc, timeout={"connect": 5}),  # type: ignore[arg-type]
            TypeError,
            f"{WHERE}: timeout={{'connect': 5}} is a dict, not a timeout. Pass a positive "
            f"number of seconds (or None), e.g. timeout=10, a tuple of them for (connect, "
            f"read, write, pool), or an httpx.Timeout, e.g. "
            f"timeout=httpx.Timeout(10.0, pool=1.0).",
        ),
        (
            lambda lc: thttpx.client(lc, timeout=(5,)),
            ValueError,
            f"{WHERE}: timeout=(5,) has 1 item: a tuple gives the seconds for (connect, read, "
            f"write, pool), 2 to 4 of them (write and pool may be left out). Pass e.g. "
            f"{TUPLE_EXAMPLE}, or a number for all four.",
        ),
        (
            lambda lc: thttpx.client(lc, timeout=(5, 30, 30, 1, 9)),
            ValueError,
            f"{WHERE}: timeout=(5, 30, 30, 1, 9) has 5 items: a tuple gives the seconds for "
            f"(connect, read, write, pool), 2 to 4 of them (write and pool may be left out). "
            f"Pass e.g. {TUPLE_EXAMPLE}, or a number for all four.",
        ),
        (
            lambda lc: thttpx.client(lc, timeout=(5, "30")),  # type: ignore[arg-type]
            TypeError,
            f"{WHERE}: timeout=(5, '30'): its read timeout '30' is a str, not a number of "
            f"seconds. Pass a positive number of seconds (or None) for each of (connect, read, "
            f"write, pool), e.g. {TUPLE_EXAMPLE}.",
        ),
        (
            lambda lc: thttpx.client(lc, timeout=(5, 30, 30, -1)),
            ValueError,
            f"{WHERE}: timeout=(5, 30, 30, -1): its pool timeout -1 must be a positive number "
            f"of seconds (or None).",
        ),
        (
            lambda lc: thttpx.client(lc, verfy=False),
            TypeError,
            unknown("verfy", "Did you mean verify=? Fix or remove it."),
        ),
        (
            lambda lc: thttpx.client(lc, headres={"x-api-key": "k"}),
            TypeError,
            unknown("headres", "Did you mean headers=? Fix or remove it."),
        ),
        (
            lambda lc: thttpx.client(lc, health_uri="/health"),
            TypeError,
            unknown("health_uri", "Did you mean health_url=? Fix or remove it."),
        ),
        (
            lambda lc: thttpx.client(lc, zzz=1),
            TypeError,
            unknown("zzz", "Remove it."),
        ),
    ],
    ids=[
        "limits-int",
        "limits-dict",
        "limits-none",
        "timeout-list",
        "timeout-dict",
        "timeout-tuple-short",
        "timeout-tuple-long",
        "timeout-tuple-str",
        "timeout-tuple-negative",
        "unknown-verify",
        "unknown-headers",
        "unknown-health_url",
        "unknown-no-match",
    ],
)
def test_a_wrong_argument_is_refused_where_client_is_called(
    declare: Callable[[tether.Lifecycle], Any], error: type[Exception], message: str
) -> None:
    lc = tether.Lifecycle()
    with pytest.raises(error, match=exactly(message)):
        declare(lc)


@pytest.mark.skipif(
    "app" in inspect.signature(httpx.AsyncClient.__init__).parameters,
    reason="httpx < 0.28 still takes app=",
)
def test_app_of_httpx_before_0_28_is_refused_naming_the_transport() -> None:
    lc = tether.Lifecycle()
    with pytest.raises(
        TypeError,
        match=exactly(
            unknown(
                "app",
                "Since httpx 0.28 an app is called through a transport: pass "
                "transport=httpx.ASGITransport(app=app) instead.",
            )
        ),
    ):
        thttpx.client(lc, app=object())


def test_the_check_takes_every_option_of_httpx_async_client() -> None:
    """The keyword arguments are checked against this httpx's own AsyncClient: each it
    takes passes the declaration (and httpx < 0.28's proxies=, which tether maps), a
    misspelt one does not."""
    taken = {
        name
        for name in inspect.signature(httpx.AsyncClient.__init__).parameters
        if name not in {"self", "base_url", "timeout", "limits", "http2"}  # client()'s own
    }
    values: dict[str, Any] = {"trust_env": True, "follow_redirects": False}
    for name in sorted(taken):
        option: dict[str, Any] = {name: values.get(name)}
        thttpx.client(tether.Lifecycle(), **option)
    thttpx.client(tether.Lifecycle(), proxies={"all://": "http://proxy.example:3128"})
    with pytest.raises(TypeError, match=r"^HTTP client 'http': trustenv= is not an option"):
        thttpx.client(tether.Lifecycle(), trustenv=False)


@pytest.mark.parametrize("timeout", [(1.0, 2.0), (1.0, None, 3.0), (1, 2, 3, 0.5)])
async def test_a_tuple_timeout_is_taken_as_httpx_takes_it(timeout: tuple[Any, ...]) -> None:
    """httpx takes (connect, read[, write[, pool]]): so does client(), which used to refuse
    it as "not a number of seconds"; the client gets httpx.Timeout(timeout)."""
    lc = tether.Lifecycle()
    http = thttpx.client(
        lc,
        base_url="http://upstream.test",
        timeout=timeout,
        transport=httpx.MockTransport(lambda request: httpx.Response(200, text="ok")),
    )
    async with lc.run(), lc.scope() as s:
        c = await s.get(http)
        assert c.timeout == httpx.Timeout(timeout)
        assert (await c.get("/x")).text == "ok"


@pytest.mark.skipif(importlib.util.find_spec("h2") is not None, reason="h2 is installed")
def test_http2_without_h2_is_refused_at_declaration() -> None:
    """httpx's client refuses `http2=True` without `h2`; the transport tether makes did not,
    and every request went out in HTTP/1.1 (trial 25)."""
    with pytest.raises(ImportError) as caught:
        thttpx.client(tether.Lifecycle(), base_url="http://x", http2=True)
    assert str(caught.value) == (
        "HTTP client 'http': http2=True, but the 'h2' package is not installed, so every "
        "request would go out in HTTP/1.1. Install httpx with its http2 extra: `pip install "
        "httpx[http2]`, or drop http2=True."
    )
