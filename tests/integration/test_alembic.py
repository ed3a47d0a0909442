"""The Alembic recipe of docs/operations.md ("Work done once per deployment"), in a real Alembic
project against a real PostgreSQL: the project is what `alembic init` writes, with the
`env.py` the docs show (read from the docs, so the docs are what is tested).

Two things the `env.py` of `alembic init` gets wrong next to tether:

- `alembic revision --autogenerate` compares the database with the models, finds the table
  `once` records work done in (`tether_once`), and writes `op.drop_table('tether_once')`:
  applied through `once`, every start then fails (the table is gone when `once` records the
  key); applied with `alembic upgrade head`, the record is lost and the work runs again.
- its `fileConfig(...)` disables every logger that exists already, tether's among them, for
  the rest of the process when the migration runs in the app.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tether
from tests.servers import Postgres
from tether.integrations import sqlalchemy as tsa

pytestmark = [pytest.mark.servers, pytest.mark.anyio]

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def docs_env_py() -> str:
    """The `env.py` block of docs/operations.md."""
    blocks = re.findall(r"```python\n(.*?)```", OPERATIONS.read_text(), re.S)
    found = [block for block in blocks if block.startswith("# migrations/env.py")]
    assert len(found) == 1, "docs/operations.md has no `# migrations/env.py` block"
    return found[0]


MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import declarative_base

Base = declarative_base()

{tables}
"""

TABLE = """
class {cls}(Base):
    __tablename__ = "{table}"
    id = sa.Column(sa.Integer, primary_key=True)
"""


@pytest.fixture
def database(postgres: Postgres) -> Iterator[str]:
    """A database of this test's own: autogenerate compares all of it with the models, and
    the shared one holds the other tests' tables."""
    name = f"alembic_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE DATABASE {name} OWNER {postgres.user}")
    yield name
    postgres.sql(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def logging_kept() -> Iterator[None]:
    """Put the logging setup back after the test, should an `env.py` change it (a
    `fileConfig` in this process would take pytest's handlers off the root logger)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = {
        name: logger.disabled
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, disabled in loggers.items():
        logging.getLogger(name).disabled = disabled


class Project:
    """An Alembic project as `alembic init` makes it, in *path*, with the docs' `env.py` and
    the models in `myapp/models.py` (which the docs' `env.py` imports)."""

    def __init__(self, path: Path, url: str) -> None:
        from alembic import command
        from alembic.config import Config

        self.path = path
        command.init(Config(str(path / "alembic.ini")), str(path / "migrations"))
        ini = path / "alembic.ini"
        text, n = re.subn(r"(?m)^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", ini.read_text())
        assert n == 1
        ini.write_text(text)
        (path / "migrations" / "env.py").write_text(docs_env_py())
        (path / "myapp").mkdir()
        (path / "myapp" / "__init__.py").write_text("")

    def models(self, *tables: str) -> None:
        body = "".join(TABLE.format(cls=t.title(), table=t) for t in tables)
        (self.path / "myapp" / "models.py").write_text(MODELS.format(tables=body))
        for module in ("myapp.models", "myapp"):
            sys.modules.pop(module, None)

    def cli(self, *args: str) -> str:
        """`alembic ...` as run from the command line, in the project's directory."""
        done = subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            cwd=self.path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def autogenerate(self, message: str) -> str:
        """The revision `alembic revision --autogenerate` writes: its upgrade() and downgrade()."""
        self.cli("revision", "--autogenerate", "-m", message)
        (written,) = (self.path / "migrations" / "versions").glob(f"*_{message}.py")
        return written.read_text()


async def deploy(url: str, key: str) -> bool:
    """Start an app whose `once` runs the docs' recipe (`command.upgrade` on once's
    connection, the project's alembic.ini from the working directory); whether it ran."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncConnection

    async def migrate(conn: AsyncConnection) -> None:
        def upgrade(sync_conn: Any) -> None:
            config = Config("alembic.ini")
            config.attributes["connection"] = sync_conn
            command.upgrade(config, "head")

        await conn.run_sync(upgrade)

    lc = tether.Lifecycle()
    engine = tsa.engine(lc, url, pool_size=1)
    migrated = tsa.once(lc, engine, migrate, key=key)
    async with lc.run():
        return lc.get(migrated)


async def test_autogenerate_keeps_once_table_and_alembic_keeps_tether_logging(
    postgres: Postgres,
    database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    logging_kept: None,
) -> None:
    """`once` made its table; then each new model is an `alembic revision --autogenerate`,
    applied through the recipe or with `alembic upgrade head`. No revision drops the table,
    each applies, the work recorded done stays done, and tether's logger still logs after
    Alembic ran in the process."""
    monkeypatch.syspath_prepend(str(tmp_path))  # restores sys.path, Alembic's additions too
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "myapp", raising=False)
    monkeypatch.delitem(sys.modules, "myapp.models", raising=False)
    caplog.set_level(logging.INFO, logger="tether")
    project = Project(tmp_path, postgres.url("postgresql+psycopg", database=database))
    app_url = postgres.url("postgresql+asyncpg", database=database)

    project.models("notes")
    first = project.autogenerate("notes")
    assert "op.create_table('notes'" in first

    assert await deploy(app_url, "alembic:1") is True  # once makes its table, then upgrades
    tether_log = logging.getLogger("tether")
    assert tether_log.disabled is False
    ran = [r.getMessage() for r in caplog.records if r.name == "tether" and "ran" in r.message]
    assert ran == [f"tether: 'migrate' ran 'alembic:1' in {ran[0].rsplit(' in ', 1)[1]}"], ran
    tether_log.warning("tether: still logging after Alembic")
    assert caplog.records[-1].getMessage() == "tether: still logging after Alembic"

    project.models("notes", "tags")
    second = project.autogenerate("tags")
    assert "op.create_table('tags'" in second
    assert "tether_once" not in second, second
    assert await deploy(app_url, "alembic:2") is True  # applied through once: it starts

    project.models("notes", "tags", "labels")
    third = project.autogenerate("labels")
    assert "op.create_table('labels'" in third
    assert "tether_once" not in third, third
    project.cli("upgrade", "head")  # applied from the command line

    assert "No new upgrade operations detected" in project.cli("check")
    done = postgres.sql("SELECT key FROM tether_once ORDER BY key", database=database)
    assert done == [("alembic:1",), ("alembic:2",)]
    assert await deploy(app_url, "alembic:2") is False  # recorded done: not run again
    assert tether_log.disabled is False
