"""The documentation site as a new user reads it: every page in a headless Chromium at 1280 px, with no table or
code block wider than its column, no missing image and every formula rendered.

Chromium and its driver come from the distribution's packages (Debian: chromium, chromium-driver), driven by
Selenium. Where either is absent the test skips, except where $FORDE_REQUIRE_BROWSER is set (CI), where it fails.
The site is the one $FORDE_SITE_DIR points to (CI builds it once), else built here with `mkdocs build --strict`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 900
REQUIRED = bool(os.environ.get("FORDE_REQUIRE_BROWSER"))

# What overflows or is missing on the page, as [kind, detail] pairs. Material wraps each table in a scrolling
# .md-typeset__scrollwrap and lets a code block scroll: either scrolling sideways is a reader scrolling sideways.
PROBLEMS_JS = """
const problems = [];
const shown = e => (e.innerText || e.outerHTML).slice(0, 70).replace(/\\s+/g, ' ');
const wider = e => e.scrollWidth > e.clientWidth + 1;
for (const e of document.querySelectorAll('.md-typeset__scrollwrap'))
  if (wider(e)) problems.push(['table wider than the page', `${e.scrollWidth} > ${e.clientWidth} px: ${shown(e)}`]);
for (const e of document.querySelectorAll('.md-content pre > code'))
  if (wider(e)) problems.push(['code wider than the page', `${e.scrollWidth} > ${e.clientWidth} px: ${shown(e)}`]);
for (const e of document.querySelectorAll('.md-content img'))
  if (!e.complete || e.naturalWidth === 0) problems.push(['missing image', e.getAttribute('src')]);
for (const e of document.querySelectorAll('.arithmatex'))
  if (!e.querySelector('.katex') || e.querySelector('.katex-error')) problems.push(['maths not rendered', shown(e)]);
if (document.documentElement.scrollWidth > window.innerWidth)
  problems.push(['page wider than the window', `${document.documentElement.scrollWidth} px`]);
return problems;
"""

# Breaks one of each kind into a page, to see the check find them.
BREAK_JS = """
const article = document.querySelector('.md-content article');
article.insertAdjacentHTML('beforeend',
  '<div class="md-typeset__scrollwrap"><div class="md-typeset__table"><table><tr>' +
  '<td>a very wide cell</td>'.repeat(60) + '</tr></table></div></div>' +
  '<pre><code>' + 'x'.repeat(400) + '</code></pre>' +
  '<img src="no-such-figure.png">' +
  '<span class="arithmatex">\\\\(\\\\frac{1}{\\\\)</span>');
"""


def browser_tools() -> tuple[str, str] | None:
    chromium = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


pytestmark = [
    needs("selenium"),
    pytest.mark.skipif(
        not REQUIRED and browser_tools() is None,
        reason="needs Chromium and its driver from the distribution (Debian: apt install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if os.environ.get("FORDE_SITE_DIR"):
        return Path(os.environ["FORDE_SITE_DIR"])
    if shutil.which("mkdocs") is None and not REQUIRED:
        pytest.skip("needs mkdocs: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tools = browser_tools()
    assert tools, "Chromium and chromedriver are required here ($FORDE_REQUIRE_BROWSER) but not installed"
    options = webdriver.ChromeOptions()
    options.binary_location = tools[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    driver = webdriver.Chrome(service=Service(tools[1]), options=options)
    yield driver
    driver.quit()


def pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("index.html") if p.parent.name not in ("search", "assets"))


def test_every_page_fits_1280_px_with_its_images_and_maths(site, browser):
    problems = []
    for page in pages(site):
        browser.get(page.as_uri())
        assert browser.execute_script("return window.innerWidth") == WIDTH
        name = page.parent.relative_to(site).as_posix() or "home"
        problems += [f"{name}: {kind}: {detail}" for kind, detail in browser.execute_script(PROBLEMS_JS)]
    assert len(pages(site)) >= 15
    assert not problems, "\n".join(problems)


def test_the_check_finds_each_kind_of_problem(site, browser):
    browser.get((site / "index.html").as_uri())
    assert browser.execute_script(PROBLEMS_JS) == []
    browser.execute_script(BREAK_JS)
    kinds = {kind for kind, _ in browser.execute_script(PROBLEMS_JS)}
    assert {"table wider than the page", "code wider than the page", "missing image", "maths not rendered"} <= kinds
