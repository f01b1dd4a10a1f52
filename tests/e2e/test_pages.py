"""The landing page, the favicon and the API docs in headless Chromium with every non-loopback request blocked,
as on a machine without internet: /docs must render the operations from files kvserve serves."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest

from tests.e2e.test_viewer import CHROMIUM, CHROMIUM_ARGS
from tests.integration.live_server import API_KEY, SERVED_NAME, LiveServer, start_server

pytestmark = pytest.mark.e2e

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# The API's operations as the docs must list them (the schema itself is checked in tests/integration).
OPERATIONS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/health", "/metrics"]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = start_server("--api-key", API_KEY, "--max-model-len", "512")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="run scripts/install_browser.sh")
    if not CHROMIUM.is_file():
        pytest.skip("Debian chromium is not installed (run scripts/install_browser.sh)")
    # No DNS either: only loopback addresses resolve.
    offline = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=offline)
        yield chromium
        chromium.close()


class OfflinePage:
    """A page whose requests to anything but loopback are aborted and recorded, with its JS errors."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        self.blocked: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("requestfailed", lambda request: self.failed.append(request.url))

    def _route(self, route) -> None:
        if urlparse(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("internetdisconnected")

    def check_clean(self) -> None:
        assert self.blocked == [], f"the page reached for the internet: {self.blocked}"
        assert self.failed == [], f"requests failed: {self.failed}"
        assert self.errors == [], f"JavaScript errors: {self.errors}"


@pytest.fixture
def offline(browser) -> Iterator[OfflinePage]:
    page = OfflinePage(browser)
    yield page
    page.context.close()


def test_swagger_ui_renders_the_operations_offline(offline: OfflinePage, server: LiveServer) -> None:
    page = offline.page
    page.goto(f"{server.base_url}/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    shown = {p.replace("\u200b", "").strip() for p in paths}
    assert set(OPERATIONS) <= shown, shown
    # An operation opens and shows its parameters/body schema.
    page.locator(".opblock-post .opblock-summary", has_text="/v1/completions").first.click()
    page.wait_for_selector(".opblock.is-open .opblock-section", timeout=10_000)
    offline.check_clean()


def test_redoc_is_not_offered(server: LiveServer) -> None:
    """ReDoc's bundle fetches its logo from its CDN whatever the options, so kvserve serves Swagger UI only."""
    assert httpx.get(f"{server.base_url}/redoc", timeout=10).status_code == 404


def test_landing_page_shows_model_version_and_working_links(offline: OfflinePage, server: LiveServer) -> None:
    page = offline.page
    page.goto(f"{server.base_url}/")
    version = httpx.get(f"{server.base_url}/version", timeout=10).json()["version"]
    assert page.title() == f"kvserve {version}"
    assert page.text_content("#model-name") == SERVED_NAME
    assert page.text_content("#model-state") == "ready"
    assert page.text_content("#model-context") == "512 tokens"
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    for target in ("/docs", "/inspect", "/metrics", "/v1/models", "/health", "/ready", "/openapi.json"):
        assert f"{server.base_url}{target}" in hrefs, target
    for href in hrefs:  # every link works (the key is the API's business, not the page's)
        status = httpx.get(href, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}).status_code
        assert status == 200, href
    assert page.evaluate("document.querySelector('h1 img').naturalWidth") > 0
    offline.check_clean()


def test_favicon_draws(browser, server: LiveServer) -> None:
    """The icon the pages name and the one browsers ask for by default. (A plain context: Playwright's request
    routing fails /favicon.ico loads on its own.)"""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base_url}/")
        for icon in ("/favicon.svg", "/favicon.ico"):
            width = page.evaluate("""(src) => new Promise((done) => {
                const img = new Image(); img.onload = () => done(img.naturalWidth); img.onerror = () => done(0);
                img.src = src; })""", icon)
            assert width > 0, icon
    finally:
        context.close()
