"""The fleet page in a real browser (issue 10, item 4): Debian's chromium, headless, driven by
python3-selenium through chromium-driver, against the collector's WSGI application served on
127.0.0.1 from a seeded SQLite store and a real repository.

Asserted: the content (boxes, stale marker, rollout numbers, conflicts), the filters (links
and the form, which needs no JavaScript), a box's history page, and that hostile box text is
shown as text and never acts: no script changes ``document.title``, no ``<img onerror>``
element exists, an injected ``<style>`` hides nothing (style is allowed inline, so only the
escaping stops that one), control and bidi characters are shown as escapes. Then a fleet of
more boxes than a page holds, in a second browser with JavaScript switched off: "next" and
"previous" lead through the pages and keep a hostile filter. Two stores, two servers and two
browsers for the module.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from conftest import require_tool

from opq_box_updater.publish import build, fleetpage, repo
from opq_box_updater.publish.collector import Collector
from opq_box_updater.publish.store import (
    ReportRecord,
    SqlStore,
    default_store_url,
    open_store,
)

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SCRIPT = "<script>document.title='pwned'</script>"
IMG = "<img src=x onerror=\"document.title='pwned'\">"
STYLE = "<style>body{display:none}</style>hidden?"
CONTROL = "ansi\x1b[2J bidi\u202eevil"


def selenium_webdriver() -> Any:
    try:
        from selenium import webdriver
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("python3-selenium is required in CI but not installed")
        pytest.skip("python3-selenium not installed")
    return webdriver


def rec(box_id: str, result: str, installed: int, *, received: datetime = NOW,
        status: str = "accepted", **extra: Any) -> ReportRecord:
    report = {"box_id": box_id, "last_result": result, "installed_version": installed,
              "channel": "version.json", "failed_versions": [], "error": None, **extra}
    return ReportRecord(box_id, received, "192.0.2.7", report, status, "ab" * 32)


#: In the order a collector would have received them.
SEED = [
    rec("delta", CONTROL, 1, received=NOW - 3 * DAY), rec("bravo", "updated", 1,
                                                           received=NOW - DAY),
    rec("echo", "updated", 2, received=NOW - DAY), rec("alpha", "updated", 2),
    rec("bravo", "apply-failed", 1, failed_versions=[2], error=IMG),
    rec(SCRIPT, "up-to-date", 1, error=STYLE), rec("alpha", IMG, 7, status="conflict"),
]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per connection: chromium's idle pre-connections must not block the loop
    (a single-threaded server waited ~100 s in shutdown for one to time out)."""

    daemon_threads = True


@contextlib.contextmanager
def serving(app: Collector) -> Iterator[str]:
    """``app`` on 127.0.0.1 (an unused port), in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, server_class=ThreadingServer,
                         handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A repository with v1 at 100 % and v2 at 10 %, its store seeded, the collector on
    127.0.0.1 (the clock fixed at NOW)."""
    base = tmp_path_factory.mktemp("browser")
    repo_dir, keydir = base / "repo", base / "keys"
    repo.init_repo(repo_dir, keydir, now=NOW - 10 * DAY)
    script = base / "update.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    for version, pct in ((1, 100), (2, 10)):
        build.build_package(base / f"p{version}.zip", version=version, run=script)
        repo.publish_release(repo_dir, keydir, base / f"p{version}.zip", rollout=pct,
                             now=NOW - (3 - version) * DAY)
    store = open_store(default_store_url(repo_dir))
    for record in SEED:
        store.add(record)
    store.close()
    with serving(Collector(default_store_url(repo_dir), clock=lambda: NOW,
                           repo=repo_dir)) as url:
        yield url


#: More boxes than two pages hold, every other one with the hostile result.
BIG = 2 * fleetpage.PAGE_SIZE + 30
HOSTILE = "<b>'\"&page=9&result=x#top</b>"


@pytest.fixture(scope="module")
def big_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """:data:`BIG` boxes in a store of their own (no repository: no rollout table)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('big')}/reports.db"
    store = open_store(url)
    assert isinstance(store, SqlStore)
    with store._write() as cur:  # one transaction, not one fsync per box
        for n in range(BIG):
            store._insert(cur, rec(f"box-{n:04d}", HOSTILE if n % 2 else "updated", 1))
    store.close()
    with serving(Collector(url, clock=lambda: NOW)) as base:
        yield base


def chromium(javascript: bool) -> Iterator[Any]:
    webdriver = selenium_webdriver()
    binary = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)  # --no-sandbox: the tests may run as root
    if not javascript:  # as a user who switched it off: 2 is "block" for every site
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium(javascript=True)


@pytest.fixture(scope="module")
def browser_no_js() -> Iterator[Any]:
    yield from chromium(javascript=False)


def arrived(driver: Any, url_part: str) -> None:
    """Wait until a click's navigation has loaded the page whose URL has ``url_part``."""
    wait_for(driver, 30).until(
        lambda d: url_part in d.current_url
        and d.execute_script("return document.readyState") == "complete")


def rows(driver: Any, table: str) -> dict[str, list[str]]:
    """Visible text of each row of a table, by its first cell."""
    found: dict[str, list[str]] = {}
    for tr in driver.find_elements("css selector", f"table.{table} tbody tr"):
        cells = [td.text for td in tr.find_elements("tag name", "td")]
        found[cells[0]] = cells
    return found


def test_fleet_page_content_and_hostile_text(browser: Any, site: str) -> None:
    browser.get(site + "/")
    assert browser.title == "OPQ Box fleet"  # no injected script ran
    assert browser.find_elements("tag name", "img") == []
    assert browser.find_elements("tag name", "script") == []
    assert browser.find_element("tag name", "body").is_displayed()  # the <style> is text
    boxes = rows(browser, "boxes")
    assert sorted(boxes) == sorted(["alpha", "bravo", SCRIPT, "delta", "echo"])
    assert boxes[SCRIPT][5] == STYLE
    assert boxes["bravo"][1:4] == ["version.json", "1", "apply-failed (failed current release)"]
    assert boxes["bravo"][5] == IMG
    assert boxes["delta"][3] == "ansi\\x1b[2J bidi\\u202eevil"
    assert boxes["delta"][4].endswith("stale") and not boxes["echo"][4].endswith("stale")
    rollouts = [[td.text for td in tr.find_elements("tag name", "td")]
                for tr in browser.find_elements("css selector", "table.rollouts tbody tr")]
    assert [r[:3] for r in rollouts] == [["version.json", "v2", "10%"],
                                         ["version.json", "v1", "100%"]]
    header = [th.text for th in browser.find_elements("css selector", "table.rollouts th")]
    numbers = dict(zip(header, rollouts[0], strict=True))
    assert (numbers["boxes"], numbers["updated"], numbers["failed"]) == ("5", "2", "1")
    conflicts = rows(browser, "conflicts")
    assert conflicts["alpha"][4] == IMG


def test_filters_work_from_links_and_the_form(browser: Any, site: str) -> None:
    browser.get(site + "/?release=2")
    assert sorted(rows(browser, "boxes")) == ["alpha", "echo"]
    browser.get(site + "/")
    browser.find_element("css selector", "select[name=result] option[value=apply-failed]"
                         ).click()
    browser.find_element("css selector", "form.filters button").click()
    arrived(browser, "result=apply-failed")
    assert sorted(rows(browser, "boxes")) == ["bravo"]
    browser.get(site + "/?result=" + quote(SCRIPT))
    assert rows(browser, "boxes") == {} and browser.title == "OPQ Box fleet"


def test_box_history_page(browser: Any, site: str) -> None:
    browser.get(site + "/")
    browser.find_element("link text", "bravo").click()
    arrived(browser, "/box/bravo")
    assert browser.title == "Box bravo"
    history = [[td.text for td in tr.find_elements("tag name", "td")]
               for tr in browser.find_elements("css selector", "table.history tbody tr")]
    assert [(h[1], h[6]) for h in history] == [("accepted", "apply-failed"),
                                               ("accepted", "updated")]
    assert history[0][8] == IMG
    browser.find_element("link text", "back to the fleet").click()  # a relative link
    wait_for(browser, 30).until(lambda d: d.current_url == site + "/")
    browser.get(site + "/")
    browser.find_element("link text", SCRIPT).click()
    arrived(browser, "/box/%3Cscript%3E")
    assert browser.title == "Box " + SCRIPT  # the text, not a script that ran
    browser.get(site + "/box/" + quote("no such box"))
    assert browser.find_element("tag name", "h1").text == "Not found"


def listed(driver: Any) -> list[str]:
    """The box ids of the boxes table, from one read of the page (200 rows read cell by
    cell through the driver took seconds)."""
    table = driver.page_source.split('<table class="boxes">', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<td><a href="box/([^"]*)">', table)


def test_pages_are_followed_with_javascript_off(browser_no_js: Any, big_site: str) -> None:
    browser = browser_no_js
    # JavaScript is really off in this browser: a page's own script does not run.
    browser.get("data:text/html,<p id=p>off</p><script>document.getElementById('p')"
                ".textContent='on'</script>")
    assert browser.find_element("id", "p").text == "off"
    selected = [f"box-{n:04d}" for n in range(1, BIG, 2)]  # the boxes with HOSTILE
    size = fleetpage.PAGE_SIZE
    browser.get(big_site + "/?" + urlencode({"result": HOSTILE}))
    assert listed(browser) == selected[:size]
    assert browser.find_element("css selector", "p.count").text == \
        f"boxes 1\u2013{size} of {len(selected)} matching the filters ({BIG} in the fleet)"
    assert browser.find_elements("tag name", "b") == []  # the filter's value is text
    browser.find_element("link text", "next").click()
    wait_for(browser, 30).until(lambda d: "page=2" in d.current_url)
    assert parse_qs(urlsplit(browser.current_url).query) == {"result": [HOSTILE],
                                                             "page": ["2"]}
    assert listed(browser) == selected[size:]
    assert browser.find_element("css selector", "p.pages").text.startswith("page 2 of 2")
    assert browser.find_elements("link text", "next") == []
    browser.find_element("link text", "previous").click()
    wait_for(browser, 30).until(lambda d: "page=1" in d.current_url)
    assert listed(browser) == selected[:size]
    # Unfiltered: three pages; the last one from the pager's "last" link.
    browser.get(big_site + "/")
    browser.find_element("link text", "last").click()
    wait_for(browser, 30).until(lambda d: "page=3" in d.current_url)
    assert listed(browser) == [f"box-{n:04d}" for n in range(2 * size, BIG)]


def wait_for(driver: Any, timeout: float) -> Any:
    """selenium's WebDriverWait (imported here: selenium may be missing, see above)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout)
