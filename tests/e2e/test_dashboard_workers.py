"""The dashboard against a real `uvicorn --workers 2`, in a real browser: it names the
process whose figures it shows, and says when another one answered."""

from __future__ import annotations

import re
import socket

import httpx
from playwright.sync_api import Page, Route, expect

from tests.e2e.test_dashboard_browser import browser, page  # noqa: F401 - the fixtures
from tests.serving import Server

APP = "tests.e2e.app_dashboard:app"


def test_dashboard_names_the_worker_and_says_when_another_answered(
    serve: type[Server],
    page: Page,  # noqa: F811 - the fixture
) -> None:
    """Each refresh may be answered by either worker, each with its own counters (before,
    the figures flipped between them with nothing said). A browser keeps its connection to
    one worker; a load balancer in front may not: each poll here gets a new connection."""
    server = serve(APP, "--workers", "2")

    def new_connection(route: Route) -> None:
        got = httpx.get(route.request.url, timeout=10)
        route.fulfill(status=got.status_code, body=got.content, content_type="application/json")

    page.route("**/tether/stats.json", new_connection)
    page.goto(f"{server.base_url}/tether/")
    host = socket.gethostname()
    expect(page.locator("#process")).to_have_text(re.compile(rf"^pid \d+ on {re.escape(host)}$"))
    note = page.locator("#process-note")
    expect(note).to_have_text(
        re.compile(
            r"^Another process answered: pid (\d+) on .+, was pid (?!\1)\d+; each worker "
            r"\(and each restart\) has its own figures\.$"
        ),
        timeout=30_000,
    )
    shown = int((page.locator("#process").text_content() or "").split()[1])
    assert shown != server.proc.pid  # a worker, not uvicorn's parent
