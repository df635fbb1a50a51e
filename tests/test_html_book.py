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
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
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


def built_pages(built) -> list[Path]:
    return sorted(p for p in built.rglob("*.html") if "_static" not in p.parts)


def test_mathjax_is_served_with_the_book(built):
    """Pages load MathJax from the book's own _static folder, never from a CDN."""
    with_math = 0
    for html_file in built_pages(built):
        html = html_file.read_text(encoding="utf-8")
        if 'class="math' not in html:
            continue
        with_math += 1
        sources = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', html, flags=re.IGNORECASE)
        assert sources, f"{html_file.name}: has math but loads no MathJax"
        for src in sources:
            assert not src.startswith(("http:", "https:", "//")), f"{html_file.name}: MathJax from {src}"
            assert (html_file.parent / src.split("?")[0]).resolve().is_file(), \
                f"{html_file.name}: {src} is not in the build"
    assert with_math, "no page has math: the check would pass vacuously"


def test_no_page_links_to_a_repository_the_book_does_not_have(built):
    """While _config.yml names no repository, no button or link points at one."""
    url = CONFIG.get("repository", {}).get("url") or ""
    buttons = {k: v for k, v in CONFIG.get("html", {}).items() if k.startswith("use_") and k.endswith("_button")}
    launch = {k: v for k, v in (CONFIG.get("launch_buttons") or {}).items() if k.endswith("_url") and v}
    if not url:
        assert not any(buttons.values()) and not launch, \
            f"_config.yml names no repository but turns on {buttons} {launch}"
    for html_file in built_pages(built):
        html = html_file.read_text(encoding="utf-8")
        assert "github.com/detr-tutorial/" not in html, f"{html_file.name} links to a repository that does not exist"
        if not url:
            for marker in ("mybinder.org", "colab.research.google.com", "repository-button", "/issues/new"):
                assert marker not in html, f"{html_file.name}: {marker!r} but _config.yml names no repository"
        else:
            assert "github.com/detr-tutorial/detr_tutorial" not in url


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
                 # offline, as a reader without a network: only the local server resolves
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
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


def _check_math_rendered(driver, page: str) -> None:
    """Every math element was typeset by MathJax, and no raw TeX delimiter is left in the text."""
    math = driver.find_elements("css selector", "main .math")
    if not math:
        return
    driver.set_script_timeout(60)
    state = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) { done('MathJax not loaded'); return; }"
        "MathJax.startup.promise.then(() => done('ok'), e => done('MathJax failed: ' + e));")
    assert state == "ok", f"{page}: {state}"
    untypeset = driver.execute_script(
        "return Array.from(document.querySelectorAll('main .math'))"
        ".filter(e => !e.querySelector('mjx-container') && e.tagName !== 'MJX-CONTAINER')"
        ".map(e => e.textContent.slice(0, 60));")
    assert not untypeset, f"{page}: math left as raw TeX: {untypeset[:3]}"
    assert len(driver.find_elements("css selector", "main mjx-container")) >= len(math)
    # The visible prose (code blocks aside) shows no TeX delimiters.
    prose = driver.execute_script(
        "const m = document.querySelector('main').cloneNode(true);"
        "m.querySelectorAll('pre, code, mjx-container, mjx-assistive-mml').forEach(e => e.remove());"
        "return m.innerText;")
    for delimiter in ("\\(", "\\[", "$$"):
        assert delimiter not in prose, f"{page}: raw {delimiter!r} visible in the text"


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
    _check_math_rendered(driver, page)
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
