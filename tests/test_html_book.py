"""The built HTML book: every page exists, shows its figures, and renders in a real browser.

Run after `make book` (``make test`` does both). Without a build, or without Chromium, the tests
skip with a message saying what to do -- except under CI (``CI=true``), where they fail.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [c["file"] for c in part.get("chapters", []) or []]
    return pages


def notebook_png_count(page: str) -> int:
    path = ROOT / f"{page}.ipynb"
    if not path.exists():
        return 0
    nb = json.loads(path.read_text())
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def built():
    if not (HTML / "index.html").exists():
        _missing("the HTML book is not built: run `make book` first")
    return HTML


@pytest.mark.parametrize("page", toc_pages())
def test_page_exists_and_shows_its_figures(built, page):
    html_file = built / f"{page}.html"
    assert html_file.exists(), f"{page} is in _toc.yml but {html_file.relative_to(ROOT)} was not built"
    html = html_file.read_text(encoding="utf-8")
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    local = [src for src in images if not src.startswith(("http:", "https:", "data:"))]
    expected = notebook_png_count(page)
    assert len(local) >= expected, f"{page}: notebook stores {expected} figures, page shows {len(local)}"
    for src in local:
        assert (html_file.parent / src).resolve().exists(), f"{page}: image {src} missing from the build"


# --------------------------------------------------------------------------- in a real browser

def _driver():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        _missing("headless Chromium is not installed: on Debian/Ubuntu run "
                 "`sudo apt-get install chromium chromium-driver` (selenium drives it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1600",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.fixture(scope="module")
def browser(built):
    handler = functools.partial(_QuietHandler, directory=str(built))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    driver = _driver()
    driver.set_page_load_timeout(60)
    try:
        yield driver, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        driver.quit()
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    failed: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def send_error(self, code, message=None, explain=None):
        _QuietHandler.failed.append(f"{code} {self.path}")
        super().send_error(code, message, explain)


@pytest.mark.parametrize("page", toc_pages())
def test_page_renders_in_chromium(browser, page):
    driver, base = browser
    _QuietHandler.failed.clear()
    driver.get_log("browser")  # drop messages from earlier pages
    driver.set_window_size(1280, 1600)
    driver.get(f"{base}/{page}.html")
    title = driver.title
    text = driver.find_element("tag name", "main").text
    assert title.endswith("DETR, step by step") and len(title) > len("DETR, step by step"), \
        f"{page}: unexpected title {title!r}"
    assert len(text) > 200, f"{page}: main text is only {len(text)} characters"
    assert driver.find_elements("tag name", "h1"), f"{page}: no heading"
    broken = driver.execute_script(
        "return Array.from(document.images)"
        ".filter(i => i.src.startsWith(location.origin) && !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.src);")
    assert not broken, f"{page}: images that did not load: {broken}"
    # Resources served from the book itself must all load. (JavaScript console errors of the
    # theme's own scripts are not resource failures and are left to the upstream projects.)
    local_errors = [e["message"] for e in driver.get_log("browser")
                    if base in e["message"] and ("Failed to load resource" in e["message"] or "net::ERR" in e["message"])]
    assert not local_errors and not _QuietHandler.failed, \
        f"{page}: local resources failed: {local_errors or _QuietHandler.failed}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 800), 8000))  # the whole page, within reason
    driver.save_screenshot(str(SCREENSHOTS / f"{page.replace('/', '_')}.png"))
