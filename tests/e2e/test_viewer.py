"""The attention viewer in headless Chromium (Debian's, driven by Playwright): drawn heatmap, hover, logit lens.

Needs scripts/install_browser.sh. Screenshots go to artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.live_server import API_KEY, LiveServer, start_server

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PROMPT = "The dog chased the llama because it"
READY_TIMEOUT_MS = 180_000  # a 512-token inspection on the shared 2-core box

# Count canvas pixels by kind: "coloured" (the blue ramp, weight > ~0.05), "masked" (grey above the diagonal).
PIXELS_JS = """(id) => {
  const c = document.getElementById(id), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let coloured = 0, masked = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 2] - d[i] > 40) coloured++;
    else if (d[i] === 233 && d[i + 1] === 236 && d[i + 2] === 240) masked++;
  }
  return {coloured, masked, width: c.width, height: c.height};
}"""


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = start_server("--api-key", API_KEY, "--max-model-len", "1024", "--inspect-max-tokens", "512")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="run scripts/install_browser.sh")
    if not CHROMIUM.is_file():
        pytest.skip("Debian chromium is not installed (run scripts/install_browser.sh)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server: LiveServer):
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.base_url}/inspect")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def run_inspection(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#run")
    page.wait_for_selector("#status[data-state=ready], #status[data-state=error]", timeout=READY_TIMEOUT_MS)
    assert page.get_attribute("#status", "data-state") == "ready", page.text_content("#status")


def test_inspect_prompt_draws_heatmap_highlights_and_lens(page) -> None:
    run_inspection(page, PROMPT)
    tokens = page.locator("#strip .tok")
    n = tokens.count()
    assert n >= 8
    heatmap = page.evaluate(PIXELS_JS, "heatmap")
    assert heatmap["coloured"] > 0 and heatmap["masked"] > 0, heatmap  # drawn, with the causal triangle
    grid = page.evaluate(PIXELS_JS, "grid")
    assert grid["coloured"] > 30 * 9, grid  # every small map has some attention drawn

    it = tokens.filter(has_text=re.compile(r"^\s*it$")).last
    it_index = int(it.get_attribute("data-index"))
    it.hover()
    attended = page.locator("#strip .tok.attended")
    assert attended.count() >= 1
    indices = [int(i) for i in attended.evaluate_all("els => els.map(e => e.dataset.index)")]
    assert all(i <= it_index for i in indices)
    backgrounds = attended.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert all(b not in ("", "rgba(0, 0, 0, 0)") for b in backgrounds)
    assert "it”" in page.text_content("#focus-info") and "attends to" in page.text_content("#focus-info")
    assert "query" in (it.get_attribute("class") or "")

    rows = page.locator("#lens tbody tr")
    assert rows.count() == 30
    cells = page.locator("#lens tbody td")
    assert cells.count() == 30 * min(n, 12)
    assert all(text.strip() for text in cells.all_text_contents())
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "inspect-viewer.png"))

    # Clicking a grid cell opens that layer and head.
    box = page.locator("#grid").bounding_box()
    page.mouse.click(box["x"] + box["width"] - 8, box["y"] + box["height"] - 8)
    page.wait_for_selector(f"#heatmap[data-drawn='29/8/{n}']")

    with page.expect_download() as download_info:
        page.click("#download")
    saved = json.loads(Path(download_info.value.path()).read_text())
    assert [t["id"] for t in saved["summary"]["tokens"]] == [int(t) for t in tokens.evaluate_all(
        "els => els.map(e => e.title.match(/id (\\d+)/)[1])")]
    assert {"0", "29"} <= set(saved["layers"]) and len(saved["layers"]["0"]["attention"][0]) == 9
    assert saved["logit_lens"][0]["predictions"]


def test_handles_512_tokens(page) -> None:
    words = "The llama, who was chased by the dog, ran back to the farm because it was hungry. "
    page.fill("#max-tokens", "6")
    run_inspection(page, (words * 23).rstrip())  # 506 tokens, plus 6 generated
    n = page.locator("#strip .tok").count()
    assert n == 512 and page.locator("#strip .tok.generated").count() == 6
    heatmap = page.evaluate(PIXELS_JS, "heatmap")
    assert page.get_attribute("#heatmap", "data-drawn") == f"0/0/{n}" and heatmap["coloured"] > 0
    page.locator("#strip .tok").nth(n - 1).scroll_into_view_if_needed()
    page.locator("#strip .tok").nth(n - 1).click()
    page.wait_for_function(f"document.getElementById('lens').dataset.window.endsWith(':{n}')")
    assert page.locator("#lens tbody tr").count() == 30
    page.check("#stretch")  # long, diffuse maps: each row scaled to its maximum shows more
    assert page.evaluate(PIXELS_JS, "heatmap")["coloured"] > heatmap["coloured"]
    page.screenshot(path=str(ARTIFACTS / "inspect-viewer-512.png"))


def test_wrong_api_key_is_reported(page) -> None:
    page.fill("#api-key", "wrong")
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector("#status[data-state=error]", timeout=60_000)
    assert "401" in page.text_content("#status")
