"""SQLAlchemy declarations the docs review found unchecked: `budget=` of `engine()` and
`sync_engine()` (any string but "error" and "off" behaved as "warn", so `budget="Error"` never
failed a deploy), and `sync_session(concurrency=0)` (silently made 1)."""

import re

import pytest

import tether
import tether.integrations.sqlalchemy as tsa


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (
            lambda lc: tsa.engine(lc, "postgresql+asyncpg://u@h/d", budget="Error"),
            "Engine 'engine': budget='Error' is not one of 'warn', 'error', 'off' (what to do "
            "when the connection budget exceeds the server's max_connections). Did you mean "
            "budget='error'? The values are lower case.",
        ),
        (
            lambda lc: tsa.sync_engine(lc, "postgresql+psycopg://u@h/d", budget="strict"),
            "Engine 'engine': budget='strict' is not one of 'warn', 'error', 'off' (what to do "
            'when the connection budget exceeds the server\'s max_connections). Pass "warn" '
            '(the default), "error" or "off".',
        ),
        (
            lambda lc: tsa.sync_session(lc, tsa.sync_engine(lc, "sqlite://"), concurrency=0),
            "sync_session('session'): concurrency=0 must be 1 or more.",
        ),
    ],
    ids=["engine-budget-case", "sync-engine-budget-unknown", "sync-session-concurrency-0"],
)
def test_refused_at_declaration(declare: object, message: str) -> None:
    lc = tether.Lifecycle()
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        declare(lc)  # type: ignore[operator]
    assert "session" not in lc.resources  # nothing half-declared
