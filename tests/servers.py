"""Throwaway PostgreSQL, Redis and PgBouncer servers for integration tests and benchmarks.

Each class starts a private server on a free port of 127.0.0.1 (never any other address),
in its own ``tempfile.mkdtemp()`` directory, and removes that directory again on ``stop()``
(set ``TETHER_KEEP_SERVERS=1`` to keep it, e.g. to read the server logs). Every class is a
context manager, and every running server is also stopped at interpreter exit and on
SIGTERM/SIGHUP, so an interrupted test run or benchmark leaves nothing behind::

    with Postgres() as pg, Redis() as rd, PgBouncer(pg) as bouncer:
        pg.sql("SELECT 1")          # [(1,)]
        pg.dsn                      # postgresql://tether:s3cret-pw@127.0.0.1:PORT/tether
        bouncer.dsn                 # same user/password/database, through PgBouncer
        rd.url                      # redis://127.0.0.1:PORT/0

The binaries come from Debian packages (postgresql, redis-server, pgbouncer); a missing one
raises ``ServerError`` (a ``RuntimeError``) naming the package, never a silent skip.
``bash scripts/system-deps.sh`` installs them. PostgreSQL and PgBouncer refuse to run as
root: as root they run as the system user ``tetherpg`` (created on first use).

This module imports nothing outside the standard library at import time; ``psycopg`` is
imported by the helpers that query PostgreSQL (``sql()``, ``activity()``, ...).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import quote

__all__ = [
    "HOST",
    "KEEP_ENV",
    "PG_DATABASE",
    "PG_PASSWORD",
    "PG_USER",
    "RUN_AS_USER",
    "START_TIMEOUT",
    "PgBouncer",
    "Postgres",
    "Redis",
    "ServerError",
    "dead_port",
    "free_port",
    "stop_all",
]

HOST = "127.0.0.1"
PG_USER = "tether"
PG_PASSWORD = "s3cret-pw"
PG_DATABASE = "tether"
#: bootstrap superuser of the cluster, used by the admin helpers (trust auth, no password)
PG_ADMIN_USER = "postgres"
#: application_name of the helpers' own connections (never reported by ``activity()``)
ADMIN_APPLICATION_NAME = "tether-servers-admin"
#: application_name of the PgBouncer start-up check (its server connection keeps it)
BOUNCER_CHECK_NAME = "tether-servers-pgbouncer-check"
#: the unprivileged user PostgreSQL and PgBouncer run as when we are root
RUN_AS_USER = "tetherpg"
#: seconds a server may take to become ready
START_TIMEOUT = 30.0
#: set to 1 to keep the servers' temp directories (data, logs) after stop()
KEEP_ENV = "TETHER_KEEP_SERVERS"
#: override the directory holding initdb/pg_ctl/postgres
PG_BINDIR_ENV = "TETHER_PG_BINDIR"

_DEPS_HINT = "`bash scripts/system-deps.sh` installs it (as root)"


class ServerError(RuntimeError):
    """A throwaway server could not be found, started or stopped."""


# ---------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now.

    Only right now: another process (a server of another test, an outgoing connection) may
    take it before it is used. A server started on it must start again on another one when
    its bind fails with "address already in use" (as the classes here and
    ``tests.serving.Server`` do); a port where nothing must listen is ``dead_port()``'s."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def dead_port(*, reuse_port: bool = False) -> Iterator[int]:
    """A TCP port on 127.0.0.1 where nothing listens while the block runs: a connection
    there is refused at once (ECONNREFUSED).

    A socket stays bound to the port, never listening: Linux refuses a connection to it, no
    other socket can bind the port (a server of another test given it by ``free_port()``
    fails with "address already in use" and tries another) and no outgoing connection gets
    it as its own port. With ``free_port()`` instead, a server of another test could take
    the port meanwhile, and the test would see that server's answer, not a refusal.

    ``reuse_port=True`` lets a server of this process listen there in between (it must bind
    with SO_REUSEPORT, e.g. a socketserver with ``allow_reuse_port = True``): the port stays
    the test's while that server stops and starts again, refused while it is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, 0))  # bound, never listen()ed
        port: int = sock.getsockname()[1]
        yield port


def _keep_dirs() -> bool:
    return os.environ.get(KEEP_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_binary(name: str, package: str, dirs: Iterable[Path | str] = ()) -> str:
    for directory in dirs:
        candidate = Path(directory, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if found:
        return found
    raise ServerError(f"{name} not found: install the Debian package {package!r} ({_DEPS_HINT})")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def _pg_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (newest Debian version first)."""
    needed = ("initdb", "pg_ctl", "postgres")
    candidates: list[Path] = []
    if os.environ.get(PG_BINDIR_ENV):
        candidates.append(Path(os.environ[PG_BINDIR_ENV]))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in needed):
            return directory
    raise ServerError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
        f"/usr/lib/postgresql/*/bin nor on PATH (or ${PG_BINDIR_ENV}): install the Debian "
        f"package 'postgresql' ({_DEPS_HINT})"
    )


_user_lock = threading.Lock()


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """Create the system user ``name`` once (idempotent, also across processes)."""
    with _user_lock:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        useradd = _find_binary("useradd", "passwd")
        result = subprocess.run(
            [
                useradd,
                "--system",
                "--no-create-home",
                "--user-group",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        try:  # another process may have won the race: that is fine too
            return pwd.getpwnam(name)
        except KeyError:
            raise ServerError(
                f"could not create the system user {name!r} to run PostgreSQL/PgBouncer "
                f"(they refuse to run as root): {result.stderr.strip()}"
            ) from None


def _service_account() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL/PgBouncer: ``RUN_AS_USER`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    return _ensure_system_user(RUN_AS_USER)


def _as_user(account: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess keyword arguments that run the child as ``account``."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _child_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "LC_")) and key not in {"LANG", "LANGUAGE"}
    }
    env.update(HOME=str(home), LC_ALL="C", LANG="C")
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def _traversable_by_others(path: Path) -> bool:
    path = path.resolve()
    for part in (path, *path.parents):
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _make_tempdir(prefix: str, account: pwd.struct_passwd | None) -> Path:
    parent = Path(tempfile.gettempdir())
    if account is not None and not _traversable_by_others(parent):
        parent = Path("/tmp")  # the service user must be able to reach its directory
    # PostgreSQL's socket, <directory>/.s.PGSQL.<port>, must fit in 107 bytes: a long TMPDIR
    # (a CI runner's build directory) stopped it at startup ("Unix-domain socket path is too
    # long").
    if len(str(parent)) > 64:
        parent = Path("/tmp")
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if account is not None:
        os.chown(directory, account.pw_uid, account.pw_gid)
    return directory


def _chown(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return "(no log)"
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(log {path} is empty)"


def _port_in_use(log_text: str) -> bool:
    return any(
        marker in log_text
        for marker in ("Address already in use", "could not bind", "could not create listen")
    )


def _wait_for(
    check: Callable[[], bool],
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    interval: float = 0.05,
) -> bool:
    """Poll ``check`` until it is true (True), the deadline passes or ``alive`` is false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except Exception:
            pass
        if not alive() or time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _pg_url(scheme: str, port: int, database: str | None, *, no_tls_probe: bool = False) -> str:
    """The URL of the test server (or of a proxy in front of it, on *port*).

    *no_tls_probe*: tell the client not to ask for TLS first (the server has none). With
    asyncpg's default, ``sslmode=prefer``, a connect that a timeout cancels just after its TCP
    connect leaves the future of asyncpg's TLS probe holding "unexpected connection_lost()
    call", never retrieved, and asyncio logs it with a traceback (``tests/conftest.py`` keeps
    it from failing an in-process test; in the soak's server log it would read as a stray
    traceback). Tests whose connects time out on purpose (a proxy dropping packets) set this.
    """
    url = (
        f"{scheme}://{quote(PG_USER, safe='')}:{quote(PG_PASSWORD, safe='')}"
        f"@{HOST}:{port}/{quote(database or PG_DATABASE, safe='')}"
    )
    if no_tls_probe:  # SQLAlchemy passes its URL's query to asyncpg.connect as arguments
        url += "?ssl=disable" if scheme.endswith("+asyncpg") else "?sslmode=disable"
    return url


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# registry: stop whatever is still running at exit or on SIGTERM/SIGHUP

_live: list[_Server] = []
_live_lock = threading.RLock()
_handlers_installed = False
_owner_pid = os.getpid()


def stop_all() -> None:
    """Stop every server of this process that is still running, newest first."""
    if os.getpid() != _owner_pid:
        return  # a forked child exiting: the servers belong to the parent
    with _live_lock:
        servers = list(reversed(_live))
    for server in servers:
        try:
            server.stop()
        except Exception as exc:
            print(f"tests/servers.py: stopping {server!r} failed: {exc}", file=sys.stderr)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    stop_all()
    # then die of the signal as if we had not caught it
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _handlers_installed, _owner_pid
    if _handlers_installed:
        return
    _handlers_installed = True
    _owner_pid = os.getpid()
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        # only where nobody else handles the signal (pytest, uvicorn, ... keep theirs)
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _on_signal)


def _register(server: _Server) -> None:
    with _live_lock:
        _install_handlers()
        if server not in _live:
            _live.append(server)


def _unregister(server: _Server) -> None:
    with _live_lock:
        if server in _live:
            _live.remove(server)


class _PgAddress:
    """The connection parameters of a PostgreSQL endpoint on ``self.port`` (the server, or
    PgBouncer in front of it): the same user, password and database for both."""

    port: int

    @property
    def user(self) -> str:
        return PG_USER

    @property
    def password(self) -> str:
        return PG_PASSWORD

    @property
    def database(self) -> str:
        return PG_DATABASE

    @property
    def dsn(self) -> str:
        """``postgresql://tether:s3cret-pw@127.0.0.1:PORT/tether``"""
        return self.url()

    def url(self, scheme: str = "postgresql", *, database: str | None = None) -> str:
        """The DSN with another scheme, e.g. ``url("postgresql+asyncpg")`` for SQLAlchemy."""
        return _pg_url(scheme, self.port, database)


class _Server:
    """Common part: temp directory, context manager, registry."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._port: int | None = None
        self._lock = threading.RLock()

    # context manager -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # to implement ------------------------------------------------------------------------------
    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    # shared ------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServerError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def directory(self) -> Path:
        """The server's temp directory (data, config, logs)."""
        if self._dir is None:
            raise ServerError(f"{type(self).__name__} is not started")
        return self._dir

    def _remove_dir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is None:
            return
        if _keep_dirs():
            print(f"tests/servers.py: kept {type(self).__name__} dir {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {HOST}:{self._port} dir={self._dir}>"


class _ProcessServer(_Server):
    """A server that runs in the foreground as our child process."""

    _log_name = "server.log"

    def __init__(self) -> None:
        super().__init__()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / self._log_name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(
        self, argv: Sequence[str], *, account: pwd.struct_passwd | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=_child_env(self.directory),
                **_as_user(account),
            )

    def _read_log(self, offset: int) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as fh:
            fh.seek(offset)
            return fh.read()
        return ""

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _launch(
        self,
        what: str,
        argv: Callable[[], Sequence[str]],
        ready: Callable[[], bool],
        *,
        account: pwd.struct_passwd | None = None,
    ) -> None:
        """Start on a free port; if another process took that port meanwhile, try another
        (three tries). On failure, stop and raise ServerError with the log's tail."""
        _register(self)
        try:
            for attempt in range(3):
                self._port = free_port()
                offset = self.log_path.stat().st_size if self.log_path.exists() else 0
                self._proc = self._spawn(argv(), account=account)
                if _wait_for(ready, timeout=START_TIMEOUT, alive=self._alive):
                    return
                log = self._read_log(offset)
                self._terminate()
                if attempt < 2 and _port_in_use(log):
                    continue
                raise ServerError(
                    f"{what} did not start on {HOST}:{self._port}\n"
                    f"--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        with self._lock:
            try:
                # SIGTERM: redis and pgbouncer close their clients at once and exit
                self._terminate(signal.SIGTERM)
            finally:
                _unregister(self)
                self._remove_dir()
                self._port = None

    def _terminate(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            proc.wait()


# ---------------------------------------------------------------------------------------------
# PostgreSQL


class Postgres(_PgAddress, _Server):
    """A fresh PostgreSQL cluster (initdb) on a free 127.0.0.1 port.

    Trust authentication for 127.0.0.1 by default (``auth="scram-sha-256"`` makes the
    ``tether`` role's password required); the role ``tether`` (superuser, password
    ``s3cret-pw``) owns the database ``tether``. Durability is off (fsync, full page
    writes, synchronous commit) for speed.
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        auth: str = "trust",
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        super().__init__()
        if auth not in {"trust", "scram-sha-256", "md5", "password"}:
            raise ValueError(f"unsupported auth method {auth!r}")
        self.max_connections = max_connections
        self.auth = auth
        self.settings: dict[str, str | int] = dict(settings or {})
        self._account: pwd.struct_passwd | None = None
        self._bindir: Path | None = None
        self._running = False

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def running(self) -> bool:
        return self._running

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Self:
        """initdb (first time only), start, wait until it accepts connections."""
        with self._lock:
            if self._running:
                return self
            _register(self)
            try:
                if self._dir is None:
                    self._init_cluster()
                self._start_server()
                self._running = True
                self._wait_ready()
                self._bootstrap()
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Fast shutdown, then remove the directory (unless TETHER_KEEP_SERVERS=1)."""
        with self._lock:
            try:
                if self._dir is not None and self._running:
                    result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30", check=False)
                    if result.returncode != 0 and self._pg_ctl_running():
                        self._pg_ctl("stop", "-m", "immediate", "-w", check=False)
            finally:
                self._running = False
                _unregister(self)
                self._remove_dir()
                self._port = None

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, then it accepts new ones."""
        with self._lock:
            self._require_dir()
            result = self._pg_ctl(
                "restart", "-m", "fast", "-w", "-t", str(int(START_TIMEOUT)),
                "-l", str(self.log_path),
                check=False,
            )  # fmt: skip
            self._running = self._pg_ctl_running()
            if result.returncode != 0:
                raise ServerError(self._failure("restart failed", result))
            self._wait_ready()

    def kill(self) -> None:
        """Immediate shutdown (no clean checkpoint, like a crash); the data is kept, so
        ``start()`` brings the same cluster back (after crash recovery)."""
        with self._lock:
            if self._dir is None or not self._running:
                return
            self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "30", check=False)
            self._running = self._pg_ctl_running()

    # helpers for tests -------------------------------------------------------------------------
    def sql(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        database: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the bootstrap superuser (autocommit); its rows, or []."""
        import psycopg

        with (
            psycopg.connect(self._admin_conninfo(database), autocommit=True) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def activity(self, application_name: str | None = None) -> list[dict[str, Any]]:
        """pg_stat_activity rows (pid, state, query, backend_start, application_name,
        usename, datname, ...) of the client backends with this application_name (all
        client backends if None), without the helpers' own connections."""
        import psycopg
        from psycopg.rows import dict_row

        query = """
            SELECT pid, state, query, backend_start, xact_start, state_change,
                   application_name, usename, datname, client_addr, client_port,
                   wait_event_type, wait_event, backend_type
            FROM pg_stat_activity
            WHERE pid <> pg_backend_pid()
              AND backend_type = 'client backend'
              AND (%(app)s::text IS NULL OR application_name = %(app)s::text)
              AND application_name <> %(admin)s::text
            ORDER BY backend_start, pid
        """
        with (
            psycopg.connect(self._admin_conninfo(None), autocommit=True) as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            cur.execute(query, {"app": application_name, "admin": ADMIN_APPLICATION_NAME})
            return cur.fetchall()

    def activity_after_close(
        self, application_name: str, *, timeout: float = 3.0
    ) -> list[dict[str, Any]]:
        """`activity` once it is empty, or what is left after *timeout* seconds: a backend
        whose client has closed its connection leaves pg_stat_activity when its process
        exits, a moment later (longer under load), not when the client returns."""
        deadline = time.monotonic() + timeout
        while (rows := self.activity(application_name)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return rows

    def terminate(self, application_name: str, *, timeout: float = 5.0) -> int:
        """pg_terminate_backend() every backend with this application_name, waiting (up to
        ``timeout`` s each) until they are gone. Returns how many were terminated."""
        rows = self.sql(
            """
            SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, %(ms)s))
            FROM pg_stat_activity
            WHERE pid <> pg_backend_pid() AND application_name = %(app)s
            """,
            {"app": application_name, "ms": int(timeout * 1000)},
        )
        return int(rows[0][0])

    # internals ---------------------------------------------------------------------------------
    def _require_dir(self) -> Path:
        if self._dir is None:
            raise ServerError("Postgres is not started")
        return self._dir

    def _tool(self, name: str) -> str:
        if self._bindir is None:
            self._bindir = _pg_bindir()
        return str(self._bindir / name)

    def _run(
        self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self._dir,
                env=_child_env(self._require_dir()),
                check=False,
                **_as_user(self._account),
            )
        except subprocess.TimeoutExpired as exc:
            raise ServerError(
                f"{Path(argv[0]).name} timed out after {timeout}s\n{_tail(self._log_or_none())}"
            ) from exc
        if check and result.returncode != 0:
            raise ServerError(self._failure(f"{Path(argv[0]).name} failed", result))
        return result

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(
            [self._tool("pg_ctl"), "-D", str(self.data_dir), *args],
            timeout=START_TIMEOUT + 15,
            check=check,
        )

    def _pg_ctl_running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def _log_or_none(self) -> Path | None:
        return self._dir / "postgres.log" if self._dir is not None else None

    def _failure(self, what: str, result: subprocess.CompletedProcess[str]) -> str:
        output = (result.stdout + result.stderr).strip()
        return (
            f"PostgreSQL {what} (exit {result.returncode}): {output}\n"
            f"--- tail of {self._log_or_none()} ---\n{_tail(self._log_or_none())}"
        )

    def _init_cluster(self) -> None:
        self._account = _service_account()
        self._bindir = _pg_bindir()
        self._dir = _make_tempdir("tether-pg-", self._account)
        self._run(
            [
                self._tool("initdb"),
                "-D", str(self.data_dir),
                "-U", PG_ADMIN_USER,
                "-A", "trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=120,
        )  # fmt: skip
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# written by tests/servers.py: loopback only\n"
            "local all all trust\n"
            f"host all {PG_ADMIN_USER} 127.0.0.1/32 trust\n"
            f"host all all 127.0.0.1/32 {self.auth}\n"
        )
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude 'tether.conf'\n")

    def _write_settings(self) -> None:
        settings: dict[str, str | int] = {
            "listen_addresses": HOST,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",  # stderr goes to postgres.log (pg_ctl -l)
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d/%a ",
            "password_encryption": "scram-sha-256",
            "shared_buffers": "64MB",
            **self.settings,
        }
        lines = ["# written by tests/servers.py"]
        for key, value in settings.items():
            if isinstance(value, int):
                lines.append(f"{key} = {value}")
            else:
                escaped = str(value).replace("'", "''")
                lines.append(f"{key} = '{escaped}'")
        path = self.data_dir / "tether.conf"
        path.write_text("\n".join(lines) + "\n")
        _chown(path, self._account)

    def _start_server(self) -> None:
        if self._port is None:
            self._port = free_port()
        for attempt in range(3):
            self._write_settings()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._pg_ctl(
                "start", "-w", "-t", str(int(START_TIMEOUT)), "-l", str(self.log_path),
                check=False,
            )  # fmt: skip
            if result.returncode == 0:
                return
            new_log = ""
            with contextlib.suppress(OSError), open(self.log_path, errors="replace") as fh:
                fh.seek(offset)
                new_log = fh.read()
            if attempt < 2 and _port_in_use(new_log) and not self._pg_ctl_running():
                self._port = free_port()  # somebody took the port meanwhile: try another
                continue
            raise ServerError(self._failure("did not start", result))

    def _admin_conninfo(self, database: str | None) -> str:
        return (
            f"host={HOST} port={self.port} user={PG_ADMIN_USER} "
            f"dbname={database or PG_DATABASE} connect_timeout=5 "
            f"application_name={ADMIN_APPLICATION_NAME}"
        )

    def _wait_ready(self) -> None:
        import psycopg

        def ready() -> bool:
            conninfo = (
                f"host={HOST} port={self.port} user={PG_ADMIN_USER} dbname=postgres "
                f"connect_timeout=2 application_name={ADMIN_APPLICATION_NAME}"
            )
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True

        if not _wait_for(ready, timeout=START_TIMEOUT, interval=0.1):
            raise ServerError(
                f"PostgreSQL on {HOST}:{self.port} not accepting connections after "
                f"{START_TIMEOUT}s\n--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
            )

    def _bootstrap(self) -> None:
        exists = self.sql(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", [PG_USER], database="postgres"
        )
        if not exists:
            password = PG_PASSWORD.replace("'", "''")
            self.sql(
                f"CREATE ROLE {PG_USER} LOGIN SUPERUSER PASSWORD '{password}'",
                database="postgres",
            )
        if not self.sql(
            "SELECT 1 FROM pg_database WHERE datname = %s", [PG_DATABASE], database="postgres"
        ):
            self.sql(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}", database="postgres")


# ---------------------------------------------------------------------------------------------
# Redis


class _Resp:
    """A tiny RESP2 client on a raw socket (enough for PING, CLIENT LIST, ...)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self._sock = socket.create_connection((HOST, port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def command(self, *args: str | bytes | int) -> Any:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ServerError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise ServerError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._file.read(length + 2)
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._read() for _ in range(count)]
        raise ServerError(f"unexpected redis reply {line!r}")


class Redis(_ProcessServer):
    """redis-server on a free 127.0.0.1 port: no persistence, protected mode."""

    _log_name = "redis.log"

    def __init__(self, *, args: Sequence[str] = ()) -> None:
        super().__init__()
        self.extra_args = list(args)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``"""
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> Self:
        with self._lock:
            if self._alive():
                return self
            binary = _find_binary("redis-server", "redis-server")
            if self._dir is None:
                self._dir = _make_tempdir("tether-redis-", None)
            self._launch("redis-server", lambda: self._argv(binary), self._ping)
            return self

    def command(self, *args: str | bytes | int) -> Any:
        """Send one command on a fresh connection and return the decoded reply."""
        with _Resp(self.port) as conn:
            return conn.command(*args)

    def ping(self) -> bool:
        return self._ping()

    def client_list(self, name: str | None = None) -> list[dict[str, str]]:
        """CLIENT LIST as dicts (id, addr, name, age, idle, cmd, ...), without the helper's
        own connection; only the clients named ``name`` if given."""
        with _Resp(self.port) as conn:
            own_id = str(conn.command("CLIENT", "ID"))
            raw = conn.command("CLIENT", "LIST")
        clients = []
        for line in raw.decode().splitlines():
            if not line.strip():
                continue
            fields = dict(item.partition("=")[::2] for item in line.split(" ") if item)
            if fields.get("id") == own_id:
                continue
            if name is None or fields.get("name") == name:
                clients.append(fields)
        return clients

    def _argv(self, binary: str) -> list[str]:
        return [
            binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", "",  # stdout, i.e. redis.log
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def _ping(self) -> bool:
        return self._alive() and self.command("PING") == "PONG"


# ---------------------------------------------------------------------------------------------
# PgBouncer


class PgBouncer(_PgAddress, _ProcessServer):
    """pgbouncer in front of a running ``Postgres``, on a free 127.0.0.1 port.

    Same user, password and database names as the Postgres (``dsn``); clients authenticate
    with ``auth_type`` against a userlist holding the ``tether`` password. ``tether`` is
    also a console admin: ``show("POOLS")`` runs ``SHOW POOLS`` on the admin console.
    """

    _log_name = "pgbouncer.log"

    def __init__(
        self,
        postgres: Postgres,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 10,
        max_client_conn: int = 1000,
        auth_type: str = "scram-sha-256",
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        super().__init__()
        self.postgres = postgres
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.auth_type = auth_type
        self.settings: dict[str, str | int] = dict(settings or {})
        self._account: pwd.struct_passwd | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "pgbouncer.ini"

    def start(self) -> Self:
        with self._lock:
            if self._alive():
                return self
            if not self.postgres.running:
                raise ServerError("start the Postgres before its PgBouncer")
            binary = _find_binary("pgbouncer", "pgbouncer")
            import psycopg  # noqa: F401  (here: an ImportError in _ready would read "not ready")

            self._account = _service_account()
            if self._dir is None:
                self._dir = _make_tempdir("tether-pgbouncer-", self._account)

            def argv() -> list[str]:
                self._write_config()  # the config names the port just chosen
                return [binary, str(self.config_path)]

            self._launch("pgbouncer", argv, self._ready, account=self._account)
            return self

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (POOLS, CLIENTS, SERVERS, STATS, ...)."""
        import psycopg
        from psycopg.rows import dict_row

        if not re.fullmatch(r"[A-Za-z_ ]+", what):
            raise ValueError(f"not a SHOW command: {what!r}")
        conninfo = (
            f"host={HOST} port={self.port} user={PG_USER} password={PG_PASSWORD} "
            "dbname=pgbouncer connect_timeout=5"
        )
        # the console only speaks the simple query protocol: ClientCursor uses it
        with (
            psycopg.connect(conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            cur.execute(f"SHOW {what}")
            return cur.fetchall()

    def _write_config(self) -> None:
        pg = self.postgres
        settings: dict[str, str | int] = {
            "listen_addr": HOST,
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": self.auth_type,
            "auth_file": str(self.directory / "userlist.txt"),
            "admin_users": PG_USER,
            "stats_users": PG_USER,
            "pool_mode": self.pool_mode,
            "default_pool_size": self.default_pool_size,
            "max_client_conn": self.max_client_conn,
            "ignore_startup_parameters": "extra_float_digits,options,statement_timeout,search_path",
            "server_login_retry": 1,
            "server_connect_timeout": 5,
            "log_connections": 0,
            "log_disconnections": 0,
            **self.settings,
        }
        lines = [
            "; written by tests/servers.py",
            "[databases]",
            f"{PG_DATABASE} = host={HOST} port={pg.port} dbname={PG_DATABASE}",
            f"* = host={HOST} port={pg.port}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        userlist = self.directory / "userlist.txt"
        userlist.write_text(f'"{PG_USER}" "{PG_PASSWORD}"\n')
        for path in (self.config_path, userlist):
            path.chmod(0o600)
            _chown(path, self._account)

    def _ready(self) -> bool:
        import psycopg

        if not (self._alive() and _tcp_open(self.port)):
            return False
        conninfo = (
            f"host={HOST} port={self.port} user={PG_USER} password={PG_PASSWORD} "
            f"dbname={PG_DATABASE} connect_timeout=2 application_name={BOUNCER_CHECK_NAME}"
        )
        with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
            conn.execute("SELECT 1")
        return True
