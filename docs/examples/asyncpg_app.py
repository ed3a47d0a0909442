"""A notes service on asyncpg with tether. See docs/integrations/asyncpg.md.

Run it against PostgreSQL::

    DATABASE_URL=postgresql://app:secret@127.0.0.1/notes uvicorn docs.examples.asyncpg_app:app

    curl -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hi"}'
    curl localhost:8000/notes
    curl localhost:8000/health/ready
"""

from __future__ import annotations

import os
from typing import Annotated

import asyncpg
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

import tether
from tether.fastapi import health_router
from tether.integrations import asyncpg as tpg


def database_url() -> str:
    """Read when the app starts (never at import): secrets stay out of module state."""
    return os.environ["DATABASE_URL"]


lc = tether.Lifecycle()

# The pool: opened at startup (SELECT 1, the connection budget against max_connections),
# closed at shutdown, checked by /health/ready. Set pgbouncer=True behind PgBouncer.
pool = tpg.pool(
    lc,
    database_url,
    min_size=1,
    max_size=10,
    acquire_timeout=5.0,
    server_settings={"application_name": "notes-asyncpg"},
)


async def create_notes(c: asyncpg.Connection) -> None:
    """The schema, version 1 (a real service would run its migrations here)."""
    await c.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, text text)")


# Run once per deployment, by the first worker to start; the others wait for it, then skip.
schema = tpg.once(lc, pool, create_notes, key="notes-schema:1")


# One connection per request. `tx` runs the request in a transaction: committed before the
# response starts, rolled back on any failure (an exception, an HTTPException, a client
# that went away).
conn = tpg.connection(lc, pool)
tx = tpg.connection(lc, pool, name="tx", transaction=True)
Conn = Annotated[asyncpg.Connection, Depends(conn)]
Tx = Annotated[asyncpg.Connection, Depends(tx)]

app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    id: int
    text: str


@app.post("/notes", status_code=201)
async def create_note(note: NoteIn, c: Tx) -> NoteOut:
    row = await c.fetchrow("INSERT INTO notes (text) VALUES ($1) RETURNING id, text", note.text)
    assert row is not None
    if not note.text.strip():
        raise HTTPException(422, "empty note")  # the INSERT above is rolled back
    return NoteOut(id=row["id"], text=row["text"])


@app.get("/notes")
async def list_notes(c: Conn) -> list[NoteOut]:
    rows = await c.fetch("SELECT id, text FROM notes ORDER BY id")
    return [NoteOut(id=r["id"], text=r["text"]) for r in rows]


@app.get("/notes/{note_id}")
async def get_note(note_id: int, c: Conn) -> NoteOut:
    row = await c.fetchrow("SELECT id, text FROM notes WHERE id = $1", note_id)
    if row is None:
        raise HTTPException(404, f"no note {note_id}")
    return NoteOut(id=row["id"], text=row["text"])
