"""Passwords in DSNs and URLs are hidden in every message tether writes (``redact``)."""

import pytest

from tether._errors import redact


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        # An unencoded '@' in the password: URL parsers (redis-py's, urllib's) split at the
        # last '@' before the host, so the password is everything up to it.
        ("redis://:hunter@2-secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://u:a@b@c@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("redis://:p@ss@h:1?x=1", "redis://:***@h:1?x=1"),
        # An '@' after the host (path, query, the text that follows) is not the password's.
        ("http://user:pw-123@127.0.0.1:5/a@b", "http://user:***@127.0.0.1:5/a@b"),
        ("postgresql://u:pw@h/db sent by x@y", "postgresql://u:***@h/db sent by x@y"),
        ("see http://a:b@h1 and http://c:d@h2", "see http://a:***@h1 and http://c:***@h2"),
        ("postgresql://u:pw@h1:1,h2:2/db", "postgresql://u:***@h1:1,h2:2/db"),
        # No password: unchanged.
        ("http://h/@x", "http://h/@x"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("host=h user=u password=hunter2 dbname=d", "host=h user=u password=*** dbname=d"),
    ],
)
def test_redact_hides_the_whole_password(text: str, shown: str) -> None:
    assert redact(text) == shown
