"""The neuron dashboard in a real headless browser (Debian's chromium driven by playwright).

The site is built from a small real rank run (tiny Llama) and opened from the file system:
the table sorts and filters, the search box and the table links open neuron pages, a page
shows its charts and shaded contexts, the console stays free of errors and the browser asks
for nothing but ``file://`` addresses. Screenshots of each page type are saved in the test's
temporary folder. ``.ci/run`` installs chromium; without it these tests are skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wasserstein_neurons.workflows.report import ReportConfig, build_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def site(report_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser-site") / "site"
    cfg = ReportConfig(
        run=str(report_runs["rank"]), out=str(out), disentangle=str(report_runs["disentangle"])
    )
    return build_report(cfg, progress=False).out


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Watched:
    """A page whose console errors, page errors and requested addresses are recorded."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def check_clean(self):
        assert self.errors == []
        assert self.requests and all(u.startswith("file://") for u in self.requests), [
            u for u in self.requests if not u.startswith("file://")
        ]


@pytest.fixture
def watched(browser):
    w = Watched(browser)
    yield w
    w.page.close()


def _column(page, index: int) -> list[float]:
    return page.eval_on_selector_all(
        "#neurons tbody tr",
        f"rows => rows.filter(r => r.style.display !== 'none')"
        f".map(r => parseFloat(r.cells[{index}].dataset.v))",
    )


def test_index_sorts_filters_and_links(site, watched, tmp_path):
    page = watched.page
    page.goto((site / "index.html").as_uri())
    n_rows = page.locator("#neurons tbody tr").count()
    assert n_rows == 12  # 5% of 128 neurons in each of 2 layers
    assert page.locator("svg.wd-profile").count() == 1
    wd_header = page.locator("#neurons th", has_text="WD").first
    wd_header.click()
    values = _column(page, 2)
    assert values == sorted(values) and len(values) == n_rows
    wd_header.click()
    assert _column(page, 2) == sorted(values, reverse=True)
    page.select_option("#layer-filter", "1")
    layers = _column(page, 0)
    assert layers == [1.0] * 6
    assert page.locator("#shown").inner_text() == "6 of 12 neurons shown"
    page.fill("#wd-min", "1000")
    assert _column(page, 0) == []
    page.fill("#wd-min", "")
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    link = page.locator("#neurons tbody tr:visible a").first
    neuron = link.inner_text()
    link.click()
    page.wait_for_url(f"**/neurons/1_{neuron}.html")
    assert page.locator("h1").inner_text() == f"Layer 1 neuron {neuron}"
    watched.check_clean()


def test_search_opens_a_neuron_page_with_charts_and_shaded_tokens(site, watched, tmp_path):
    page = watched.page
    page.goto((site / "index.html").as_uri())
    page.fill("#search", "0:999")
    page.press("#search", "Enter")
    assert "no page for 0:999" in page.locator("#search-msg").inner_text()
    first = page.locator("#neurons tbody tr").first
    layer, neuron = (first.locator("td").nth(i).inner_text() for i in (0, 1))
    page.fill("#search", f"{layer}:{neuron}")
    page.press("#search", "Enter")
    page.wait_for_url(f"**/neurons/{layer}_{neuron}.html")
    for chart in ("svg.hist-linear", "svg.hist-log", "svg.qq"):
        box = page.locator(chart).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100, chart
    assert page.locator("svg.hist-log rect").count() > 3  # bars drawn
    high = page.locator(".tail.high .ctx")
    assert high.count() == 8
    target = high.first.locator("span.x")
    color = target.evaluate("e => getComputedStyle(e).backgroundColor")
    assert color.startswith("rgba(214, 39, 40") or color == "rgb(214, 39, 40)", color
    assert page.locator(".ctx span[data-a]").count() > 8 * 5
    assert page.locator(".qbin").count() == 8
    page.screenshot(path=str(tmp_path / "neuron.png"), full_page=True)
    page.click("#back")
    page.wait_for_url("**/index.html")
    watched.check_clean()


def test_disentangle_page_shows_overlays(site, watched, report_runs, tmp_path):
    import numpy as np

    plotted = int(np.load(report_runs["disentangle"] / "top_neuron_outputs.npz")["neurons"][0])
    page = watched.page
    page.goto((site / "neurons" / f"1_{plotted}.html").as_uri())
    for chart in ("svg.overlay-dist", "svg.by-expert", "svg.w1k"):
        assert page.locator(chart).is_visible(), chart
    page.screenshot(path=str(tmp_path / "neuron_disentangle.png"), full_page=True)
    watched.check_clean()
