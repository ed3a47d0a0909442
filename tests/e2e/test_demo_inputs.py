"""The reference service (`tether.demo`) under a real uvicorn, given input its schema let
through but SQLite cannot take: a 422 that says why, never a 500."""

from pathlib import Path

import httpx

from tests.serving import Server


def test_out_of_range_ids_and_lone_surrogates_are_a_422(tmp_path: Path) -> None:
    srv = Server("tether.demo:app", tmp_path, env={"NOTES_DB": str(tmp_path / "notes.db")})
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as client:
            # An SQLite integer is 64-bit: 2**63 was an OverflowError binding it, a 500.
            for note_id in (2**63, -(2**63) - 1, 10**30):
                r = client.delete(f"/notes/{note_id}")
                assert r.status_code == 422, r.text
                assert r.json()["detail"][0]["loc"] == ["path", "note_id"]
            assert client.delete(f"/notes/{2**63 - 1}").status_code == 404
            assert client.delete(f"/notes/{-(2**63)}").status_code == 404
            # A JSON string may hold a lone surrogate, which UTF-8 cannot encode: it was a
            # UnicodeEncodeError binding it, a 500 (and FastAPI's 422 echoing it could not
            # be sent either).
            r = client.post(
                "/notes",
                content=b'{"text": "ok \\ud800"}',
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == [
                {
                    "type": "unicode",
                    "loc": ["body", "text"],
                    "msg": "Text must be valid Unicode: a lone surrogate at 3 cannot be stored",
                    "input": "ok \\ud800",
                    "ctx": {"position": 3},
                }
            ]
            # A surrogate pair is one character, stored as any other.
            r = client.post(
                "/notes",
                content=b'{"text": "ok \\ud83c\\udf89"}',
                headers={"content-type": "application/json"},
            )
            assert (r.status_code, r.json()) == (201, {"id": 1, "text": "ok \U0001f389"})
            assert client.get("/notes").json() == [{"id": 1, "text": "ok \U0001f389"}]
    finally:
        srv.stop()
    assert "Traceback" not in srv.output(), srv.output()
