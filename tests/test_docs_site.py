"""The built documentation site works offline, in a real browser.

The site is built with ``mkdocs build --strict``, served from 127.0.0.1 and loaded in
headless Chromium (Debian's ``chromium``): the lifecycle diagram must be drawn as an SVG
by the Mermaid copy served with the site (not left as raw text, not fetched from a CDN),
and the Benchmarks page must show its tables and its charts. No page may ask for anything
outside the site. Skipped when Chromium is missing, except in CI.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.chromium import Browser, attributes, find_chromium, open_browser, walk

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def missing(what: str, fix: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing in CI: {fix}")
    pytest.skip(f"no {what} ({fix})")


@pytest.fixture(scope="module")
def chromium() -> str:
    executable = find_chromium()
    if executable is None:
        missing("Chromium", "apt-get install chromium")
    assert executable is not None
    return executable


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The site, built strictly into a temporary directory and served on 127.0.0.1."""
    if importlib.util.find_spec("material") is None:
        missing("mkdocs-material", 'pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=True,
        timeout=300,
    )
    handler = functools.partial(QuietHandler, directory=str(out))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with open_browser(chromium) as browser:
        yield browser


def assert_offline(browser: Browser) -> None:
    """Every request the page made went to the site itself (or was inline data)."""
    outside = [
        url
        for url in browser.requested_urls()
        if not url.startswith("data:") and urlsplit(url).hostname != "127.0.0.1"
    ]
    assert outside == []
    assert browser.exceptions() == []


def test_the_lifecycle_diagram_is_drawn(site: str, browser: Browser) -> None:
    # Material replaces each <pre class="mermaid"> with a <div class="mermaid"> whose
    # (closed) shadow root holds the SVG; a diagram that fails to parse stays a <pre>.
    browser.load(f"{site}/lifecycle/", "document.querySelectorAll('div.mermaid').length > 0")
    assert browser.evaluate("document.querySelectorAll('pre.mermaid').length") == 0

    diagrams = [
        node
        for node in walk(browser.dom())
        if node.get("nodeName") == "DIV" and attributes(node).get("class") == "mermaid"
    ]
    assert len(diagrams) == 1
    drawn = [child for root in diagrams[0]["shadowRoots"] for child in root.get("children", [])]
    assert [node["nodeName"].lower() for node in drawn] == ["svg"]
    labels = {node.get("nodeValue", "") for node in walk(drawn[0]) if node.get("nodeType") == 3}
    assert "sessionmw middleware" in labels
    assert_offline(browser)


def test_the_benchmarks_page_has_its_tables_and_charts(site: str, browser: Browser) -> None:
    browser.load(f"{site}/benchmarks/", "document.readyState === 'complete'")
    tables = browser.evaluate("document.querySelectorAll('article table').length")
    assert tables >= 5  # the in-process, server and networked tables, filled from results/
    charts = browser.evaluate(
        "[...document.querySelectorAll('article img')]"
        ".map(img => [new URL(img.src).pathname, img.complete, img.naturalWidth])"
    )
    assert sorted(path for path, _, _ in charts) == [
        "/benchmarks/network.png",
        "/benchmarks/results.png",
    ]
    assert all(complete and width > 0 for _, complete, width in charts), charts
    assert_offline(browser)
