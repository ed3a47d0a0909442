"""tether's reference service: a notes API on an embedded SQLite file.

``tether demo`` serves it (``make demo`` in a checkout). It is also the complete example of
the aiosqlite integration (docs/integrations/aiosqlite.md). Serve it yourself with::

    NOTES_DB=data/notes.db uvicorn tether.demo:app

    curl -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hi"}'

The file is created, in WAL mode, when the app starts (``notes.db`` without ``NOTES_DB``).
Watch its connections at http://localhost:8000/tether/ (tether's dashboard) and its readiness
at http://localhost:8000/health/ready. It needs the ``demo`` extra:
``pip install 'tether[demo]'``.
"""

from __future__ import annotations

import os
from typing import Annotated

import aiosqlite
from fastapi import Depends, FastAPI, HTTPException, Path
from pydantic import BaseModel, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

import tether
from tether.fastapi import dashboard_router, health_router
from tether.integrations import aiosqlite as tsqlite

lc = tether.Lifecycle()

# The database file: created at startup, switched to WAL, checked by /health/ready.
db = tsqlite.database(
    lc, lambda: os.environ.get("NOTES_DB", "notes.db"), busy_timeout=5.0, max_connections=32
)


@lc.resource(scope="app")
async def schema(database: tsqlite.Database) -> None:
    """Create the table at startup (use migrations in a real service)."""
    async with database.connect() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)"
        )
        await conn.commit()


# Readers: a deferred transaction, never blocked by the writer (WAL).
reader = tsqlite.connection(lc, db, name="reader")
# Writers: take the write lock when they open, so concurrent writers wait their turn
# (up to busy_timeout, then 503 + Retry-After).
writer = tsqlite.connection(lc, db, name="writer", begin="immediate")

Reader = Annotated[aiosqlite.Connection, Depends(reader)]
Writer = Annotated[aiosqlite.Connection, Depends(writer)]

app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))
# The dashboard shows route paths and source files: in production, guard it, e.g.
# dashboard_router(lc, dependencies=[Depends(require_admin)]). The demo listens on 127.0.0.1
# only: `dependencies=[]` says so (without it, the start warns that nothing guards it).
app.include_router(dashboard_router(lc, dependencies=[]))


class NoteIn(BaseModel):
    text: str

    @field_validator("text")
    @classmethod
    def encodable(cls, text: str) -> str:
        """A JSON string may hold a lone surrogate ("\\ud800"), which no UTF-8 text (nor
        SQLite) can store: a 422, whose echo of the input is escaped (it could not be sent)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            error = PydanticCustomError(
                "unicode",
                "Text must be valid Unicode: a lone surrogate at {position} cannot be stored",
                {"position": exc.start},
            )
            escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
            details = InitErrorDetails(type=error, loc=(), input=escaped)
            raise ValidationError.from_exception_data("text", [details]) from None
        return text


class NoteOut(BaseModel):
    id: int
    text: str


@app.post("/notes", status_code=201)
async def create_note(note: NoteIn, c: Writer) -> NoteOut:
    cur = await c.execute("INSERT INTO notes (text) VALUES (?)", (note.text,))
    assert cur.lastrowid is not None
    return NoteOut(id=cur.lastrowid, text=note.text)  # committed before the response starts


@app.get("/notes")
async def list_notes(c: Reader) -> list[NoteOut]:
    rows = await c.execute_fetchall("SELECT id, text FROM notes ORDER BY id")
    return [NoteOut(id=row["id"], text=row["text"]) for row in rows]


# An SQLite integer is 64-bit: a larger id is a 422, not an OverflowError.
NoteId = Annotated[int, Path(ge=-(2**63), le=2**63 - 1)]


@app.delete("/notes/{note_id}", status_code=204, response_model=None)
async def delete_note(note_id: NoteId, c: Writer) -> None:
    cur = await c.execute("DELETE FROM notes WHERE id = ?", (note_id,))
    if cur.rowcount == 0:
        raise HTTPException(404, f"no note {note_id}")  # rolled back (nothing to undo here)
