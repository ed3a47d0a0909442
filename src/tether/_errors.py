"""The error types. Every message names the resource, the cause and what to do."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

_E = TypeVar("_E", bound=BaseException)

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
    "remember_secrets",
]

# Passwords are hidden three ways (``redact``):
#
# - in a URL, ``scheme://user:PASSWORD@host``: the password runs to the last ``@`` before the
#   first ``/``, as libpq (which reads ``?``, ``#`` and spaces as part of it) and URL parsers
#   (redis-py's, urllib's: an unencoded ``@`` in it) read it; one with an unencoded ``/``
#   runs to the first ``@`` after it, as SQLAlchemy reads it (``host:5432/`` is a port), and
#   so does one with a space.
#   The user may hold an ``@`` (``redis://user@tenant:pw@host``).
# - after a key ending in ``password``, ``passwd``, ``pwd`` or ``secret`` (``sslpassword``,
#   ``oauth_client_secret``, ``PGPASSWORD``), or ``token``, ``api_key``/``apikey`` or
#   ``signature`` (``access_token``, ``X-Amz-Signature``): ``key=value`` (libpq's key/value
#   form, a URL's query: a quoted value with its escapes, ``'o\'x'``), ``'key': 'value'``
#   (a dict's repr, JSON), ``password: value``. In a URL's query also ``key``, ``sig``,
#   ``auth``, ``access_key`` and ``private_key`` (`_QUERY_KEY`).
# - the exact passwords of the DSNs the resources opened with (``remember_secrets``), where a
#   driver's parse error quotes them, or a piece of them, in a form none of the above finds.
_SCHEME = r"[a-zA-Z][a-zA-Z0-9+.\-]*://"
_URL_PASSWORD = re.compile(rf"(?P<head>{_SCHEME}[^:/\s]*:)(?P<pw>[^/\s]*)@")
_URL_PASSWORD_SLASH = re.compile(rf"(?P<head>{_SCHEME}[^:/\s]*:)(?P<pw>(?!\d*/)[^@\s]*/[^@\s]*)@")
_URL_PASSWORD_SPACE = re.compile(
    rf"(?P<head>{_SCHEME}[^:/\s]*:)(?P<pw>(?!\d*(?:[/\s]|$))[^/@\n]*\s[^/@\s]*)@"
)
_PASSWORD_KEY = r"[\w.\-]*?(?:password|passwd|pwd|secret)"
_SECRET_KEY = r"[\w.\-]*?(?:password|passwd|pwd|secret|token|api_?key|signature)"
_QUOTED = r"""'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?"""
_KW_PASSWORD = re.compile(
    rf"(?P<head>(?<![\w.\-?&]){_SECRET_KEY}\s*=\s*)(?P<pw>{_QUOTED}|(?:[^\s\\]|\\.)+)", re.I
)
# In a URL's query (after '?' or '&'), the value ends at the next '&': URL parsers and libpq
# split the query there (an '&' in the value is sent encoded, %26), so the parameters after
# it (sslmode=) stay shown. Not at '#': libpq reads it as part of the value.
# There, also the keys web APIs put their credentials in: ``key`` (Google's API keys),
# ``sig`` (Azure's SAS), ``auth``, ``access_key``/``private_key``; only there, where a value
# is a secret by the key alone (libpq's ``sslkey=`` names a file).
_QUERY_KEY = rf"(?:{_SECRET_KEY}|key|sig|auth|[\w.\-]*?(?:access|private)[_\-]?key)"
_QUERY_PASSWORD = re.compile(rf"(?P<head>(?<=[?&]){_QUERY_KEY}=)(?P<pw>[^&\s]*)", re.I)
_DICT_PASSWORD = re.compile(
    rf"(?P<head>(?P<q>['\"]){_SECRET_KEY}(?P=q)\s*:\s*b?)(?P<pw>{_QUOTED}|[^\s,}}\]]+)", re.I
)
_COLON_PASSWORD = re.compile(
    rf"(?P<head>(?<![\w.\-]){_PASSWORD_KEY}:\s*)(?P<pw>{_QUOTED}|(?:[^\s\\]|\\.)+)", re.I
)
_KEYS = re.compile(r"passw|pwd|secret|token|api_?key|signature", re.I)

#: The passwords of the DSNs resources opened with that the patterns above may not find
#: whole in a driver's message (``remember_secrets``): each password whole (a string), then
#: its pieces (a pattern matching the piece as a whole word), longest first. A tuple
#: replaced whole: read from any thread without a lock.
_secrets: tuple[str | re.Pattern[str], ...] = ()
# A password of these characters only is delimited by the patterns, and no driver splits
# it: scrubbing it as plain text as well would turn a common word (a development password
# ``postgres``) into ``***`` in every message.
_PLAIN = re.compile(r"[A-Za-z0-9._~%+\-]*")
# Where URL parsers split a DSN: a password holding one of these comes back in pieces.
_SPLITS = re.compile(r"[/?#@&=:\s]+")
# Where the next ``key=`` of a key/value DSN starts.
_NEXT_KEY = re.compile(r"\s+[\w.\-]+\s*=")


def _remember(password: str) -> None:
    global _secrets
    found: set[str | re.Pattern[str]] = set()
    for shape in {password, unquote(password)}:
        if len(shape) >= 4 and not _PLAIN.fullmatch(shape):
            found.add(shape)
            # A piece only as a whole word: one that is a common one (`pass` of
            # `Wr0ng#pass@x`) is not cut out of others ("password" shown "***word").
            # Case aside: a driver may quote a piece lower-cased (redis-py's "connecting to
            # vb7qmzr2:6379", the host it parsed out of the password).
            found.update(
                re.compile(rf"(?<![A-Za-z0-9]){re.escape(p)}(?![A-Za-z0-9])", re.I)
                for p in _SPLITS.split(shape)
                if len(p) >= 4 and p != shape
            )
    if found - set(_secrets):
        _secrets = tuple(sorted({*_secrets, *found}, key=_secret_order))


def _secret_order(secret: str | re.Pattern[str]) -> tuple[bool, int]:
    """Whole passwords first, then pieces; each longest first."""
    if isinstance(secret, str):
        return (False, -len(secret))
    return (True, -len(secret.pattern))


def _unquoted(value: str) -> str:
    if value[:1] in ("'", '"'):
        value = value[1:-1] if len(value) > 1 and value[-1] == value[0] else value[1:]
    return re.sub(r"\\(.)", r"\1", value)


def remember_secrets(dsn: object) -> None:
    """Note the passwords in *dsn* (a DSN, a URL object, a mapping of connection
    parameters), read when its resource opens, so that ``redact`` hides them wherever they
    show, whole or in the pieces a driver's parse error quotes (an unencoded ``/`` in a
    URL's password: ``invalid literal for int(): 'hunter2'``). Only passwords of 4 or more
    characters with one that is not a letter, a digit or ``-._~%+`` are noted: the others
    are found by the patterns, and no driver splits them."""
    if isinstance(dsn, Mapping):
        for key, value in dsn.items():
            if isinstance(key, str) and isinstance(value, str) and _KEYS.search(key):
                _remember(value)
        return
    if not isinstance(dsn, str):
        password = getattr(dsn, "password", None)
        if isinstance(password, str):
            _remember(password)
        dsn = str(dsn)
    scheme = re.match(_SCHEME, dsn)
    if scheme is not None:
        rest = dsn[scheme.end() :]
        authority = rest.partition("/")[0]
        # libpq's and URL parsers' userinfo, else SQLAlchemy's (across a '/', not a port's).
        at = authority.rfind("@") if "@" in authority else rest.find("@")
        _user, colon, password = rest[: max(at, 0)].partition(":")
        if colon and (at == authority.rfind("@") or not re.match(r"\d*/", password)):
            _remember(password)
        # A password with an unencoded '@' and a '/' (`user:Kx9@Vb7Q/Tw4@host`): URL parsers
        # end the authority at the '/', and quote what follows; the userinfo up to the last
        # '@' is remembered too, with its pieces.
        last = rest.partition("?")[0].rfind("@")
        if colon and last > at:
            _remember(rest[:last].partition(":")[2])
        if at >= 0:
            rest = rest[at + 1 :]
        for pair in rest.partition("?")[2].split("&"):
            key, _, value = pair.partition("=")
            if _KEYS.search(key):
                _remember(value)
        return
    for found in _KW_PASSWORD.finditer(dsn):
        _remember(found["pw"])
        _remember(_unquoted(found["pw"]))
        # An unquoted password with a space (``password=hunter2 secret``, meant whole):
        # libpq reads its second word as a keyword, and says so.
        meant = _NEXT_KEY.split(dsn[found.start("pw") :], maxsplit=1)[0]
        _remember(meant.strip())


def redact(text: object) -> str:
    """Return *text* with the passwords in it replaced by ``***`` (anything else than a
    string is made one first: ``None`` gives ``'None'``): those of URLs
    (``scheme://user:***@host``), those after a key naming a secret (``password=***``,
    ``sslpassword=***``, ``'password': ***``, ``?access_token=***``, ``?key=***``), and the
    passwords of the DSNs the resources opened with (``remember_secrets``)."""
    if not isinstance(text, str):
        text = str(text)
    for secret in _secrets:
        if isinstance(secret, str):
            if secret in text:
                text = text.replace(secret, "***")
        else:
            text = secret.sub("***", text)
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\g<head>***@", text)
        text = _URL_PASSWORD_SLASH.sub(r"\g<head>***@", text)
        text = _URL_PASSWORD_SPACE.sub(r"\g<head>***@", text)
    if "?" in text:
        text = _QUERY_PASSWORD.sub(r"\g<head>***", text)
    if _KEYS.search(text):
        text = _KW_PASSWORD.sub(r"\g<head>***", text)
        text = _DICT_PASSWORD.sub(r"\g<head>***", text)
        text = _COLON_PASSWORD.sub(r"\g<head>***", text)
    return text


def unstopped(text: str) -> str:
    """*text* without the full stop that ends it, to go on inside a sentence: one period,
    not an ellipsis (``e.g. https://...`` stays whole)."""
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def describe(exc: BaseException) -> str:
    """``TypeName: message`` for *exc*, with passwords redacted."""
    text = str(exc)
    name = type(exc).__name__
    return redact(f"{name}: {text}" if text else name)


# SQLSTATEs no retry mends: the server refused the credentials (class 28: a wrong password,
# a role that does not exist or may not log in) or the database does not exist (3D000).
_FOR_GOOD = ("28", "3D000")

# libpq keeps the SQLSTATE of a connection the server refused to itself, so psycopg's (and
# psycopg2's) error for it has none: the server's message says which it was. PgBouncer
# refuses a client with its own messages, and the SQLSTATE 08P01 (protocol violation) for
# any of them, a wrong password included: asyncpg's error for it is a ProtocolViolationError
# ("SASL authentication failed", "password authentication failed", "no such database: x",
# or the server's 'database "x" does not exist', which PgBouncer passes on as 08P01), and
# psycopg's says "FATAL:  SASL authentication failed". Messages in English (the server's
# lc_messages; PgBouncer's are English only); in another language the refusal is not
# recognised, and the start is retried as for any other failure.
_REFUSALS = (
    (re.compile(r"(?:^|FATAL:\s+)(?:SASL|password) authentication failed"), "28P01"),
    (
        re.compile(r'(?:^|FATAL:\s+)role "[^"]*" (does not exist|is not permitted to log in)'),
        "28000",
    ),
    (re.compile(r"no pg_hba\.conf entry for|pg_hba\.conf rejects connection"), "28000"),
    (re.compile(r'(?:^|FATAL:\s+)database "[^"]*" does not exist'), "3D000"),
    (re.compile(r"(?:^|FATAL:\s+)no such database: "), "3D000"),
)
#: PgBouncer's SQLSTATE for every client it refuses (its ``disconnect_client``).
_PGBOUNCER_REFUSAL = "08P01"


def links(exc: BaseException, *, context: bool = False) -> Iterator[BaseException]:
    """*exc*, then what it wraps, each once: SQLAlchemy's ``orig``, else the cause (else,
    with *context*, the exception it was raised while handling)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            current = orig
        else:
            current = current.__cause__ or (current.__context__ if context else None)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a driver's error carries (asyncpg's and psycopg's ``sqlstate``,
    psycopg2's ``pgcode``), not looking along the chain."""
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None


def sqlstates(exc: BaseException) -> Iterator[str]:
    """The SQLSTATE codes along *exc*'s chain (:func:`links`): a driver's error, or
    SQLAlchemy's wrapping one, and their causes."""
    for link in links(exc):
        code = sqlstate(link)
        if code is not None:
            yield code


def _sqlstate(exc: BaseException) -> str | None:
    """:func:`sqlstate`, or the code of a refusal a driver gives none (PgBouncer's, libpq's
    text: `_REFUSALS`)."""
    state = sqlstate(exc)
    if (state is None and type(exc).__module__.startswith("psycopg")) or (
        state == _PGBOUNCER_REFUSAL
    ):
        text = str(exc).strip()
        for pattern, code in _REFUSALS:
            if pattern.search(text):
                return code
    return state


def refused_for_good(exc: BaseException) -> str | None:
    """The SQLSTATE if *exc* (or what it wraps: a cause, SQLAlchemy's ``orig``) is the
    server refusing the credentials or the database, which retrying cannot mend."""
    for link in links(exc, context=True):
        state = _sqlstate(link)
        if state is not None and state.startswith(_FOR_GOOD):
            return state
    return None


def for_good(exc: _E) -> _E:
    """Mark *exc*, tether's refusal of a value a function gave at open (a DSN function
    returning pydantic's ``SecretStr``), as one no retry mends: the open is not retried."""
    exc.__tether_for_good__ = True  # type: ignore[attr-defined]
    return exc


def marked_for_good(exc: BaseException) -> bool:
    """Whether *exc* was marked by `for_good`."""
    return getattr(exc, "__tether_for_good__", False) is True


def is_seconds(value: object, *, zero: bool = False) -> bool:
    """Whether *value*, as a caller may pass it, is a duration: a number (not a bool, not
    NaN) above 0, or at least 0 with *zero*."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 if zero else value > 0


def _a_type(value: object) -> str:
    """``a str``, ``an int``, ``None``: what *value* is, for a message."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def check_number(
    value: object,
    option: str,
    where: str,
    *,
    integer: bool = False,
    least: int | None = 0,
    above: bool = False,
    none: bool = False,
    example: str = "5",
    need: str | None = None,
) -> None:
    """Refuse an option that is not a number of the right kind and range, as a caller may
    pass it: a TypeError for the wrong type (a string read from the environment, a bool, a
    float where a count is wanted), a ValueError for one out of range, both naming *where*
    (``Resource 'pool'``), the option and the fix. *integer*: a whole number, at least
    *least* (None: any); else seconds, above 0 with *above*, else at least 0. *none*: None is valid.
    *need*: what the message says it must be, if not that."""
    if value is None and none:
        return
    want = need
    if integer:
        need = "a whole number" if least is None else f"{least} or more"
        what = "a whole number"
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        need = "a positive number of seconds" if above else "a number of seconds >= 0"
        what = "a number of seconds"
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    if none:
        need += " (or None)"
    if want is not None:
        need = want
    if not ok_type:
        hint = ""
        if isinstance(value, str):
            convert = "int" if integer else "float"
            hint = (
                f" (a setting read from the environment is a string: convert it with {convert}())"
            )
        msg = (
            f"{where}: {option}={value!r} is {_a_type(value)}, not {what}. Pass {need}, "
            f"e.g. {option}={example}{hint}."
        )
        raise TypeError(msg)
    number: float = value  # type: ignore[assignment]
    if least is None:
        return
    if not (number > 0 if above and not integer else number >= least):
        msg = f"{where}: {option}={value!r} must be {need}."
        raise ValueError(msg)


def check_bool(value: object, option: str, where: str, *, none: bool = False) -> None:
    """Refuse an on/off option that is not a bool, as a caller may pass it: a string read
    from the environment (``"false"`` is true to ``if``), a number. A TypeError naming *where*
    (``Lifecycle()``, ``Resource 'pool'``), the option and the fix. *none*: None is valid."""
    if isinstance(value, bool) or (value is None and none):
        return
    hint = ""
    if isinstance(value, str):
        hint = (
            f" (a setting read from the environment is a string, and {value!r} would count as "
            f'true: convert it, e.g. {option}=os.environ.get(...) == "1")'
        )
    msg = (
        f"{where}: {option}={value!r} is {_a_type(value)}, not a bool. Pass True or False"
        f"{' (or None)' if none else ''}{hint}."
    )
    raise TypeError(msg)


#: SQLSTATEs of a transaction the server rolled back as a whole for a conflict with a
#: concurrent one: serialization_failure (SERIALIZABLE, REPEATABLE READ) and deadlock_detected.
#: Nothing of it was committed, and running it again is the remedy the server asks for.
_CONFLICTS = frozenset({"40001", "40P01"})


def transaction_conflict(exc: BaseException) -> BaseException | None:
    """The error along *exc*'s chain (a driver's, or SQLAlchemy's wrapping one: ``orig``,
    then the causes) saying that the server rolled back the transaction for a conflict with a
    concurrent one (`_CONFLICTS`), or, Redis's, did not run it (redis-py's ``WatchError``: a
    watched key changed before ``EXEC``), if one does."""
    return next(
        (link for link in links(exc) if sqlstate(link) in _CONFLICTS or _watch_error(link)),
        None,
    )


def _watch_error(exc: BaseException) -> bool:
    kind = type(exc)
    return kind.__name__ == "WatchError" and kind.__module__.startswith("redis.")


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The one of *candidates* *word* is most likely a misspelling of, if any (difflib's
    close match): for the "did you mean" of an error."""
    import difflib  # only for an error

    close = difflib.get_close_matches(word, sorted(candidates), n=1)
    return close[0] if close else None


def unknown_keywords(unknown: Iterable[str], known: Iterable[str]) -> tuple[str, str, str]:
    """The words for keyword arguments *unknown* that are not among *known*: each with its
    close match (``pool_recylce= (did you mean pool_recycle=?)``), the verb, and the pronoun
    (``it`` or ``them``)."""
    candidates = list(known)
    hints = []
    for key in unknown:
        close = closest(key, candidates)
        hints.append(f"{key}=" + (f" (did you mean {close}=?)" if close else ""))
    one = len(hints) == 1
    return (
        " and ".join(hints),
        "is not an option" if one else "are not options",
        "it" if one else "them",
    )


def not_options(where: str, unknown: Iterable[str], fn: Callable[..., Any]) -> TypeError:
    """The ``TypeError`` for keyword arguments *unknown* that *where* (``Lifecycle()``, the
    function *fn*, whose ``**unknown: Never`` takes them) does not take, where Python's own
    would not name the one meant: each with its close match among *fn*'s keyword-only
    parameters, and, when one has none, those."""
    import inspect  # only for an error

    params = inspect.signature(fn).parameters.values()
    known = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = list(unknown)
    listed, verb, them = unknown_keywords(unknown, known)
    options = ""
    if any(closest(key, known) is None for key in unknown):
        options = f" (its options: {', '.join(f'{k}=' for k in known)})"
    return TypeError(f"{listed} {verb} of {where}{options}. Fix or remove {them}.")


class TetherError(Exception):
    """Base class of every error tether raises."""


class StartupError(TetherError):
    """An app resource failed to open; the ones already open were closed.

    ``resource`` names the failing resource; ``__cause__`` is the original error.
    """

    def __init__(self, message: str, *, resource: str) -> None:
        super().__init__(message)
        self.resource = resource
        #: The signal that stopped the start (``"SIGTERM"``), if one did.
        self.interrupted_by: str | None = None


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

    The app's own code may raise it: ``raise ResourceUnavailable("the upstream is busy",
    retry_after=5)``; ``resource`` names what could not be had (raised while a resource
    opens, that resource's name when not given).
    """

    def __init__(
        self,
        message: str,
        *,
        resource: str | None = None,
        retry_after: float = 1.0,
        lost: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.resource: str | None = resource
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


class _RedactedTracebacks(logging.Filter):
    """tether's records carry the failure they report (``exc_info``), whose traceback a
    handler prints as it is: a message in it (a driver's, a cleanup's) can hold a DSN's
    password that the record's own message hides. Where it does, the traceback's text is
    made here, redacted, and handlers print that (``record.exc_text``, with logging's own
    formatting; a formatter that reads ``exc_info`` itself, a JSON one, formats its own);
    elsewhere the handler's formatter formats it as usual."""

    _format = staticmethod(logging.Formatter().formatException)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            text = self._format(record.exc_info)
            hidden = redact(text)
            if hidden != text:  # else the handler's own formatter formats it, as it would
                record.exc_text = hidden
        return True


logging.getLogger("tether").addFilter(_RedactedTracebacks())
