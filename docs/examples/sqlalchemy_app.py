"""A notes service on SQLAlchemy 2 (async) with tether. See docs/integrations/sqlalchemy.md.

Run it against PostgreSQL, or a local SQLite file (the default)::

    DATABASE_URL=postgresql+asyncpg://app:secret@127.0.0.1/notes \\
        uvicorn docs.examples.sqlalchemy_app:app
    uvicorn docs.examples.sqlalchemy_app:app          # sqlite+aiosqlite:///notes.db

    curl -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hi"}'
"""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import tether
from tether.fastapi import health_router
from tether.integrations import sqlalchemy as tsa


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


def database_url() -> str:
    """Read when the app starts (never at import): secrets stay out of module state."""
    return os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///notes.db")


lc = tether.Lifecycle()

# The engine: opened at startup (SELECT 1, and on PostgreSQL the connection budget
# against max_connections), disposed at shutdown, checked by /health/ready.
engine = tsa.engine(lc, database_url, pool_size=10, max_overflow=0, pool_timeout=5.0)


@lc.resource(scope="app")
async def schema(engine: AsyncEngine) -> None:
    """Create the tables at startup (use migrations in a real service)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


# One AsyncSession per request, committed before the response starts, rolled back on
# any failure.
session = tsa.session(lc, engine)
Session = Annotated[AsyncSession, Depends(session)]

app = FastAPI(lifespan=lc.lifespan)
app.include_router(health_router(lc))


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    id: int
    text: str


@app.post("/notes", status_code=201)
async def create_note(note: NoteIn, s: Session) -> NoteOut:
    row = Note(text=note.text)
    s.add(row)
    await s.flush()  # INSERT now, so the id is known; COMMIT before the response starts
    return NoteOut(id=row.id, text=row.text)


@app.get("/notes")
async def list_notes(s: Session) -> list[NoteOut]:
    notes = await s.scalars(select(Note).order_by(Note.id))
    return [NoteOut(id=n.id, text=n.text) for n in notes]


@app.get("/notes/{note_id}")
async def get_note(note_id: int, s: Session) -> NoteOut:
    note = await s.get(Note, note_id)
    if note is None:
        raise HTTPException(404, f"no note {note_id}")
    return NoteOut(id=note.id, text=note.text)


@app.delete("/notes/{note_id}", status_code=204, response_model=None)
async def delete_note(note_id: int, s: Session) -> None:
    note = await s.get(Note, note_id)
    if note is None:
        raise HTTPException(404, f"no note {note_id}")  # nothing to roll back, but it would
    await s.delete(note)
