"""Which connection errors tether takes for a refusal no retry mends (`refused_for_good`).

psycopg's error for a refused connection carries no SQLSTATE (libpq keeps it): the server's
message, as libpq words it, says which it was. Anything else, and any message in another
language, is retried as before.
"""

import psycopg
import pytest

from tether._errors import refused_for_good

HEAD = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '


@pytest.mark.parametrize(
    ("message", "sqlstate"),
    [
        ('FATAL:  password authentication failed for user "app"', "28P01"),
        ('FATAL:  role "app" does not exist', "28000"),
        ('FATAL:  role "app" is not permitted to log in', "28000"),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "app", database "x"', "28000"),
        ('FATAL:  pg_hba.conf rejects connection for host "10.0.0.1"', "28000"),
        ('FATAL:  database "shop" does not exist', "3D000"),
        ("Connection refused\n\tIs the server running on that host?", None),
        ("FATAL:  the database system is starting up", None),
        ("FATAL:  sorry, too many clients already", None),
        ('FATAL:  Passwort-Authentifizierung für Benutzer "app" fehlgeschlagen', None),
    ],
)
def test_a_psycopg_connection_error_is_read_by_its_message(
    message: str, sqlstate: str | None
) -> None:
    error = psycopg.OperationalError(HEAD + message)
    assert refused_for_good(error) == sqlstate
    wrapper = RuntimeError("wrapped")
    wrapper.__cause__ = error
    assert refused_for_good(wrapper) == sqlstate  # found down the chain too


def test_the_message_of_another_library_is_not_read() -> None:
    """Only psycopg's (and psycopg2's) errors go without a SQLSTATE: a message of anything
    else that reads alike says nothing about the server."""
    assert refused_for_good(OSError("password authentication failed for user")) is None
    assert refused_for_good(ValueError('FATAL:  database "x" does not exist')) is None
