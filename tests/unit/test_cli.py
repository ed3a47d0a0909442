"""`tether graph` and `tether check`, run in-process."""

from __future__ import annotations

import json

import pytest

from tests.unit import cli_target
from tests.unit._messages import exactly
from tether.cli import main

TARGET = "tests.unit.cli_target:lc"


def test_graph_lists_resources_in_opening_order(capsys: pytest.CaptureFixture[str]) -> None:
    """The graph shows app resources in dependency order, then request ones."""
    assert main(["graph", TARGET, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {"name": "settings", "scope": "app", "depends_on": []},
        {"name": "db", "scope": "app", "depends_on": ["settings"]},
        {"name": "conn", "scope": "request", "depends_on": ["db"]},
    ]


def test_check_passes_then_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """`check` exits 0 when every check passes and 1 when one fails, saying which."""
    assert main(["check", TARGET]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ok"
    cli_target.healthy["db"] = False
    try:
        assert main(["check", TARGET]) == 1
    finally:
        cli_target.healthy["db"] = True
    out = capsys.readouterr().out
    assert "ConnectionError: connection refused" in out
    assert out.splitlines()[-1] == "unavailable"


def test_bad_target_says_what_to_name() -> None:
    """A target that is not a Lifecycle is refused with a clear message."""
    with pytest.raises(
        SystemExit,
        match=r"^'tests.unit.cli_target:healthy' is a dict, not a tether.Lifecycle: name the Lifecycle.$",
    ):
        main(["graph", "tests.unit.cli_target:healthy"])
    with pytest.raises(
        SystemExit,
        match=exactly("'nocolon' is not of the form module:attribute (for example myapp.main:lc)."),
    ):
        main(["graph", "nocolon"])
    with pytest.raises(
        SystemExit, match=exactly("'tests.unit.cli_target' has no attribute 'nope'.")
    ):
        main(["graph", "tests.unit.cli_target:nope"])
    with pytest.raises(
        SystemExit,
        match=exactly(
            "Cannot import 'tests.unit.no_such_module': ModuleNotFoundError: No module named "
            "'tests.unit.no_such_module'."
        ),
    ):
        main(["graph", "tests.unit.no_such_module:lc"])
