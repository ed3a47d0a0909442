"""The ```python blocks of README.md, docs/*.md and docs/integrations/*.md, checked.

Users copy these blocks, so every one (parametrized, id ``file:line`` of its opening fence) is:

1. compiled, top-level ``await``/``async with`` allowed (the docs show test bodies that way);
2. name-checked: every name taken from ``tether`` must exist in the code as it is now: the
   ``from tether... import x`` and ``import tether...`` statements, and every dotted chain
   starting at a name bound to a tether module (``tether.fastapi.release``, ``tsa.engine``) or to
   a ``tether.Lifecycle`` (``lc = tether.Lifecycle()``). A block that uses a name without binding
   it (an excerpt) means what the docs mean by it everywhere (``CONVENTIONS``: ``lc`` a
   Lifecycle, ``tsa`` tether.integrations.sqlalchemy...), so ``lc.run`` and ``tsa.once`` are
   checked too. A call of such a function or method must also bind to its signature (a
   misspelled or removed keyword argument fails, unless the function takes ``**kwargs``);
3. executed, when it is self-contained: it uses no name it does not bind, import or get from
   ``PRELUDE`` (the models the docs leave out, ``NoteIn``/``NoteOut``/``Note``, as in
   docs/examples/), and imports nothing that is not installed (``myapp``). It runs in a fresh
   namespace, in a temporary directory, with placeholder ``DATABASE_URL``/``REDIS_URL``/
   ``UPSTREAM_URL``: that runs every declaration (an integration checks its arguments there)
   but opens no connection. ``SCENARIOS`` then drives the apps that need no server through
   their lifespan and a request (the README's quick start, the aiosqlite guide's, and the
   SQLAlchemy guide's on SQLite), and runs the testing doc's fragments (and the README's
   ``lc.run()`` one) against the README's quick start app. PostgreSQL/Redis/httpx-upstream
   blocks get 1, 2 and their declarations only (docs/examples/ run against real servers).

A block that is self-contained but must not run (it needs a server or a package the suite does
not install at import) is marked in the markdown by an HTML comment on the line before its fence,
invisible once rendered::

    <!-- snippet: no-run (needs gunicorn) -->

A block that goes on from the block before it in the same file (it uses that block's names) is
marked ``<!-- snippet: continues -->``: it runs in what that block left (that block run first).

A block that fails because tether's code, not the docs, is wrong goes in ``XFAIL``, with the reason.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sqlite3
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from pydantic import BaseModel
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import tether

ROOT = Path(__file__).resolve().parents[2]
DOC_GLOBS = ("README.md", "docs/*.md", "docs/integrations/*.md")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\s*$")
_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>[\w-]+)\b.*-->\s*$")
_MARKERS = {"no-run", "continues"}

# Placeholder settings: enough for a declaration, never connected to.
ENV = {
    "DATABASE_URL": "postgresql://docs:docs@127.0.0.1:9/docs",
    "REDIS_URL": "redis://127.0.0.1:9/0",
    "UPSTREAM_URL": "http://127.0.0.1:9",
}

# ids of blocks that fail because of tether's code: {"docs/x.md:12": "reason"}.
XFAIL: dict[str, str] = {}


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None

    @property
    def file(self) -> str:
        path = self.path
        return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def first_line(self) -> str:
        return next(line for line in self.code.splitlines() if line.strip())


def doc_files(root: Path = ROOT) -> list[Path]:
    return [path for pattern in DOC_GLOBS for path in sorted(root.glob(pattern))]


def extract(path: Path) -> list[Snippet]:
    """Every ```python block of *path*, dedented (a block may sit in a list item)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            pytest.fail(f"{path}:{start + 1}: ```python block never closed")
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marked = _MARKER.match(previous)
        marker = marked["kind"] if marked else None
        if marker is not None and marker not in _MARKERS:
            pytest.fail(f"{path}:{start}: unknown snippet marker {marker!r}; known: {_MARKERS}")
        found.append(Snippet(path, start + 1, textwrap.dedent("\n".join(body)) + "\n", marker))
        i += 1
    return found


def all_snippets(root: Path = ROOT) -> list[Snippet]:
    return [snippet for path in doc_files(root) for snippet in extract(path)]


def _syntax_error(snippet: Snippet, exc: SyntaxError, line: int) -> NoReturn:
    pytest.fail(
        f"{snippet.id}: syntax error at {snippet.file}:{line}: {exc.msg}\n"
        f"    {(exc.text or '').rstrip()}",
        pytrace=False,
    )


def compile_snippet(snippet: Snippet) -> tuple[ast.Module, types.CodeType]:
    """Parse and compile, or fail naming the markdown file and line. The code object's lines
    are the markdown file's, so a traceback points into the docs."""
    try:  # Python 3.11's grammar: the oldest Python tether supports
        tree = ast.parse(snippet.code, filename=snippet.file, feature_version=(3, 11))
    except SyntaxError as exc:
        _syntax_error(snippet, exc, snippet.line + (exc.lineno or 0))
    shifted = ast.increment_lineno(ast.parse(snippet.code), snippet.line)
    try:  # what only the compiler finds: `return` outside a function...
        code = compile(
            shifted, snippet.file, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
        )
    except SyntaxError as exc:
        _syntax_error(snippet, exc, exc.lineno or 0)
    return tree, code


# ---------------------------------------------------------------------------- names


_ABSENT = object()


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the block binds anywhere (one flat scope: a conservative approximation)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def free_names(tree: ast.AST) -> set[str]:
    """Names the block uses but never binds, builtins aside."""
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - _bound_names(tree) - set(dir(builtins))


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return _ABSENT


# The names the docs use without binding them in every block: what they mean there.
CONVENTIONS: dict[str, Callable[[], Any]] = {
    "tether": lambda: tether,
    "lc": tether.Lifecycle,
    "tsa": lambda: importlib.import_module("tether.integrations.sqlalchemy"),
    "tpg": lambda: importlib.import_module("tether.integrations.asyncpg"),
    "tpsy": lambda: importlib.import_module("tether.integrations.psycopg"),
    "tsqlite": lambda: importlib.import_module("tether.integrations.aiosqlite"),
    "tredis": lambda: importlib.import_module("tether.integrations.redis"),
    "thttpx": lambda: importlib.import_module("tether.integrations.httpx"),
}


class NameChecker:
    """Resolves what the block takes from tether, and records what is missing."""

    def __init__(self, snippet: Snippet, tree: ast.Module) -> None:
        self.snippet = snippet
        self.tree = tree
        self.errors: list[str] = []
        self.known: dict[str, Any] = {}  # name -> tether module, object or Lifecycle instance
        for name in free_names(tree) & CONVENTIONS.keys():
            self.known[name] = CONVENTIONS[name]()

    def error(self, node: ast.AST, message: str) -> None:
        line = self.snippet.line + getattr(node, "lineno", 0)
        error = f"{self.snippet.file}:{line}: {message}"
        if error not in self.errors:
            self.errors.append(error)

    def check(self) -> list[str]:
        for node in ast.walk(self.tree):  # imports first: ast.walk is breadth first
            if isinstance(node, ast.Import):
                self.visit_import(node)
            elif isinstance(node, ast.ImportFrom):
                self.visit_import_from(node)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                self.visit_assign(node)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                self.resolve(node)
            elif isinstance(node, ast.Call):
                self.visit_call(node)
        return self.errors

    def visit_import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != "tether":
                continue
            module = _import(alias.name)
            if module is _ABSENT:
                self.error(node, f"`import {alias.name}`: no module {alias.name!r}")
            elif alias.asname:
                self.known[alias.asname] = module
            else:
                self.known["tether"] = tether

    def visit_import_from(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module or node.module.split(".")[0] != "tether":
            return
        module = _import(node.module)
        if module is _ABSENT:
            self.error(node, f"`from {node.module} import ...`: no module {node.module!r}")
            return
        for alias in node.names:
            value = getattr(module, alias.name, _ABSENT)
            if value is _ABSENT:
                value = _import(f"{node.module}.{alias.name}")
            if value is _ABSENT:
                self.error(node, f"`from {node.module} import {alias.name}`: no such name")
            else:
                self.known[alias.asname or alias.name] = value

    def visit_assign(self, node: ast.Assign) -> None:
        # lc = tether.Lifecycle(...): lc's attributes are checked on a Lifecycle.
        target = node.targets[0]
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Call):
            if self.resolve(node.value.func) is tether.Lifecycle:
                self.known[target.id] = tether.Lifecycle()

    def resolve(self, node: ast.expr) -> Any:
        """The tether object *node* names, `_ABSENT` if it names none (or is missing)."""
        if isinstance(node, ast.Name):
            return self.known.get(node.id, _ABSENT)
        if not isinstance(node, ast.Attribute):
            return _ABSENT
        owner = self.resolve(node.value)
        if owner is _ABSENT or not _descends(owner):
            return _ABSENT
        value = getattr(owner, node.attr, _ABSENT)
        if value is _ABSENT and isinstance(owner, types.ModuleType):
            value = _import(f"{owner.__name__}.{node.attr}")
        if value is _ABSENT:
            self.error(
                node, f"`{ast.unparse(node)}`: {_describe(owner)} has no attribute {node.attr!r}"
            )
        return value

    def visit_call(self, node: ast.Call) -> None:
        function = self.resolve(node.func)
        if function is _ABSENT or not callable(function):
            return
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            return
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return
        # `**unknown: Never` (Lifecycle(), lc.resource()) takes no keyword: it is there to
        # refuse a misspelt one with a better message than Python's.
        params = [
            p
            for p in signature.parameters.values()
            if not (p.kind is p.VAR_KEYWORD and str(p.annotation) in ("Never", "typing.Never"))
        ]
        signature = signature.replace(parameters=params)
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
        except TypeError as exc:
            self.error(node, f"`{ast.unparse(node.func)}(...)`: {exc} (signature {signature})")


def _descends(owner: Any) -> bool:
    return isinstance(owner, types.ModuleType | tether.Lifecycle) or owner is tether.Lifecycle


def _describe(owner: Any) -> str:
    if isinstance(owner, types.ModuleType):
        return f"module {owner.__name__!r}"
    return f"{type(owner).__name__ if not isinstance(owner, type) else owner.__name__!r}"


# ---------------------------------------------------------------------------- running


# The names the docs leave to the reader ("the block above is an excerpt: its models ... are
# in docs/examples/"), as defined there.
class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    id: int
    text: str


class _Base(DeclarativeBase):
    pass


class Note(_Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


PRELUDE = {"NoteIn": NoteIn, "NoteOut": NoteOut, "Note": Note}


def _installed(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            modules = [node.module]
        else:
            continue
        if any(importlib.util.find_spec(m.split(".")[0]) is None for m in modules):
            return False
    return True


def runnable(snippet: Snippet, tree: ast.Module, code: types.CodeType) -> bool:
    return (
        snippet.marker != "no-run"
        and not code.co_flags & inspect.CO_COROUTINE  # top-level await: a test body's excerpt
        and (snippet.marker == "continues" or not free_names(tree) - set(PRELUDE))
        and _installed(tree)
    )


def execute(snippet: Snippet, code: types.CodeType) -> dict[str, Any]:
    """Runs the block in a fresh namespace, or in what the block it continues left."""
    if snippet.marker == "continues":
        earlier = [s for s in extract(snippet.path) if s.line < snippet.line]
        if not earlier:
            pytest.fail(f"{snippet.id}: marked `continues`, but no block before it", pytrace=False)
        namespace = execute(earlier[-1], compile_snippet(earlier[-1])[1])
    else:
        namespace = {"__name__": "docs_snippet", **PRELUDE}
    exec(code, namespace)
    return namespace


# Scenarios: what runs after a block's declarations, keyed by (file, first line of the block).
Scenario = Callable[[Snippet, dict[str, Any], pytest.CaptureFixture[str]], Any]
SCENARIOS: dict[tuple[str, str], Scenario] = {}


def scenario(file: str, first_line: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[file, first_line] = fn
        return fn

    return register


def _client(app: Any) -> Any:
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://docs")


@scenario("README.md", "from collections.abc import AsyncIterator")
async def readme_quick_start(snippet: Snippet, ns: dict[str, Any], capsys: Any) -> None:
    """Two requests print what the README says they print."""
    async with ns["lc"].lifespan(ns["app"]), _client(ns["app"]) as client:
        for _ in range(2):
            response = await client.get("/")
            assert response.status_code == 200, response.text
            assert response.json() == {"message": "Hello with DB"}
    printed = capsys.readouterr().out.split("\n")
    assert printed == [
        "Starting app",
        *["DB connected", "DB closed"] * 2,
        "Stopping app",
        "",
    ], printed


@scenario("docs/integrations/aiosqlite.md", "import os")
async def aiosqlite_quick_start(snippet: Snippet, ns: dict[str, Any], capsys: Any) -> None:
    """A note posted is committed before the response (the table is tether.demo's)."""
    with contextlib.closing(sqlite3.connect("notes.db")) as db, db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    async with ns["lc"].lifespan(ns["app"]), _client(ns["app"]) as client:
        response = await client.post("/notes", json={"text": "hi"})
    assert response.status_code == 201, response.text
    assert response.json() == {"id": 1, "text": "hi"}
    with contextlib.closing(sqlite3.connect("notes.db")) as db:
        assert db.execute("SELECT id, text FROM notes").fetchall() == [(1, "hi")]


@scenario("docs/integrations/sqlalchemy.md", "import os")
async def sqlalchemy_quick_start(snippet: Snippet, ns: dict[str, Any], capsys: Any) -> None:
    """The quick start on SQLite (its DSN is read at startup): a note posted is committed."""
    os.environ["DATABASE_URL"] = "sqlite+aiosqlite:///notes.db"  # undone by monkeypatch
    with contextlib.closing(sqlite3.connect("notes.db")) as db, db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    async with ns["lc"].lifespan(ns["app"]), _client(ns["app"]) as client:
        response = await client.post("/notes", json={"text": "hi"})
    assert response.status_code == 201, response.text
    assert response.json() == {"id": 1, "text": "hi"}
    with contextlib.closing(sqlite3.connect("notes.db")) as db:
        assert db.execute("SELECT id, text FROM notes").fetchall() == [(1, "hi")]


def _readme_app() -> dict[str, Any]:
    (quick_start,) = (s for s in extract(ROOT / "README.md") if "class FakeDB" in s.code)
    _, code = compile_snippet(quick_start)
    return execute(quick_start, code)


async def _with_readme_app(snippet: Snippet, capsys: Any, **extra: Any) -> dict[str, Any]:
    """Runs *snippet* (top-level await allowed) with the README quick start's names."""
    ns = _readme_app()
    ns.update(conn_resource=ns["db"], **extra)
    _, code = compile_snippet(snippet)
    result = eval(code, ns)
    if inspect.iscoroutine(result):
        await result
    return ns


def _fragment(file: str, first_line: str, printed: list[str], **extra: Any) -> None:
    """Runs the fragment with the README quick start's names; *printed* is what it prints."""

    async def run(snippet: Snippet, ns: dict[str, Any], capsys: Any) -> None:
        ns = await _with_readme_app(snippet, capsys, **extra)
        assert capsys.readouterr().out.splitlines() == printed
        if "conn" in ns:  # `conn = await s.get(conn_resource)`
            assert type(ns["conn"]).__name__ == "FakeDB"

    scenario(file, first_line)(run)


def _testclient() -> Any:
    from fastapi.testclient import TestClient

    return TestClient


_REQUEST = ["Starting app", "DB connected", "DB closed", "Stopping app"]
_fragment("docs/testing.md", "with TestClient(app) as client:", _REQUEST, TestClient=_testclient())
_fragment("docs/testing.md", "async with (", _REQUEST, httpx=importlib.import_module("httpx"))
_fragment("docs/testing.md", 'async with lc.run(), lc.scope("test") as s:', _REQUEST[1:3])
_fragment("README.md", "async with lc.run():  # the app scope, without a server", _REQUEST[1:3])


# ---------------------------------------------------------------------------- tests


SNIPPETS = all_snippets()


def _param(snippet: Snippet) -> Any:
    marks = (
        [pytest.mark.xfail(reason=XFAIL[snippet.id], strict=True)] if snippet.id in XFAIL else []
    )
    return pytest.param(snippet, id=snippet.id, marks=marks)


def test_found_the_blocks() -> None:
    assert len(SNIPPETS) >= 30, [s.id for s in SNIPPETS]
    keys = [(s.file, s.first_line) for s in SNIPPETS]
    for key in SCENARIOS:  # each scenario names exactly one block
        assert keys.count(key) == 1, f"scenario {key}: {keys.count(key)} blocks, not 1"


def test_a_wrong_name_fails(tmp_path: Path) -> None:
    """The checks fail, naming the snippet, the line and the name, on a copy of the docs."""
    (tmp_path / "docs").mkdir()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    broken = readme.replace("lc.lifespan(wrap=lifespan)", "lc.lifespann(wrap=lifespan)", 1)
    (tmp_path / "README.md").write_text(broken, encoding="utf-8")
    snippet = next(s for s in extract(tmp_path / "README.md") if "class FakeDB" in s.code)
    errors = NameChecker(snippet, compile_snippet(snippet)[0]).check()
    assert len(errors) == 1
    assert "`lc.lifespann`: 'Lifecycle' has no attribute 'lifespann'" in errors[0], errors

    (tmp_path / "docs" / "x.md").write_text("text\n\n```python\ndef f(:\n```\n", encoding="utf-8")
    (bad,) = extract(tmp_path / "docs" / "x.md")
    with pytest.raises(pytest.fail.Exception, match=r"syntax error at .*x.md:4"):
        compile_snippet(bad)


@pytest.fixture
def in_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    # A block that configures logging (operations.md's handler on the `tether` logger) is
    # undone after it: later tests read that logger's records at their own levels.
    loggers = [logging.getLogger(), logging.getLogger("tether")]
    kept = [(lg, lg.level, lg.handlers[:], lg.propagate) for lg in loggers]
    yield tmp_path
    for lg, level, handlers, propagate in kept:
        for added in [h for h in lg.handlers if h not in handlers]:
            lg.removeHandler(added)
            added.close()
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.mark.anyio
@pytest.mark.parametrize("snippet", [_param(s) for s in SNIPPETS])
async def test_snippet(
    snippet: Snippet, in_temp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree, code = compile_snippet(snippet)
    errors = NameChecker(snippet, tree).check()
    if errors:
        pytest.fail(
            f"{snippet.id}: wrong names or arguments from tether:\n  " + "\n  ".join(errors),
            pytrace=False,
        )
    key = (snippet.file, snippet.first_line)
    if key in SCENARIOS and not runnable(snippet, tree, code):
        await SCENARIOS[key](snippet, {}, capsys)
        return
    if not runnable(snippet, tree, code):
        return
    ns = execute(snippet, code)
    if key in SCENARIOS:
        await SCENARIOS[key](snippet, ns, capsys)
