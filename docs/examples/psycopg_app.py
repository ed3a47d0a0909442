"""A notes service on psycopg 3 with tether. See docs/integrations/psycopg.md.

Run it against PostgreSQL::

    DATABASE_URL=postgresql://app:secret@127.0.0.1/notes uvicorn docs.examples.psycopg_app:app

    curl -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hi"}'
    curl localhost:8000/notes
    curl localhost:8000/health/ready
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from pydantic import BaseModel

import tether
from tether.fastapi import health_router
from tether.integrations import psycopg as tpsy


def database_url() -> str:
    """Read when the app starts (never at import): secrets stay out of module state."""
    return os.environ["DATABASE_URL"]


lc = tether.Lifecycle()

# psycopg's AsyncConnectionPool: opened at startup and filled to min_size, closed at
# shutdown, checked by /health/ready. Set pgbouncer=True behind PgBouncer.
pool = tpsy.pool(
    lc,
    database_url,
    min_size=1,
    max_size=10,
    timeout=5.0,
    kwargs={"application_name": "notes-psycopg", "row_factory": dict_row},
)


async def create_notes(c: AsyncConnection[Any]) -> None:
    """The schema, version 1 (a real service would run its migrations here)."""
    await c.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, text text)")


# Run once per deployment, by the first worker to start; the others wait for it, then skip.
schema = tpsy.once(lc, pool, create_notes, key="notes-schema:1")


# One connection per request: autocommit by default; `tx` runs the request in one
# transaction, committed before the response starts and rolled back on any failure.
conn = tpsy.connection(lc, pool)
tx = tpsy.connection(lc, pool, name="tx", transaction=True)
Conn = Annotated[AsyncConnection[Any], Depends(conn)]
Tx = Annotated[AsyncConnection[Any], Depends(tx)]

app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    id: int
    text: str


@app.post("/notes", status_code=201)
async def create_note(note: NoteIn, c: Tx) -> NoteOut:
    cur = await c.execute("INSERT INTO notes (text) VALUES (%s) RETURNING id, text", [note.text])
    row = await cur.fetchone()
    assert row is not None  # INSERT ... RETURNING gives one row
    if not note.text.strip():
        raise HTTPException(422, "empty note")  # the INSERT above is rolled back
    return NoteOut(**row)


@app.get("/notes")
async def list_notes(c: Conn) -> list[NoteOut]:
    cur = await c.execute("SELECT id, text FROM notes ORDER BY id")
    return [NoteOut(**row) for row in await cur.fetchall()]


@app.get("/notes/{note_id}")
async def get_note(note_id: int, c: Conn) -> NoteOut:
    cur = await c.execute("SELECT id, text FROM notes WHERE id = %s", [note_id])
    row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, f"no note {note_id}")
    return NoteOut(**row)
