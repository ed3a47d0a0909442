"""`error_status=`: which response statuses take a request resource's failure path."""

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

import tether


def make(events: list[str]) -> tuple[tether.Lifecycle, FastAPI]:
    """A strict session (the default: every error status rolls back) and a lenient one
    (`error_status=lambda s: s >= 500`: a 4xx commits), and routes answering each way."""
    lc = tether.Lifecycle()

    def session(name: str) -> Any:
        async def open_session() -> AsyncIterator[str]:
            try:
                yield name
            except BaseException as exc:
                status = getattr(exc, "status_code", "")
                events.append(f"{name} rollback {type(exc).__name__} {status}".rstrip())
                raise
            else:
                events.append(f"{name} commit")

        return open_session

    strict = lc.resource(name="strict")(session("strict"))
    lenient = lc.resource(name="lenient", error_status=lambda status: status >= 500)(
        session("lenient")
    )
    app = FastAPI(lifespan=lc.lifespan)

    def both(s: Annotated[str, Depends(strict)], le: Annotated[str, Depends(lenient)]) -> None:
        return None

    @app.post("/returns/{status}", dependencies=[Depends(both)])
    async def returns(status: int) -> JSONResponse:
        return JSONResponse({"status": status}, status_code=status)

    @app.post("/raises/{status}", dependencies=[Depends(both)])
    async def raises(status: int) -> None:
        raise HTTPException(status, "no")

    @app.post("/crashes", dependencies=[Depends(both)])
    async def crashes() -> None:
        raise RuntimeError("bug")

    return lc, app


@pytest.mark.parametrize(
    ("path", "status", "expected"),
    [
        ("/returns/200", 200, ["lenient commit", "strict commit"]),
        ("/returns/409", 409, ["lenient commit", "strict rollback FailedResponse 409"]),
        ("/raises/404", 404, ["lenient commit", "strict rollback HTTPException 404"]),
        (
            "/returns/503",
            503,
            ["lenient rollback FailedResponse 503", "strict rollback FailedResponse 503"],
        ),
        (
            "/raises/500",
            500,
            ["lenient rollback HTTPException 500", "strict rollback HTTPException 500"],
        ),
        ("/crashes", 500, ["lenient rollback RuntimeError", "strict rollback RuntimeError"]),
    ],
)
def test_each_resource_decides_which_statuses_fail(
    path: str, status: int, expected: list[str]
) -> None:
    """By default every error status rolls back; `error_status` lets a 4xx commit for that
    resource only, while a 5xx and an exception without a status still roll it back."""
    events: list[str] = []
    lc, app = make(events)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(path).status_code == status
    assert events == expected  # closed in reverse: lenient, opened last, first


class UpstreamError(Exception):
    """Shaped like an SDK's ``APIStatusError``: its ``status_code`` is the upstream's."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"the upstream answered {status_code}")
        self.status_code = status_code


class PaymentError(UpstreamError):
    """An SDK's error that the app's own handler answers with a 502."""


@pytest.mark.parametrize(
    ("path", "status"),
    [("/upstream", 500), ("/payment", 502), ("/missing", 404), ("/http-404", 404)],
)
def test_only_the_response_status_decides_not_an_exceptions_status_code(
    path: str, status: int
) -> None:
    """An exception that escapes the endpoint carrying the *upstream's* status (429 from an
    SDK) is a failure: the client gets a 500, or the 502 the app's handler answers, and the
    lenient resource must roll back; it committed. An exception the app maps to a 404
    without a status of its own rolls back too (the docs: "an exception without a
    status"); an ``HTTPException`` 404 is the response's status, and commits."""
    events: list[str] = []
    lc, app = make(events)

    async def both_of(request: Any) -> None:
        return None

    deps = app.router.routes[-1].dependencies  # type: ignore[attr-defined]

    class Missing(Exception):
        pass

    @app.exception_handler(PaymentError)
    async def payment_failed(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "upstream failed"}, status_code=502)

    @app.exception_handler(Missing)
    async def missing(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "not found"}, status_code=404)

    @app.post("/upstream", dependencies=deps)
    async def upstream() -> None:
        raise UpstreamError(429)

    @app.post("/payment", dependencies=deps)
    async def payment() -> None:
        raise PaymentError(402)

    @app.post("/missing", dependencies=deps)
    async def not_there() -> None:
        raise Missing

    @app.post("/http-404", dependencies=deps)
    async def http_404() -> None:
        raise HTTPException(404, "no")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(path).status_code == status
    if path == "/http-404":
        assert events == ["lenient commit", "strict rollback HTTPException 404"]
    else:
        assert events[0].startswith("lenient rollback"), events
        assert events[1].startswith("strict rollback"), events


def test_an_override_keeps_the_resources_error_status() -> None:
    """A resource replaced by `lc.override` keeps when its cleanup sees a failure."""
    events: list[str] = []
    lc, app = make(events)

    async def fake() -> AsyncIterator[str]:
        try:
            yield "fake"
        except BaseException:
            events.append("fake rollback")
            raise
        else:
            events.append("fake commit")

    with lc.override(lc.resources["lenient"], fake), TestClient(app) as client:
        assert client.post("/returns/409").status_code == 409
    assert events == ["fake commit", "strict rollback FailedResponse 409"]


def test_error_status_must_be_a_function_for_a_request_resource() -> None:
    lc = tether.Lifecycle()
    with pytest.raises(TypeError) as info:
        lc.resource(name="s", error_status=500)(lambda: "s")  # type: ignore[arg-type]
    assert str(info.value) == (
        "Resource 's': error_status=500 is not callable. Pass a function of the response "
        "status that is true for a failure, e.g. error_status=lambda status: status >= 500."
    )
    with pytest.raises(ValueError) as info2:
        lc.resource(name="p", scope="app", error_status=lambda s: s >= 500)(lambda: "p")
    assert str(info2.value) == (
        "Resource 'p': error_status= is for request resources; an app resource never sees "
        "a response."
    )


def test_an_error_status_that_raises_is_named_and_its_resource_rolls_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`error_status=lambda s: s.startswith("5")` raised on the first error response, logged
    as "closing resource 'conn' failed", and the generator was closed by the garbage
    collector (trial 16). Now the function is named, once, and the resource rolls back."""
    lc = tether.Lifecycle()
    events: list[str] = []

    def by_text(status: Any) -> bool:
        return bool(status.startswith("5"))

    @lc.resource(error_status=by_text)
    def conn() -> Iterator[int]:
        try:
            yield 1
        except BaseException as exc:
            events.append(f"rollback ({type(exc).__name__})")
            raise
        events.append("commit")

    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/")
    def route(c: Annotated[int, Depends(conn)]) -> None:
        raise HTTPException(404)

    with caplog.at_level(logging.ERROR, logger="tether"), TestClient(app) as client:
        assert client.get("/").status_code == 404
        assert client.get("/").status_code == 404
    assert events == ["rollback (HTTPException)"] * 2
    said = [r.getMessage() for r in caplog.records if "error_status=" in r.getMessage()]
    assert said == [
        "tether: error_status=test_an_error_status_that_raises_is_named_and_its_resource_"
        "rolls_back.<locals>.by_text raised AttributeError: 'int' object has no attribute "
        "'startswith' for status 404: it is given the response's status code (an int) and "
        "returns whether it is a failure (e.g. error_status=lambda status: status >= 500). "
        "Its resource is rolled back for each such response; said once"
    ]
