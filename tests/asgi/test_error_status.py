"""`error_status=`: which response statuses take a request resource's failure path."""

from collections.abc import AsyncIterator
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
