"""The error types. Every message names the resource, the cause and what to do."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "ClientDisconnected",
    "DependencyCycleError",
    "DuplicateResourceError",
    "FailedResponse",
    "ResourceClosedError",
    "ResourceUnavailable",
    "ScopeError",
    "ShutdownError",
    "StartupError",
    "TetherError",
    "UnknownResourceError",
    "redact",
]

# `scheme://user:password@host` and `password=...` (libpq keyword form). The password runs
# to the last `@` before the host's end (`/`, `?`, `#`, a space), as URL parsers read it: a
# password with an unencoded `@` is hidden whole.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^/?#\s]*)@")
_KW_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|\"[^\"]*\"|\S+)", re.I)


def redact(text: str) -> str:
    """Return *text* with the passwords of any DSNs in it replaced by ``***``."""
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    if "assword" in text or "ASSWORD" in text:
        text = _KW_PASSWORD.sub(r"\g<head>***", text)
    return text


def describe(exc: BaseException) -> str:
    """``TypeName: message`` for *exc*, with passwords redacted."""
    text = str(exc)
    name = type(exc).__name__
    return redact(f"{name}: {text}" if text else name)


# SQLSTATEs no retry mends: the server refused the credentials (class 28: a wrong password,
# a role that does not exist or may not log in) or the database does not exist (3D000).
_FOR_GOOD = ("28", "3D000")

# libpq keeps the SQLSTATE of a connection the server refused to itself, so psycopg's (and
# psycopg2's) error for it has none: the server's message says which it was. Messages in
# English (the server's lc_messages); in another language the refusal is not recognised, and
# the start is retried as for any other failure.
_REFUSALS = (
    (re.compile(r"password authentication failed for user"), "28P01"),
    (re.compile(r'FATAL:\s+role "[^"]*" (does not exist|is not permitted to log in)'), "28000"),
    (re.compile(r"no pg_hba\.conf entry for|pg_hba\.conf rejects connection"), "28000"),
    (re.compile(r'FATAL:\s+database "[^"]*" does not exist'), "3D000"),
)


def _sqlstate(exc: BaseException) -> object:
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if state is None and type(exc).__module__.startswith("psycopg"):
        text = str(exc)
        for pattern, code in _REFUSALS:
            if pattern.search(text):
                return code
    return state


def refused_for_good(exc: BaseException) -> str | None:
    """The SQLSTATE if *exc* (or what it wraps: a cause, SQLAlchemy's ``orig``) is the
    server refusing the credentials or the database, which retrying cannot mend."""
    link: BaseException | None = exc
    for _ in range(8):  # a chain is never this long; stop on anything circular
        if link is None:
            return None
        state = _sqlstate(link)
        if isinstance(state, str) and state.startswith(_FOR_GOOD):
            return state
        orig = getattr(link, "orig", None)
        link = orig if isinstance(orig, BaseException) else (link.__cause__ or link.__context__)
    return None


def is_seconds(value: object, *, zero: bool = False) -> bool:
    """Whether *value*, as a caller may pass it, is a duration: a number (not a bool, not
    NaN) above 0, or at least 0 with *zero*."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 if zero else value > 0


class TetherError(Exception):
    """Base class of every error tether raises."""


class StartupError(TetherError):
    """An app resource failed to open; the ones already open were closed.

    ``resource`` names the failing resource; ``__cause__`` is the original error.
    """

    def __init__(self, message: str, *, resource: str) -> None:
        super().__init__(message)
        self.resource = resource


class ShutdownError(ExceptionGroup[Exception], TetherError):
    """One or more cleanups failed at shutdown; every cleanup was still attempted."""

    def __new__(cls, message: str, exceptions: Sequence[Exception]) -> ShutdownError:
        return super().__new__(cls, message, exceptions)

    def derive(self, excs: Sequence[Exception], /) -> ShutdownError:  # type: ignore[override]
        return ShutdownError(self.message, excs)


#: Added (PEP 678) by the integrations to a driver's error when the connection was lost
#: under a unit of work without a transaction: the error stays what it was (a 500: its
#: statement may have run), and routes declared ``tether.fastapi.idempotent`` run again.
LOST_NOTE = (
    "tether: the connection was lost under the unit of work (without a transaction, "
    "whether this statement ran is unknown)"
)


class ResourceUnavailable(TetherError):
    """A resource could not be had in time (opening timed out, or its pool is exhausted).

    The FastAPI integration answers ``503 Service Unavailable`` with ``Retry-After``.
    ``lost`` is true when the unit of work's connection was lost under it (or reached a
    read-only server) and the pool replaces it: running the unit again may succeed at
    once, which :func:`tether.fastapi.idempotent` routes do. ``timed_out`` is true when
    the wait for a connection ran out of time (counted in the resource's ``timeouts``: the
    ``tether.resource.timeouts`` metric, and the ``db.client.connection.timeouts`` of the
    driver pool it draws from).
    """

    def __init__(
        self,
        message: str,
        *,
        resource: str,
        retry_after: float = 1.0,
        lost: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.resource = resource
        self.retry_after = retry_after
        self.lost = lost
        self.timed_out = timed_out


class ResourceClosedError(TetherError):
    """A value (or a scope) was used after its scope had closed."""

    def __init__(self, message: str, *, resource: str | None = None) -> None:
        super().__init__(message)
        self.resource = resource


class DependencyCycleError(TetherError):
    """The resources depend on each other in a cycle; ``path`` lists it."""

    def __init__(self, path: Sequence[str]) -> None:
        self.path = tuple(path)
        chain = " -> ".join(self.path)
        super().__init__(
            f"Dependency cycle between resources: {chain}. "
            f"A resource cannot depend on itself, directly or through others: "
            f"remove one of these parameters or pass the value another way."
        )


class ScopeError(TetherError):
    """A resource was used against the scope rules.

    An app resource that depends on a request resource, a request resource used with
    no unit of work (no request, no ``lc.scope()``), or one unit of work's connection
    used by two tasks at once (the integrations).
    """


class UnknownResourceError(TetherError, LookupError):
    """A parameter of a resource names no registered resource."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class DuplicateResourceError(TetherError, ValueError):
    """Two resources were registered under one name."""


class FailedResponse(TetherError):
    """Thrown into request resources when the response has an error status.

    An endpoint may answer ``4xx``/``5xx`` without raising (returning a ``JSONResponse``
    with ``status_code=409``, say). Request resources still take their failure path
    (roll back): this is the exception they see at their ``yield``.
    """

    def __init__(self, status_code: int) -> None:
        super().__init__(f"The response has error status {status_code}.")
        self.status_code = status_code


class ClientDisconnected(TetherError):
    """Thrown into request resources when the client went away mid-request.

    tether cancels the work of a request whose client disconnected; its resources then
    take their failure path (roll back) with this exception (the cancellation chained).
    """
