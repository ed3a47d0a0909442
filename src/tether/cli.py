"""`tether graph`, `check`, `stats` and `demo`: look at a Lifecycle from the command line.

tether graph myapp.main:lc      # resources, scopes, dependencies, in opening order
tether check myapp.main:lc      # open the app scope, run every check, close; exit 1 if any fails
tether stats http://127.0.0.1:8000/tether/   # a running app's figures, from its dashboard
tether demo                     # serve the reference service (tether.demo) on 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import importlib
import json
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import anyio

from . import _graph
from ._errors import ShutdownError, TetherError, describe, redact
from ._lifecycle import Lifecycle, lifecycle_of_app

__all__ = ["main"]


def load(target: str) -> Lifecycle:
    """Import ``module:attribute`` and return the Lifecycle it names."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        msg = f"{target!r} is not of the form module:attribute (for example myapp.main:lc)."
        raise SystemExit(msg)
    sys.path.insert(0, "")
    # The CLI opens the app's resources in a process of its own, whose figures are not the
    # service's: in prometheus-client's multiprocess mode (the variable set, as in the
    # service's environment) its counters would be written to the service's directory, and
    # added to what the service reports (a cron check, a new set of files each run).
    for variable in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        os.environ.pop(variable, None)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"Cannot import {module_name!r}: {describe(exc)}."
        raise SystemExit(msg) from None
    obj: Any = module
    missing = object()
    for part in attr.split("."):
        obj = getattr(obj, part, missing)
        if obj is missing:
            msg = f"{module_name!r} has no attribute {attr!r}."
            raise SystemExit(msg)
    if not isinstance(obj, Lifecycle):
        found = lifecycle_of_app(obj)  # an app whose lifespan is a Lifecycle's
        if found is not None:
            return found
        kind = "None" if obj is None else f"of type {type(obj).__name__}"
        msg = (
            f"{target!r} is {kind}, not a tether.Lifecycle nor an app whose lifespan is one "
            f"(FastAPI(lifespan=lc.lifespan)): name the Lifecycle."
        )
        raise SystemExit(msg)
    return obj


def graph(lc: Lifecycle, *, as_json: bool) -> int:
    try:
        lc.validate()
    except TetherError as exc:  # a cycle, a parameter naming no resource: said, not traced
        print(_plain(f"tether: {describe(exc)}"), file=sys.stderr)
        return 1
    app = _graph.app_order(lc._resources, lc._overrides)
    rows = [
        {"name": r.name, "scope": r.scope, "depends_on": [d.name for d in r.deps]}
        for r in [*app, *_request_order(lc)]
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        deps = ", ".join(row["depends_on"]) or "-"
        print(f"{row['scope']:8} {row['name']:24} <- {deps}")
    return 0


def _request_order(lc: Lifecycle) -> list[Any]:
    """The request resources in an order they can open in: each after those it depends
    on, in the order of registration otherwise."""
    order: list[Any] = []
    seen: set[Any] = set()

    def visit(res: Any) -> None:
        if res not in seen:
            seen.add(res)
            for dep in res.deps:
                if dep.scope == "request":
                    visit(dep)
            order.append(res)

    for res in lc._resources.values():
        if res.scope == "request":
            visit(res)
    return order


async def _check(lc: Lifecycle, closing: list[ShutdownError]) -> dict[str, Any]:
    report: dict[str, Any] | None = None
    try:
        async with lc.run():
            report = (await lc.health()).as_dict()
    except ShutdownError as exc:  # the checks ran: their report is kept, the failure said
        if report is None:
            raise
        closing.append(exc)
    assert report is not None
    return report


def check(lc: Lifecycle, *, as_json: bool) -> int:
    closing: list[ShutdownError] = []
    try:
        report = anyio.run(_check, lc, closing)
    except KeyboardInterrupt:
        # ^C: asyncio cancelled the run, so what had opened was closed on the way out.
        print("tether check: interrupted (^C); what it had opened is closed", file=sys.stderr)
        return 130
    except TetherError as exc:
        if as_json:  # a report all the same, for what reads stdout
            print(json.dumps({"status": "error", "error": describe(exc)}, indent=2))
        print(_plain(f"tether: {describe(exc)}"), file=sys.stderr)
        return 1
    for failure in closing:
        print(_plain(f"tether: {describe(failure)}"), file=sys.stderr)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for name, result in report["checks"].items():
            said = result.get("error") or result.get("detail")
            error = f"  {said}" if said else ""
            line = f"{result['status']:8} {name:24} {result['latency_ms']:8.1f} ms{error}"
            print(_plain(line.replace("\n", " ")))
        failing = sum(r["status"] != "ok" for r in report["checks"].values())
        total = len(report["checks"])
        if report["status"] == "ok":
            print(f"ok: {total} check{'s' if total != 1 else ''} passed")
        else:  # what /health/ready answers with a 503
            print(f"{report['status']}: {failing} of {total} checks failed (readiness: 503)")
    return 0 if report["status"] == "ok" and not closing else 1


def stats_url(url: str) -> str:
    """The stats JSON of a dashboard named by its page's URL (or by the JSON's own), its
    query kept (a dashboard guarded by ``?token=``), its fragment dropped."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a URL: `fetch_stats` says so
        return url
    path = parts.path
    if not path.endswith(".json"):
        path = path.rstrip("/") + "/stats.json"
    return urllib.parse.urlunsplit(parts._replace(path=path, fragment=""))


def _ambiguous(url: str) -> bool:
    """Whether *url* (as given) has a user and password and may mean another host than
    parsers read: an ``@`` after a ``/``, ``?`` or ``#`` that follows the user and password
    (``http://user:p@ss/word@host/``, ``http://admin:s3cr@t?42@host``). Every parser ends the
    password at the first ``@`` before them (urllib reads host ``ss``, or ``t``), where the
    user may have meant the host after the last ``@``: the password's first piece would go
    to the wrong host. An ``@`` in a query or a path (``?email=ops@example.com``) cannot be
    told from one, and is refused too, with the fix (percent-encode it). Several ``@``
    before the first ``/`` are read right (the last one ends the password)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return False
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    if "@" not in rest[: min(ends, default=len(rest))]:
        return False  # no user or password
    before = rest.rpartition("@")[0]
    return any(c in before for c in "/?#")


#: The control characters of a text from an app (an error's message: a remote one for
#: `tether stats`), but a newline: escaped as the CLI prints them, so that none moves the
#: cursor (a carriage return printing "ok" over a failing check), clears the screen or sets
#: the terminal's title.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _plain(text: str) -> str:
    """*text* with its control characters escaped (`_CONTROL`): ``\x1b`` shown as such."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _shown(url: str) -> str:
    """*url* as messages show it: redacted; an ambiguous one (`_ambiguous`) from its last
    ``@`` on, as nobody can tell where its password ends."""
    if _ambiguous(url):
        scheme, _, rest = url.partition("://")
        return redact(f"{scheme}://***@{rest.rpartition('@')[2]}")
    return redact(url)


# What a URL may hold as it is (RFC 3986's reserved and unreserved characters, and `%`).
_URL_SAFE = ":/?#[]@!$&'()*+,;=%-._~"

_ENCODE = (
    "Percent-encode an '@' in the user or password as %40, and a '/', '?' or '#' as %2F, "
    "%3F or %23 (http://user:p%40ss%2Fword@host:8000/tether/), and an '@' in the path or "
    "query as %40."
)


class _ConfigError(SystemExit):
    """A ``tether stats`` argument that no retry can make work."""


def fetch_stats(url: str, headers: Sequence[str] = (), timeout: float = 5.0) -> dict[str, Any]:
    """Read a running app's dashboard JSON; a clear ``SystemExit`` when that fails."""
    example = "http://127.0.0.1:8000/tether/"
    shown = _shown(url)
    ambiguous = _ambiguous(url)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not one
    except ValueError as exc:
        fix = _ENCODE if ambiguous else f"Give the dashboard's, e.g. {example}"
        msg = f"tether stats: {shown!r} is not a URL ({exc}). {fix}"
        raise _ConfigError(msg) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _ConfigError(_not_http(url))
    if ambiguous:
        # http://user:p@ss/word@host/: urllib reads host 'ss' and would send the password's
        # first piece to it as Basic auth.
        msg = f"tether stats: {shown!r}: where its user and password end is ambiguous. {_ENCODE}"
        raise _ConfigError(msg)
    basic = None
    if parts.username is not None or parts.password is not None:
        # http://user:password@host/: sent as Basic auth (urllib does not), never shown.
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        netloc = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    # A host name outside ASCII (http://пример.рф/) sent IDNA-encoded, as a browser does: a
    # percent-encoded one urllib decodes again, and http.client's Host header refuses it.
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not host.isascii():
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            msg = f"tether stats: {shown!r}: its host {host!r} is not a valid name ({exc})."
            raise _ConfigError(msg) from None
        port = f":{parts.port}" if parts.port is not None else ""
        url = urllib.parse.urlunsplit(parts._replace(netloc=ascii_host + port))
    # Characters outside ASCII (a path or a token that holds one) sent percent-encoded, as a
    # browser does: http.client refuses them (a UnicodeEncodeError), and a space (InvalidURL).
    url = urllib.parse.quote(url, safe=_URL_SAFE)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if basic is not None:
        request.add_header("Authorization", f"Basic {basic}")  # a --header one replaces it
    shown = _shown(url)
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            msg = f"--header {header!r} is not of the form 'Name: value' (e.g. 'X-Token: abc')."
            raise _ConfigError(msg)
        if any(c in header for c in "\r\n"):
            msg = (
                f"--header {header!r}: a header's name and value cannot hold a line break; "
                f"pass each header with a --header of its own."
            )
            raise _ConfigError(msg)
        try:
            value.strip().encode("latin-1")
        except UnicodeEncodeError:
            msg = (
                f"--header {header!r}: an HTTP header's value must be Latin-1 text; encode "
                f"it (e.g. percent- or base64-encoded) as the app expects."
            )
            raise _ConfigError(msg) from None
        request.add_header(name.strip(), value.strip())
    fix = "Is the app running, and does it include tether.fastapi.dashboard_router(lc)?"
    try:
        body = _within(timeout, request)
    except urllib.error.HTTPError as exc:
        exc.close()  # its answer's socket (read in another thread, so not freed with it)
        if exc.code in (401, 403) and basic is not None:
            fix = (
                "The dashboard refused the URL's user and password (sent as Basic auth): "
                "check them, or pass what it expects with --header 'Name: value'."
            )
        elif exc.code in (401, 403):
            fix = "The dashboard is guarded: pass what it expects with --header 'Name: value'."
        elif exc.code == 404:
            fix = (
                "Include tether.fastapi.dashboard_router(lc) in the app, and give the URL of "
                "its page (http://HOST:PORT/tether/ by default)."
            )
        msg = f"tether stats: {shown} answered {exc.code} {exc.reason}. {fix}"
        raise SystemExit(msg) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        msg = f"tether stats: cannot read {shown}: {reason}. {fix}"
        raise SystemExit(msg) from None
    except http.client.IncompleteRead as exc:  # the server closed the connection mid-answer
        read = f"{len(exc.partial)} bytes read"
        said = f"{read}, {exc.expected} more expected" if exc.expected else read
        msg = (
            f"tether stats: {shown} cut its answer short ({said}): a proxy or the app ended "
            f"the connection. {fix}"
        )
        raise SystemExit(msg) from None
    except http.client.HTTPException as exc:  # not HTTP
        said = type(exc).__name__ + (f" {str(exc).strip()!r}" if str(exc).strip() else "")
        msg = f"tether stats: {shown} did not answer as an HTTP server ({said}). {fix}"
        raise SystemExit(msg) from None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not {"state", "units", "resources", "in_flight"} <= set(data):
        raise SystemExit(_not_a_dashboard(shown))
    return data


def _opener(sockets: list[socket.socket]) -> urllib.request.OpenerDirector:
    """urllib's opener, noting in *sockets* each socket it connects (to be shut down from
    another thread when the answer is given up on: `_within`)."""

    def noting(connection_class: Any) -> Any:
        class Noted(connection_class):  # type: ignore[misc]
            def connect(self) -> None:
                super().connect()
                sockets.append(self.sock)

        return Noted

    class HTTP(urllib.request.HTTPHandler):
        def do_open(self, http_class: Any, req: Any, **kw: Any) -> Any:
            return super().do_open(noting(http_class), req, **kw)

    class HTTPS(urllib.request.HTTPSHandler):
        def do_open(self, http_class: Any, req: Any, **kw: Any) -> Any:
            return super().do_open(noting(http_class), req, **kw)

    return urllib.request.build_opener(HTTP, HTTPS)


def _read(
    request: urllib.request.Request, timeout: float, deadline: float, sockets: list[socket.socket]
) -> bytes:
    with _opener(sockets).open(request, timeout=timeout) as response:
        chunks: list[bytes] = []
        try:
            while chunk := response.read1(65536):
                chunks.append(chunk)
                if time.monotonic() > deadline:  # its reader has given up: stop reading
                    raise TimeoutError(f"its answer did not end within {timeout:g} s")
        except http.client.IncompleteRead as exc:  # a chunked answer cut short
            raise http.client.IncompleteRead(b"".join(chunks) + exc.partial, exc.expected) from None
        body = b"".join(chunks)
        if response.length:  # the connection ended before the Content-Length it announced
            raise http.client.IncompleteRead(body, response.length)
        return body


def _within(timeout: float, request: urllib.request.Request) -> bytes:
    """The answer to *request*, headers and body, within *timeout* seconds in all: urllib's
    timeout bounds each socket read, and a server that trickles its answer a byte a second
    would hold the command for as long as it likes. Read in a thread of its own; at the
    deadline its socket is shut down, so that the thread ends at once (under ``--watch``, a
    thread and a socket left per read that timed out would pile up); its exception raised
    here."""
    deadline = time.monotonic() + timeout
    done: list[bytes] = []
    failed: list[BaseException] = []
    sockets: list[socket.socket] = []

    def read() -> None:
        try:
            done.append(_read(request, timeout, deadline, sockets))
        except BaseException as exc:  # raised in the caller's thread
            failed.append(exc)

    reader = threading.Thread(target=read, name="tether-stats-read", daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        reader.join(1.0)  # ends at its next read, on the shut socket
        raise TimeoutError(f"its answer did not end within {timeout:g} s")
    if failed:
        raise failed[0]
    return done[0]


def _not_a_dashboard(shown: str) -> str:
    return (
        f"tether stats: {shown} did not answer with a tether dashboard's JSON. Is the app "
        f"running, and does it include tether.fastapi.dashboard_router(lc)?"
    )


def _process(data: dict[str, Any]) -> str | None:
    """The process that answered a read (``pid 1234 on web-1``), if the dashboard says."""
    if data.get("pid") is None:  # an older tether's dashboard does not say
        return None
    return f"pid {data['pid']}" + (f" on {data['host']}" if data.get("host") else "")


def render_stats(data: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """The dashboard's figures as a plain-text table; *previous*, the read before it (under
    ``--watch``): a read answered by another process (another worker, a restart) says so,
    as its figures are its own, not the last ones moved on."""
    units = data["units"]
    process = _process(data)
    lines = [
        f"{data['state']}: {units['in_flight']} in flight, {units['total']} started, "
        f"{units['refused']} refused" + (f" ({process})" if process else ""),
    ]
    was = None if previous is None else _process(previous)
    if process and was and was != process:
        if previous and data.get("host") == previous.get("host"):
            was = f"pid {previous['pid']}"  # the same host: its pid says it
        lines.append(
            f"another process answered: {process}, was {was}; each worker (and each "
            f"restart) has its own figures"
        )
    lines += [
        "",
        f"{'resource':20} {'scope':8} {'in use':>6} {'max':>5} {'opened':>8} {'closed':>8} "
        f"{'errors':>6} {'timeouts':>8} {'leaks':>5} {'wait ms mean/max':>17} "
        f"{'hold ms mean/max':>17}",
    ]
    for r in data["resources"]:
        errors = r["open_errors"] + r["close_errors"]
        wait = f"{r['mean_wait_ms']:.2f}/{r['max_wait_ms']:.2f}"
        hold = f"{r['mean_hold_ms']:.2f}/{r['max_hold_ms']:.2f}"
        lines.append(
            f"{r['name']:20} {r['scope']:8} {r['in_use']:>6} {r['max_in_use']:>5} "
            f"{r['opened']:>8} {r['closed']:>8} {errors:>6} {r['timeouts']:>8} "
            f"{r['leaks']:>5} {wait:>17} {hold:>17}"
        )
    for r in data["resources"]:
        if r.get("down"):
            lines.append(f"DOWN {r['name']}: {r['down']}")
    if data.get("pools"):
        lines += [
            "",
            f"{'pool':20} {'max':>5} {'open':>5} {'in use':>6} {'idle':>5} {'waiting':>7} "
            f"{'made':>5} {'discarded':>9}",
        ]

    def figure(n: int | None) -> str:
        return "-" if n is None else str(n)

    for p in data.get("pools", ()):
        lines.append(
            f"{p['name']:20} {figure(p['max']):>5} {figure(p['open']):>5} "
            f"{figure(p['in_use']):>6} {figure(p['idle']):>5} {figure(p['waiting']):>7} "
            f"{figure(p.get('created')):>5} {figure(p.get('discarded')):>9}"
        )
    if data["in_flight"]:
        lines += ["", "in flight, oldest first:"]
    for unit in data["in_flight"]:
        held = ", ".join(
            f"{h['resource']} {h['held_s']:.1f} s" + (" (leak)" if h["leak"] else "")
            for h in unit["holding"]
        )
        lines.append(f"  {unit['label']:30} {unit['age_s']:7.1f} s  {held or 'nothing open'}")
    return "\n".join(lines)


def _not_http(url: str) -> str:
    return (
        f"tether stats: {redact(repr(url))} is not an http:// or https:// URL. Give the "
        f"dashboard's with its scheme, e.g. http://127.0.0.1:8000/tether/"
    )


def stats(url: str, *, headers: Sequence[str], as_json: bool, watch: float | None) -> int:
    if _ambiguous(url):  # as given: `stats_url` drops a fragment, which may hold a password's end
        msg = f"tether stats: {_shown(url)!r}: where its user and password end is ambiguous. "
        raise _ConfigError(msg + _ENCODE)
    with contextlib.suppress(ValueError):  # (said by `fetch_stats`)
        typed = urllib.parse.urlsplit(url)
        if typed.scheme not in ("http", "https") or not typed.hostname:
            raise _ConfigError(_not_http(url))  # as typed, not with /stats.json added
    url = stats_url(url)
    read = False
    previous: dict[str, Any] | None = None
    try:
        while True:
            try:
                data = fetch_stats(url, headers)
            except _ConfigError:
                raise
            except SystemExit as exc:
                # Watching an app that answered once: a failed read (a restart, a deploy) is
                # said and tried again, until ^C. A first read that fails is a wrong URL or app.
                if watch is None or not read:
                    raise
                print(_plain(str(exc.code)), file=sys.stderr, flush=True)
                time.sleep(watch)
                continue
            if as_json:
                print(json.dumps(data, indent=2), flush=True)
            else:
                try:
                    table = render_stats(data, previous)
                except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                    # The keys, not their shape (another tool's JSON): said, not traced.
                    raise SystemExit(_not_a_dashboard(_shown(url))) from None
                print(_plain(table), flush=True)
            read, previous = True, data
            if watch is None:
                return 0
            time.sleep(watch)
            print(flush=True)
    except KeyboardInterrupt:
        # ^C ends --watch once it printed, as its help says. Before that, and during a single
        # read, nothing was printed: a script sees it interrupted (130, as a shell says).
        return 0 if read and watch is not None else 130


DEMO_NEEDS = "pip install 'tether[demo]'"


def demo(*, host: str, port: int, db: str) -> int:
    """Serve the reference service (`tether.demo`) with uvicorn until ^C or SIGTERM."""
    try:
        import uvicorn

        from . import demo as service
    except ImportError as exc:
        missing = exc.name or describe(exc)
        msg = (
            f"tether demo: the reference service needs FastAPI, aiosqlite and uvicorn, and "
            f"{missing!r} is not installed. Install them with: {DEMO_NEEDS}"
        )
        raise SystemExit(msg) from None
    path = os.path.abspath(db)
    folder = os.path.dirname(path)
    problem = None
    if os.path.isdir(path):
        problem = f"{path} is a directory"
    elif os.path.exists(folder) and not os.path.isdir(folder):
        problem = f"{folder} is not a directory"
    else:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            problem = f"cannot create the directory {folder}: {exc.strerror or describe(exc)}"
        else:
            try:  # SQLite takes an empty file for a new database
                with open(path, "ab"):
                    pass
            except OSError as exc:
                problem = f"cannot write {path}: {exc.strerror or describe(exc)}"
    if problem:
        msg = (
            f"tether demo: --db {db}: {problem}. "
            "Give --db the path of a file in a directory you can write to."
        )
        raise SystemExit(msg)
    os.environ["NOTES_DB"] = path  # read by the service when it starts
    base = f"http://{host}:{port}"
    print(
        f"tether demo: the notes API at {base}/notes, tether's dashboard at {base}/tether/,\n"
        f"readiness at {base}/health/ready; notes kept in {path}. ^C stops it.",
        flush=True,
    )
    uvicorn.run(service.app, host=host, port=port)
    return 0


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 < value < 65536:
        msg = f"{text!r} is not a TCP port (1 to 65535)"
        raise argparse.ArgumentTypeError(msg)
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        msg = f"{text!r} is not a positive number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return value


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tether {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("graph", "print the resources in opening order with their dependencies"),
        ("check", "open the app scope, run every check, close it; exit 1 if one fails"),
    ]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("target", help="module:attribute naming a tether.Lifecycle")
        cmd.add_argument("--json", action="store_true", help="print JSON")
    cmd = sub.add_parser("stats", help="print a running app's figures, read from its dashboard")
    cmd.add_argument("url", help="the dashboard's URL, e.g. http://127.0.0.1:8000/tether/")
    cmd.add_argument("--json", action="store_true", help="print the JSON as read")
    cmd.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a header to send (repeatable), for a guarded dashboard",
    )
    cmd.add_argument(
        "--watch", type=_seconds, metavar="SECONDS", help="print again every SECONDS, until ^C"
    )
    cmd = sub.add_parser(
        "demo", help="serve the reference service: a notes API on SQLite, with tether's dashboard"
    )
    cmd.add_argument("--host", default="127.0.0.1", help="the address to listen on (127.0.0.1)")
    cmd.add_argument("--port", type=_port, default=8000, help="the port to listen on (8000)")
    cmd.add_argument(
        "--db",
        default=os.path.join(".demo", "notes.db"),
        metavar="PATH",
        help="the SQLite file that keeps the notes, created if missing (.demo/notes.db)",
    )
    for stream in (sys.stdout, sys.stderr):
        # A name the terminal's encoding cannot show (a resource 'café' under
        # PYTHONIOENCODING=ascii) is printed escaped, not a UnicodeEncodeError traceback.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # `tether stats --watch 2 URL | head -1`: the reader has gone, which is no error of
        # ours. Nothing more is written (nor flushed at exit into the closed pipe), and the
        # status is a process's that SIGPIPE ended, as `cat` in the same pipeline.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout not a file (called in-process)
            pass
        return 141


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return demo(host=args.host, port=args.port, db=args.db)
    if args.command == "stats":
        try:
            return stats(args.url, headers=args.header, as_json=args.json, watch=args.watch)
        except KeyboardInterrupt:  # ^C before its first read started
            return 130
    lc = load(args.target)
    if args.command == "graph":
        return graph(lc, as_json=args.json)
    return check(lc, as_json=args.json)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
