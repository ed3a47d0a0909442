"""What the integration tests run the same way on each driver's value."""

from typing import Any


async def scalar(c: Any, sql: str) -> Any:
    """The one value *sql* returns, on an asyncpg or psycopg connection or a SQLAlchemy session."""
    if hasattr(c, "fetchval"):  # asyncpg
        return await c.fetchval(sql)
    if hasattr(c, "cursor"):  # psycopg
        return (await (await c.execute(sql)).fetchone())[0]
    from sqlalchemy import text

    return (await c.execute(text(sql))).scalar_one()
