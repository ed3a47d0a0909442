"""`tether graph`, `check`, `stats` and `demo`'s refusals, run in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import tether
from tests.unit import cli_target
from tests.unit._messages import exactly
from tether.cli import main

TARGET = "tests.unit.cli_target:lc"


def test_graph_lists_resources_in_opening_order(capsys: pytest.CaptureFixture[str]) -> None:
    """The graph shows app resources in dependency order, then request ones."""
    assert main(["graph", TARGET, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {"name": "settings", "scope": "app", "depends_on": []},
        {"name": "db", "scope": "app", "depends_on": ["settings"]},
        {"name": "conn", "scope": "request", "depends_on": ["db"]},
    ]


def test_graph_lists_request_resources_after_what_they_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A request resource registered before one it uses is listed after it (before, in
    registration order: `repo <- conn` above `conn`)."""
    import tether
    from tether.cli import graph

    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    def db() -> str:
        return "db"

    @lc.resource
    def repo(conn: str) -> str:
        return conn

    @lc.resource
    def audit() -> str:
        return "audit"

    @lc.resource
    def conn(db: str) -> str:
        return db

    assert graph(lc, as_json=True) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == ["db", "conn", "repo", "audit"]


def test_check_passes_then_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """`check` exits 0 when every check passes and 1 when one fails, saying which."""
    assert main(["check", TARGET]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ok: 1 check passed"
    cli_target.healthy["db"] = False
    try:
        assert main(["check", TARGET]) == 1
    finally:
        cli_target.healthy["db"] = True
    out = capsys.readouterr().out
    assert "ConnectionError: connection refused" in out
    assert out.splitlines()[-1] == "unavailable: 1 of 1 checks failed (readiness: 503)"


def test_check_keeps_its_report_when_a_close_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """A cleanup failing at the end of `check` no longer hides the checks' report: it is
    printed, the failure said on stderr, and the exit code is 1. With --json, a start that
    fails still prints a JSON report on stdout, for what reads it."""
    import tether
    from tether.cli import check

    lc = tether.Lifecycle()

    @lc.resource(scope="app")
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise RuntimeError("close failed")

    assert check(lc, as_json=True) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "ok"
    assert "1 cleanup(s) failed at shutdown ('db')" in captured.err

    broken = tether.Lifecycle()

    @broken.resource(scope="app")
    def settings() -> str:
        raise ValueError("DATABASE_URL is not set")

    assert check(broken, as_json=True) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["status"] == "error"
    assert "App resource 'settings' failed to open" in report["error"]
    assert captured.err.startswith("tether: ")


def test_check_prints_what_a_passing_check_says(capsys: pytest.CaptureFixture[str]) -> None:
    """A pool busy with traffic passes at once, and the line says so."""
    cli_target.healthy["busy"] = True
    try:
        assert main(["check", TARGET]) == 0
    finally:
        cli_target.healthy["busy"] = False
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok       db ")
    assert lines[0].endswith(" ms  busy: all 2 connections in use")
    assert lines[-1] == "ok: 1 check passed"


def test_graph_of_a_cycle_says_so_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """`tether graph` on resources that depend on each other exits 1 with the cycle named,
    as `tether check` does (before, a traceback)."""
    assert main(["graph", "tests.unit.cli_cycle:lc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tether: DependencyCycleError: Dependency cycle between resources: ")
    assert "Traceback" not in err


def test_bad_target_says_what_to_name() -> None:
    """A target that is not a Lifecycle is refused with a clear message."""
    with pytest.raises(
        SystemExit,
        match=exactly(
            "'tests.unit.cli_target:healthy' is of type dict, not a tether.Lifecycle nor an app "
            "whose lifespan is one (FastAPI(lifespan=lc.lifespan)): name the Lifecycle."
        ),
    ):
        main(["graph", "tests.unit.cli_target:healthy"])
    # An attribute that is there, set to None (before: "has no attribute").
    with pytest.raises(
        SystemExit,
        match=exactly(
            "'tests.unit.cli_target:nothing' is None, not a tether.Lifecycle nor an app whose "
            "lifespan is one (FastAPI(lifespan=lc.lifespan)): name the Lifecycle."
        ),
    ):
        main(["graph", "tests.unit.cli_target:nothing"])
    with pytest.raises(
        SystemExit,
        match=exactly("'nocolon' is not of the form module:attribute (for example myapp.main:lc)."),
    ):
        main(["graph", "nocolon"])
    with pytest.raises(
        SystemExit, match=exactly("'tests.unit.cli_target' has no attribute 'nope'.")
    ):
        main(["graph", "tests.unit.cli_target:nope"])
    with pytest.raises(
        SystemExit,
        match=exactly(
            "Cannot import 'tests.unit.no_such_module': ModuleNotFoundError: No module named "
            "'tests.unit.no_such_module'."
        ),
    ):
        main(["graph", "tests.unit.no_such_module:lc"])


def test_stats_table_shows_pools_and_units() -> None:
    """`tether stats` prints the counters, the drivers' pool figures and what is in flight."""
    from tether.cli import render_stats

    data = {
        "state": "running",
        "units": {"in_flight": 1, "total": 7, "refused": 2},
        "resources": [
            {"name": "conn", "scope": "request", "in_use": 1, "max_in_use": 3, "opened": 7,
             "closed": 6, "open_errors": 1, "close_errors": 0, "timeouts": 1, "leaks": 0,
             "mean_wait_ms": 0.5, "max_wait_ms": 2.25, "mean_hold_ms": 10.0,
             "max_hold_ms": 31.5},
        ],
        "pools": [
            {"name": "pg", "max": 10, "open": 3, "in_use": 1, "idle": 2, "waiting": None,
             "created": 4, "discarded": 1},
        ],
        "in_flight": [
            {"id": "1", "label": "GET /slow", "age_s": 1.25,
             "holding": [{"resource": "conn", "held_s": 1.2, "leak": True, "acquired_at": []}]},
        ],
    }  # fmt: skip
    assert render_stats(data).splitlines() == [
        "running: 1 in flight, 7 started, 2 refused",
        "",
        "resource             scope    in use   max   opened   closed errors timeouts leaks  "
        "wait ms mean/max  hold ms mean/max",
        "conn                 request       1     3        7        6      1        1     0  "
        "       0.50/2.25       10.00/31.50",
        "",
        "pool                   max  open in use  idle waiting  made discarded",
        "pg                      10     3      1     2       -     4         1",
        "",
        "in flight, oldest first:",
        "  GET /slow                          1.2 s  conn 1.2 s (leak)",
    ]


def test_stats_header_names_the_process_and_says_when_another_answered() -> None:
    """The header names the process that answered; under --watch a read answered by
    another one (another worker, a restart) says so, since its counters are its own: with
    two workers "17 started" then "13 started" looked like counters going backwards."""
    from tether.cli import render_stats

    def read(pid: int, host: str, total: int) -> dict[str, object]:
        return {
            "pid": pid,
            "host": host,
            "state": "running",
            "units": {"in_flight": 0, "total": total, "refused": 0},
            "resources": [],
            "pools": [],
            "in_flight": [],
        }

    first, other, again = read(1233, "web-1", 17), read(1234, "web-1", 13), read(1233, "web-1", 18)
    assert render_stats(first).splitlines()[:2] == [
        "running: 0 in flight, 17 started, 0 refused (pid 1233 on web-1)",
        "",
    ]
    assert render_stats(other, first).splitlines()[:3] == [
        "running: 0 in flight, 13 started, 0 refused (pid 1234 on web-1)",
        "another process answered: pid 1234 on web-1, was pid 1233; each worker (and each "
        "restart) has its own figures",
        "",
    ]
    assert render_stats(again, first).splitlines()[1] == ""  # the same one: nothing said
    elsewhere = read(7, "web-2", 3)
    assert render_stats(elsewhere, first).splitlines()[1] == (
        "another process answered: pid 7 on web-2, was pid 1233 on web-1; each worker (and "
        "each restart) has its own figures"
    )


def test_python_dash_m_tether_is_the_same_command() -> None:
    """`python -m tether` works where the `tether` script is not on PATH."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tether", "graph", TARGET, "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [row["name"] for row in json.loads(done.stdout)] == ["settings", "db", "conn"]


def test_demo_refuses_a_notes_file_it_cannot_keep(tmp_path: Path) -> None:
    """`tether demo --db` naming a directory, a path under a file, or a file it cannot
    write, is refused before serving."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    fix = "Give --db the path of a file in a directory you can write to."
    with pytest.raises(
        SystemExit, match=exactly(f"tether demo: --db {tmp_path}: {tmp_path} is a directory. {fix}")
    ):
        main(["demo", "--db", str(tmp_path)])
    with pytest.raises(
        SystemExit,
        match=exactly(f"tether demo: --db {afile}/notes.db: {afile} is not a directory. {fix}"),
    ):
        main(["demo", "--db", f"{afile}/notes.db"])
    with pytest.raises(
        SystemExit,
        match=exactly(
            f"tether demo: --db {afile}/sub/notes.db: cannot create the directory {afile}/sub: "
            f"Not a directory. {fix}"
        ),
    ):
        main(["demo", "--db", f"{afile}/sub/notes.db"])
    # A directory no file can be made in (before: served, then a traceback at startup
    # blaming "the database and the pool size").
    with pytest.raises(
        SystemExit,
        match=exactly(
            f"tether demo: --db /proc/notes.db: cannot write /proc/notes.db: No such file or "
            f"directory. {fix}"
        ),
    ):
        main(["demo", "--db", "/proc/notes.db"])
    assert afile.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_demo_names_what_is_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without uvicorn (the `demo` extra), `tether demo` says what to install."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what `import uvicorn` sees when missing
    with pytest.raises(
        SystemExit,
        match=exactly(
            "tether demo: the reference service needs FastAPI, aiosqlite and uvicorn, and "
            "'uvicorn' is not installed. Install them with: pip install 'tether[demo]'"
        ),
    ):
        main(["demo", "--db", str(tmp_path / "notes.db")])
    assert not (tmp_path / "notes.db").exists()


@pytest.mark.parametrize("port", ["0", "65536", "http", "-1"])
def test_demo_refuses_a_port_that_is_not_one(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["demo", "--port", port])
    assert raised.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"tether demo: error: argument --port: {port!r} is not a TCP port (1 to 65535)"
    )


def test_stats_refuses_a_watch_interval_that_is_not_a_number(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--watch 2s` is said as `--port 80a` is (before: "invalid _seconds value")."""
    for text in ["2s", "0", "inf", "nan"]:
        with pytest.raises(SystemExit) as raised:
            main(["stats", "http://127.0.0.1:8000/tether/", "--watch", text])
        assert raised.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"tether stats: error: argument --watch: {text!r} is not a positive number of seconds"
        )


ROOT = Path(__file__).resolve().parents[2]


def _tether(*args: str, encoding: str = "utf-8") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONIOENCODING": encoding},
        capture_output=True,
        text=True,
        encoding=encoding,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_names_the_terminal_cannot_show_are_printed_escaped(encoding: str) -> None:
    """A resource named `café` and a check error with a `—`, where the terminal's encoding
    cannot hold them: printed escaped, with the command's own exit status (before: a
    UnicodeEncodeError traceback and exit 1 from `graph` too)."""
    graphed = _tether("graph", "tests.unit.cli_uni:lc", encoding=encoding)
    assert (graphed.returncode, graphed.stderr) == (0, "")
    name = "café" if encoding == "latin-1" else "caf\\xe9"
    assert graphed.stdout.split() == ["app", name, "<-", "-"]
    checked = _tether("check", "tests.unit.cli_uni:lc", encoding=encoding)
    assert checked.returncode == 1
    assert "Traceback" not in checked.stderr
    assert checked.stdout.splitlines()[0].split()[:2] == ["failing", name]
    assert "ConnectionError: refused \\u2014 try again later" in checked.stdout


def test_check_interrupted_says_so_and_closes_what_opened(tmp_path: Path) -> None:
    """^C while a resource is still opening: one line, exit status 130, and what had opened
    closed (before: two chained tracebacks of asyncio's internals)."""
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "check", "tests.unit.cli_interrupt:lc"],
        cwd=ROOT,
        env={**os.environ, "CLI_INTERRUPT_LOG": str(log)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored: give the
        # child ^C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while "second opening" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # as ^C
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, out) == (130, "")
    assert err == "tether check: interrupted (^C); what it had opened is closed\n"
    assert log.read_text().splitlines() == ["first opened", "second opening", "first closed"]


@pytest.mark.parametrize("name", ["app", "wrapped", "called", "with_health", "with_routers"])
def test_an_app_is_named_for_the_lifecycle_its_lifespan_is(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether graph main:app`: was "is of type FastAPI, not a tether.Lifecycle"."""
    assert main(["graph", TARGET, "--json"]) == 0
    expected = capsys.readouterr().out
    assert main(["graph", f"tests.unit.cli_app:{name}", "--json"]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("name", ["other", "other_with_router"])
def test_an_app_without_a_lifecycle_is_refused(name: str) -> None:
    with pytest.raises(
        SystemExit,
        match=exactly(
            f"'tests.unit.cli_app:{name}' is of type FastAPI, not a tether.Lifecycle nor an "
            f"app whose lifespan is one (FastAPI(lifespan=lc.lifespan)): name the Lifecycle."
        ),
    ):
        main(["graph", f"tests.unit.cli_app:{name}"])


def test_check_writes_nothing_to_the_services_metrics_directory(tmp_path: Path) -> None:
    """`tether check` run in the service's environment (PROMETHEUS_MULTIPROC_DIR set): its
    own figures went to the service's directory, and added to what the service reports."""
    import os
    import sys

    shared = tmp_path / "prometheus"
    shared.mkdir()
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tether", "check", "tests.unit.cli_metrics:lc"],
        cwd=root,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert list(shared.iterdir()) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`tether --version` said "the following arguments are required: command" (trial 16)."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"tether {tether.__version__}\n"


def test_control_characters_from_the_app_are_escaped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error's text reached the terminal raw: an escape sequence cleared the screen or
    set its title, and a carriage return printed "ok" over a failing check (trial 19;
    `tether stats` reads such text from a remote app)."""
    import types

    lc = tether.Lifecycle()

    def check(db: object) -> None:
        raise RuntimeError("\x1b[2J\x1b]0;OWNED\x07\x1b[32mall ok\x1b[0m\rFAKE")

    @lc.resource(scope="app", check=check)
    def db() -> object:
        return object()

    module = types.ModuleType("cli_ansi")
    module.lc = lc  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cli_ansi", module)
    assert main(["check", "cli_ansi:lc"]) == 1
    out = capsys.readouterr().out
    assert not set(out) & {"\x1b", "\r", "\x07"}
    assert (
        r"RuntimeError: \x1b[2J\x1b]0;OWNED\x07\x1b[32mall ok\x1b[0m\rFAKE" in out.splitlines()[0]
    )
