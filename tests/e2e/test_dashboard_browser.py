"""The dashboard in a real browser (headless Chromium) against a real uvicorn."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.serving import Server

APP = "tests.e2e.app_dashboard:app"
# Headless, with no call to Google's services (refused on a closed network), as root too.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(
            "Chromium is not installed: the dashboard's browser test needs Debian's package "
            "'chromium'. Run 'sudo bash scripts/system-deps.sh'."
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # JavaScript errors, not failed fetches (a 503 from checks.json, a server gone): the page
    # shows those itself, and the tests read them there.
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    yield page
    page.close()
    assert errors == [], "the page logged errors"


def test_dashboard_follows_a_request_that_holds_a_connection(
    serve: type[Server], page: Page
) -> None:
    """The page shows the pool, a request holding a connection (flagged once held past the
    leak threshold), its release, and a check that breaks."""
    server = serve(APP)
    page.goto(f"{server.base_url}/tether/")
    expect(page.locator("#state")).to_have_text("running")
    conn = page.locator('#resources tr[data-resource="conn"]')
    expect(conn.locator(".opened")).to_have_text("0")
    expect(page.locator("#in-flight tbody")).to_have_text("Nothing in flight.")
    expect(page.locator('#checks tr[data-check="pool"] .status')).to_have_text("ok")

    held: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: held.append(httpx.get(f"{server.base_url}/hold", timeout=30))
    )
    request.start()
    figures = page.locator('#pools tr[data-pool="pool"]')
    try:
        expect(conn.locator(".in-use")).to_have_text("1")
        expect(figures.locator(".in-use")).to_have_text("1")
        expect(figures.locator(".waiting")).to_have_text("–")
        expect(figures.locator(".created")).to_have_text("5")
        expect(figures.locator(".discarded")).to_have_text("1")
        unit = page.locator("#in-flight tbody tr").first
        expect(unit.locator("td").first).to_have_text("GET /hold")
        # Past leak_threshold (1 s) the holding is flagged, with who acquired it.
        leak = unit.locator("details")
        expect(leak).to_be_visible(timeout=10_000)
        expect(conn.locator(".leaks")).to_have_text("1")
        expect(conn).to_have_class("warn")
        expect(leak.locator("summary")).to_contain_text("held past the leak threshold (1 s)")
        leak.locator("summary").click()
        expect(leak.locator("pre")).to_have_text("acquired by GET /hold")
        # Opened, it stays open while the page refreshes (every 0.2 s here).
        page.wait_for_timeout(1000)
        expect(leak.locator("pre")).to_be_visible()
    finally:
        httpx.post(f"{server.base_url}/release", timeout=10)
        request.join(timeout=10)
    assert [r.text for r in held] == ['"released"']
    expect(conn.locator(".in-use")).to_have_text("0")
    expect(figures.locator(".in-use")).to_have_text("0")
    expect(conn.locator(".closed")).to_have_text("1")
    expect(page.locator("#in-flight tbody")).to_have_text("Nothing in flight.")
    expect(page.locator("#units-total")).to_have_text("1")

    httpx.post(f"{server.base_url}/break", timeout=10)
    page.locator("#run-checks").click()
    pool = page.locator('#checks tr[data-check="pool"]')
    expect(pool.locator(".status")).to_have_text("failing")
    expect(pool).to_contain_text("ConnectionError: connection refused by 127.0.0.1:5432")
    expect(page.locator("#checks-status")).to_have_text("unavailable")
    page.screenshot(path=server.log_path.with_name("dashboard.png"), full_page=True)


def test_dashboard_says_when_the_server_is_gone(serve: type[Server], page: Page) -> None:
    """When the server stops, the page keeps its last figures and says it cannot read them."""
    server = serve(APP)
    page.goto(f"{server.base_url}/tether/")
    expect(page.locator("#state")).to_have_text("running")
    server.stop()
    expect(page.locator("#error")).to_contain_text("Cannot read the stats")
    expect(page.locator("#state")).to_have_text("running")
