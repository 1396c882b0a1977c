"""The fleet page's renderer (issue 10, item 4): content, filters, and hostile box text.

The HTML is parsed back (html.parser) and compared cell by cell: what a box sent must come
back as the same visible text (control and bidi characters as escapes), never as markup.
"""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

from opq_box_updater.publish import build, fleetpage, fleetweb, repo, rollout
from opq_box_updater.publish.collector import Collector
from opq_box_updater.publish.store import ReportRecord, SqlStore, default_store_url, open_store

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SCRIPT = "<script>document.title='pwned'</script>"
IMG = "<img src=x onerror=\"document.title='pwned'\">"
CONTROL = "ansi\x1b[2Jbidi\u202eevil\u0000nul"


class Cells(HTMLParser):
    """Text of every cell, by table class; tags seen; attributes of links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[str] = []
        self.hrefs: list[str] = []
        self.title = ""
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "table":
            self._table = values.get("class") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "a":
            self.hrefs.append(values.get("href") or "")
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data


def parse(page: bytes) -> Cells:
    cells = Cells()
    cells.feed(page.decode("utf-8"))
    return cells


def rec(box_id: str, result: str, installed: int, *, received: datetime = NOW,
        status: str = "accepted", **extra: Any) -> ReportRecord:
    report = {"box_id": box_id, "last_result": result, "installed_version": installed,
              "channel": "version.json", "failed_versions": [], "error": None, **extra}
    return ReportRecord(box_id, received, "192.0.2.1", report, status, "k" * 64)


def fleet() -> list[ReportRecord]:
    return [rec("alpha", "updated", 2), rec("bravo", "apply-failed", 1, failed_versions=[2],
                                            error=IMG),
            rec(SCRIPT, "up-to-date", 1), rec("delta", CONTROL, 1, received=NOW - 3 * DAY),
            rec("echo", "updated", 2, channel="version-beta.json")]


def health_rows() -> list[rollout.Health]:
    ref = rollout.ReleaseRef("version.json", 2, 10, NOW - DAY)
    return [rollout.health(ref, rollout.latest_views(fleet()), NOW)]


def boxes_of(cells: Cells) -> dict[str, list[str]]:
    return {row[0]: row for row in cells.tables["boxes"][1:]}


def test_fleet_page_lists_boxes_with_stale_marker_and_rollout_numbers() -> None:
    cells = parse(fleetpage.fleet_page(fleet(), health_rows(), [], fleetpage.Filters(), NOW))
    boxes = boxes_of(cells)
    assert sorted(boxes) == sorted(["alpha", "bravo", SCRIPT, "delta", "echo"])
    assert boxes["alpha"][1:4] == ["version.json", "2", "updated"]
    assert boxes["bravo"][3] == "apply-failed (failed current release)"
    assert boxes["delta"][4] == "2031-02-26T12:00:00Z stale"
    assert "stale" not in boxes["alpha"][4]
    [header, row] = cells.tables["rollouts"]
    numbers = dict(zip(header, row, strict=True))
    assert (numbers["release"], numbers["rollout"], numbers["boxes"], numbers["updated"],
            numbers["failed"]) == ("v2", "10%", "4", "1", "1")
    assert numbers["failure rate"] == "50.0%"


def test_hostile_box_text_is_shown_as_text_never_markup() -> None:
    conflict = rec(SCRIPT, IMG, 9, status="conflict")
    page = fleetpage.fleet_page(fleet(), health_rows(), [conflict], fleetpage.Filters(), NOW)
    text = page.decode("utf-8")
    assert "<script" not in text and "<img" not in text  # no such element at all
    assert "\x1b" not in text and "\u202e" not in text and "\x00" not in text
    cells = parse(page)
    assert "script" not in cells.tags and "img" not in cells.tags
    boxes = boxes_of(cells)
    assert boxes[SCRIPT][0] == SCRIPT  # the same visible text
    assert boxes["bravo"][5] == IMG
    assert boxes["delta"][3] == "ansi\\x1b[2Jbidi\\u202eevil\\x00nul"
    assert cells.tables["conflicts"][1][0] == SCRIPT
    assert cells.tables["conflicts"][1][4] == IMG
    # The link to the box's page carries the id percent-encoded, not as markup.
    assert "box/%3Cscript%3Edocument.title%3D%27pwned%27%3C%2Fscript%3E" in cells.hrefs


def test_filters_by_release_result_and_channel() -> None:
    def shown(query: str) -> list[str]:
        page = fleetpage.fleet_page(fleet(), health_rows(), [],
                                    fleetpage.Filters.parse(query), NOW)
        return sorted(boxes_of(parse(page)))

    assert shown("release=2") == ["alpha", "echo"]
    assert shown("release=2&channel=version.json") == ["alpha"]
    assert shown("result=apply-failed") == ["bravo"]
    assert shown("result=" + "%3Cscript%3E") == []  # echoed into the form escaped
    assert len(shown("release=x2")) == 5 and len(shown("release=%D9%A2")) == 5  # ignored
    page = fleetpage.fleet_page(fleet(), health_rows(), [], fleetpage.Filters.parse(
        "release=2"), NOW).decode()
    assert "boxes 1&ndash;2 of 2 matching the filters (5 in the fleet)" in page
    assert '<option value="2" selected>' in page
    assert "no box matches the filters (5 in the fleet)" in fleetpage.fleet_page(
        fleet(), health_rows(), [], fleetpage.Filters.parse("result=nothing"), NOW).decode()


def test_box_page_shows_the_history_escaped() -> None:
    history = [rec(SCRIPT, "updated", 2, release_version=2),
               rec(SCRIPT, "apply-failed", 1, received=NOW - DAY, error=CONTROL,
                   failed_versions=[2]),
               rec(SCRIPT, IMG, 1, received=NOW - 2 * DAY, status="conflict")]
    page = fleetpage.box_page(SCRIPT, history, NOW)
    assert b"<script" not in page and b"<img" not in page
    cells = parse(page)
    assert cells.title == "Box " + SCRIPT
    rows = cells.tables["history"]
    assert rows[0][:3] == ["received", "status", "from"]
    assert [r[1] for r in rows[1:]] == ["accepted", "accepted", "conflict"]
    assert rows[1][4:7] == ["2", "2", "updated"]
    assert rows[2][7:9] == ["2", "ansi\\x1b[2Jbidi\\u202eevil\\x00nul"]
    assert rows[3][6] == IMG


def test_long_box_text_is_cut() -> None:
    long_id = "x" * 1000
    page = fleetpage.fleet_page([rec(long_id, "y" * 10_000, 1, error="z" * 10_000)], [], [],
                                fleetpage.Filters(), NOW)
    row = boxes_of(parse(page))["x" * fleetpage.MAX_TEXT + "…"]
    assert row[3] == "y" * fleetpage.MAX_TEXT + "…" and row[5] == "z" * fleetpage.MAX_TEXT + "…"
    assert f'href="box/{long_id}"'.encode() in page  # the link still names the whole id


# --- pages of the boxes table --------------------------------------------------------------


def many(count: int) -> list[ReportRecord]:
    """``count`` boxes ``box-0000``…, every third apply-failed, every seventh stale."""
    return [rec(f"box-{n:04d}", "apply-failed" if n % 3 == 0 else "updated", 1 + n % 2,
                received=NOW - (3 * DAY if n % 7 == 0 else DAY)) for n in range(count)]


def page_of(records: list[ReportRecord], query: str) -> tuple[str, Cells]:
    args = fleetpage.parse_query(query)
    page = fleetpage.fleet_page(records, [], [], fleetpage.Filters.from_query(args), NOW,
                                page=fleetpage.requested_page(args))
    return page.decode("utf-8"), parse(page)


def test_the_boxes_table_is_cut_into_pages_at_the_boundaries() -> None:
    size = fleetpage.PAGE_SIZE
    records = many(2 * size + 1)
    text, cells = page_of(records, "")
    assert sorted(boxes_of(cells)) == [f"box-{n:04d}" for n in range(size)]
    assert f"boxes 1&ndash;{size} of {2 * size + 1}<" in text and "page 1 of 3: " in text
    assert '<a rel="next" href="?page=2">next</a> <a rel="last" href="?page=3">last</a>' \
        in text and 'rel="prev"' not in text and 'rel="first"' not in text
    assert text.count('class="pages"') == 2  # above and below the table
    text, cells = page_of(records, "page=2")
    assert sorted(boxes_of(cells)) == [f"box-{n:04d}" for n in range(size, 2 * size)]
    assert f"boxes {size + 1}&ndash;{2 * size} of {2 * size + 1}<" in text
    assert '<a rel="first" href="?page=1">first</a> <a rel="prev" href="?page=1">previous' \
           '</a> <a rel="next" href="?page=3">next</a>' in text
    text, cells = page_of(records, "page=3")
    assert list(boxes_of(cells)) == [f"box-{2 * size:04d}"]
    assert f"boxes {2 * size + 1}&ndash;{2 * size + 1} of" in text and 'rel="next"' not in text
    # Exactly two pages' worth: no empty third page.
    text, cells = page_of(records[:2 * size], "page=3")
    assert len(boxes_of(cells)) == size and "page 2 of 2: " in text
    # One page: no pager at all.
    text, cells = page_of(records[:size], "")
    assert len(boxes_of(cells)) == size and 'class="pages"' not in text


def test_a_bad_or_huge_page_number_gives_the_first_or_the_last_page() -> None:
    records = many(fleetpage.PAGE_SIZE + 5)
    for query in ("", "page=", "page=0", "page=-1", "page=1.5", "page=x", "page=%D9%A2",
                  "page=%00", "page=1&page=2", "page=" + "%FF" * 10):
        assert "page 1 of 2: " in page_of(records, query)[0], query
    for query in ("page=2", "page=3", "page=999999999999999999", "page=" + "9" * 5000,
                  "page=2&page=1"):
        text, cells = page_of(records, query)
        assert "page 2 of 2: " in text and len(boxes_of(cells)) == 5, query[:40]
    # No box at all: page 1 of nothing, whatever was asked.
    text, cells = page_of([], "page=7")
    assert boxes_of(cells) == {} and "no box has reported yet" in text


def test_page_links_keep_every_filter_escaped() -> None:
    hostile = ('"><script>alert(1)</script>&page=9&release=1#x', "chan nel/é?&=%")
    records = [rec(f"box-{n:04d}", hostile[0], 2, channel=hostile[1])
               for n in range(2 * fleetpage.PAGE_SIZE + 1)] + many(50)
    query = "release=2&" + urlencode({"result": hostile[0], "channel": hostile[1],
                                      "page": "2"})
    text, cells = page_of(records, query)
    assert "<script" not in text and "script" not in cells.tags
    assert sorted(boxes_of(cells)) == [f"box-{n:04d}" for n in range(
        fleetpage.PAGE_SIZE, 2 * fleetpage.PAGE_SIZE)]
    expected = {"release": ["2"], "result": [hostile[0]], "channel": [hostile[1]]}
    links = [href for href in cells.hrefs if href.startswith("?")]
    assert len(links) == 8  # first, previous, next, last; twice
    for href in links:
        assert "#" not in href and "/" not in href and " " not in href  # relative, encoded
        args = parse_qs(href[1:], keep_blank_values=True)
        assert {k: v for k, v in args.items() if k != "page"} == expected, href
    assert sorted({parse_qs(h[1:])["page"][0] for h in links}) == ["1", "3"]
    # Followed, a link selects the same boxes and keeps its place.
    text, cells = page_of(records, cells.hrefs[cells.hrefs.index(links[2])][1:])
    assert list(boxes_of(cells)) == [f"box-{2 * fleetpage.PAGE_SIZE:04d}"]
    assert "page 3 of 3: " in text


def test_counts_and_choices_are_over_the_whole_fleet_and_order_is_by_code_point() -> None:
    records = [*many(3 * fleetpage.PAGE_SIZE)[::-1], rec("Zulu", "weird-result", 9),
               rec("_x", "updated", 1)]
    total, stale = len(records), sum(1 for n in range(3 * fleetpage.PAGE_SIZE) if n % 7 == 0)
    first_text, first = page_of(records, "")
    last_text, last = page_of(records, "page=4")
    for text in (first_text, last_text):
        assert f"<p>{total} boxes, {stale} stale (no report" in text
        # The form offers what the whole fleet has, not what this page shows.
        assert '<option value="weird-result">' in text and '<option value="9">' in text
    assert list(boxes_of(first))[:2] == ["Zulu", "_x"]  # "Z" < "_" < "b", as str sorts
    assert list(boxes_of(last))[-1] == f"box-{3 * fleetpage.PAGE_SIZE - 1:04d}"
    # 200 of the 602 failed: one page of them, so page 2 is that page.
    text, cells = page_of(records, "result=apply-failed&page=2")
    assert f"boxes 1&ndash;200 of 200 matching the filters ({total} in the fleet)" in text
    assert len(boxes_of(cells)) == 200 and 'class="pages"' not in text


def test_the_filter_form_stays_bounded_and_keeps_the_chosen_filter() -> None:
    """A fleet of invented box ids (anyone can make a key), each claiming its own release,
    result and channel, must not put thousands of choices on every page: the form offers
    the 100 highest releases and the first 100 results and channels, plus the one chosen."""
    records = [rec(f"box-{n:05d}", f"result-{n:05d}", 10**12 + n, channel=f"ch-{n:05d}")
               for n in range(10_000)]
    text, cells = page_of(records, "")
    assert text.count("<option") == 3 * (fleetpage.FORM_CHOICES + 1)  # each with "any"
    assert f'<option value="{10**12 + 9999}">' in text
    assert f'<option value="{10**12 + 9899}">' not in text
    assert len(text.encode()) < 80_000  # 200 rows and the form, not 10 000 of anything
    text, cells = page_of(records, f"release={10**12 + 5}&result=result-01500&channel=ch-01500")
    for chosen in (10**12 + 5, "result-01500", "ch-01500"):
        assert f'<option value="{chosen}" selected>' in text, chosen
    assert list(boxes_of(cells)) == [] and 'class="pages"' not in text
    text, cells = page_of(records, "result=result-01500")
    assert list(boxes_of(cells)) == ["box-01500"]


# --- the routes over a real store and repository --------------------------------------------


def request(app: Collector, path: str = "/", query: str = "",
            method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    """One WSGI request to the collector: (status line, headers, body)."""
    seen: list[Any] = []
    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                         "REMOTE_ADDR": "127.0.0.1"},
                        lambda status, headers: seen.extend([status, dict(headers)])))
    return seen[0], seen[1], body


def seeded_collector(tmp_path: Path) -> Collector:
    """A collector on a SQLite store holding :func:`fleet`."""
    url = "sqlite:///" + str(tmp_path / "reports.db")
    store = open_store(url)
    for record in fleet():
        store.add(record)
    store.close()
    return Collector(url, clock=lambda: NOW)


def test_routes_read_the_store_and_the_repository(tmp_path: Path) -> None:
    repo_dir, keydir = tmp_path / "repo", tmp_path / "keys"
    repo.init_repo(repo_dir, keydir, now=NOW - 10 * DAY)
    script = tmp_path / "update.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    for version, pct in ((1, 100), (2, 10)):
        build.build_package(tmp_path / f"p{version}.zip", version=version, run=script)
        repo.publish_release(repo_dir, keydir, tmp_path / f"p{version}.zip", rollout=pct,
                             now=NOW - (3 - version) * DAY)
    store = open_store(default_store_url(repo_dir))
    try:
        for record in [*fleet(), rec("ünï/cödé", "updated", 1)]:
            store.add(record)
        status, page, headers = fleetweb.fleet(store, {"result": ["updated"]}, repo_dir, NOW)
        assert status == 200 and ("Content-Security-Policy", fleetpage.HEADERS[1][1]) in headers
        cells = parse(page)
        assert sorted(boxes_of(cells)) == ["alpha", "echo", "ünï/cödé"]
        assert [r[:3] for r in cells.tables["rollouts"][1:]] == [
            ["version.json", "v2", "10%"], ["version.json", "v1", "100%"]]
        # Without the repository, or with a wrong path, the boxes are still listed.
        broken = tmp_path / "broken"  # a version file but no root chain
        broken.mkdir()
        (broken / "version.json").write_bytes((repo_dir / "version.json").read_bytes())
        for where in (None, tmp_path / "no-repo", broken):
            status, page, _ = fleetweb.fleet(store, {}, where, NOW)
            assert status == 200 and len(boxes_of(parse(page))) == 6
            assert len(parse(page).tables["rollouts"]) == 1  # the header only
        # PATH_INFO as a WSGI server gives it: UTF-8 bytes read as latin-1.
        path = "/box/" + "ünï/cödé".encode().decode("latin-1")
        status, page, _ = fleetweb.box(store, path, NOW)
        assert status == 200 and parse(page).title == "Box ünï/cödé"
        assert fleetweb.box(store, "/box/nobody", NOW)[0] == 404
        assert fleetweb.box(store, "/box/\u20ac", NOW)[0] == 404  # not latin-1: no such box
    finally:
        store.close()


def test_the_collector_serves_the_pages(tmp_path: Path) -> None:
    app = seeded_collector(tmp_path)

    def get(path: str, method: str = "GET") -> tuple[str, dict[str, str], bytes]:
        return request(app, path, "release=2", method)

    status, headers, body = get("/")
    assert status == "200 OK" and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
    assert sorted(boxes_of(parse(body))) == ["alpha", "echo"]
    status, _, body = get("/box/" + SCRIPT)
    assert status == "200 OK" and parse(body).title == "Box " + SCRIPT
    assert get("/box/")[0].startswith("404") and get("/boxes")[0].startswith("404")
    assert get("/", "POST")[0].startswith("405") and get("/", "HEAD")[2] == b""


def test_the_collector_pages_with_rollout_numbers_of_the_whole_fleet(tmp_path: Path) -> None:
    """Through the WSGI application below a prefix, as nginx serves it: every page carries
    the rollout numbers of all the boxes, and its "next" link, resolved as a browser does,
    leads to the next page with the same filters."""
    repo_dir, keydir = tmp_path / "repo", tmp_path / "keys"
    repo.init_repo(repo_dir, keydir, now=NOW - 10 * DAY)
    (tmp_path / "update.sh").write_text("#!/bin/sh\ntrue\n")
    build.build_package(tmp_path / "p2.zip", version=2, run=tmp_path / "update.sh")
    repo.publish_release(repo_dir, keydir, tmp_path / "p2.zip", rollout=50, now=NOW - 2 * DAY)
    url = "sqlite:///" + str(tmp_path / "reports.db")
    store = open_store(url)
    assert isinstance(store, SqlStore)
    records = many(2 * fleetpage.PAGE_SIZE + 50)
    with store._write() as cur:  # one transaction: 450 fsyncs would be most of the test
        for record in records:
            store._insert(cur, record)
    store.close()
    app = Collector(url, clock=lambda: NOW, repo=repo_dir)

    def get(target: str) -> tuple[str, Cells]:
        status, _, body = request(app, "/", urlsplit(target).query)
        assert status == "200 OK"
        return body.decode(), parse(body)

    whole = rollout.health(rollout.ReleaseRef("version.json", 2, 50, NOW - 2 * DAY),
                           rollout.latest_views(records), NOW)
    expected = [["version.json", "v2", "50%", "", *(str(n) for n in (
        whole.boxes, whole.in_bucket, whole.updated, whole.failed, whole.waiting,
        whole.not_seen, whole.stale)), f"{whole.failure_rate:.1f}%"]]
    assert whole.boxes == len(records) and whole.failed > 0
    target, pages = "https://emilia.example.org/fleet/?result=updated", []
    while True:
        text, cells = get(target)
        assert cells.tables["rollouts"][1:] == expected, target
        pages.append(list(boxes_of(cells)))
        nexts = re.findall(r'<a rel="next" href="([^"]*)">', text)
        if not nexts:
            break
        target = urljoin(target, html.unescape(nexts[0]))
        assert target.startswith("https://emilia.example.org/fleet/?result=updated&page=")
    updated = [r.box_id for r in records if r.report["last_result"] == "updated"]
    assert [len(p) for p in pages] == [200, 100] and [b for p in pages for b in p] == updated


def test_hostile_query_strings_get_a_page_never_an_error(tmp_path: Path) -> None:
    """Repeated keys past the parser's field cap, huge and non-UTF-8 values, unicode:
    the page is served (filters that make no sense are ignored), never a 500."""
    app = seeded_collector(tmp_path)

    def get(query: str) -> tuple[str, bytes]:
        status, _, body = request(app, "/", query)
        return status, body

    for query in ("&".join(["result=x"] * 51), "&" * 5000, ";".join(["a=1"] * 60),
                  "result=" + "é" * 5000, "release=" + "9" * 5000, "release=%FF%FE",
                  "result=%00%1b%5B2J", "channel=..%2F..%2Fetc&release=2&release=3",
                  "page=" + "9" * 5000, "page=%FF%FE", "page=-1&page=2", "page=1e9",
                  "page=" + "\uff11" * 3):
        status, body = get(query)
        assert status == "200 OK", (query[:40], status)
        assert b"\x1b" not in body
    assert sorted(boxes_of(parse(get("release=2&release=3")[1]))) == ["alpha", "echo"]


# --- the filter form sends back exactly what it offers ---------------------------------------


class Options(HTMLParser):
    """Each select's options: (value, shown text, selected)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.selects: dict[str, list[tuple[str, str, bool]]] = {}
        self._select = ""
        self._option: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "select":
            self._select = values.get("name") or ""
            self.selects[self._select] = []
        elif tag == "option":
            self.selects[self._select].append((values.get("value") or "", "",
                                               "selected" in values))
            self._option = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "option" and self._option is not None:
            value, _, selected = self.selects[self._select][-1]
            self.selects[self._select][-1] = (value, "".join(self._option), selected)
            self._option = None

    def handle_data(self, data: str) -> None:
        if self._option is not None:
            self._option.append(data)


def options_of(text: str) -> dict[str, list[tuple[str, str, bool]]]:
    parser = Options()
    parser.feed(text)
    return {name: options[1:] for name, options in parser.selects.items()}  # less "any"


LONG = "r" * (fleetpage.MAX_TEXT + 50)
NFC, NFD = "caf\u00e9.json", "cafe\u0301.json"


def test_every_choice_the_form_offers_selects_the_boxes_that_sent_it() -> None:
    """Submitting the form sends each option's value: it must be the exact text a box sent.
    Before, the value was the shown text: a result longer than 200 characters was cut (the
    filter then matched no box), and ``ok\\x1b`` became the literal text ``ok\\x1b``,
    which filtered by what another box sent; a release of 19 digits (a box may claim up
    to 2**63 - 1) was offered but ignored as a filter, showing every box."""
    records = [rec("long", LONG, 1), rec("esc", "ok\x1b[2J", 1),
               rec("literal", "ok\\x1b[2J", 1), rec("quote", '"&<x>', 1),
               rec("nfc", "updated", 1, channel=NFC), rec("nfd", "updated", 1, channel=NFD),
               rec("zwsp", "updated", 1, channel="version.json\u200b"),
               rec("huge", "updated", 2**63 - 1), rec("big", "updated", 10**18)]
    text, _ = page_of(records, "")
    options = options_of(text)
    field = {"release": "installed_version", "result": "last_result", "channel": "channel"}
    for name in ("release", "result", "channel"):
        for value, _, _ in options[name]:
            _, cells = page_of(records, urlencode({name: value}))
            matching = [r.box_id for r in records if str(r.report[field[name]]) == value]
            assert matching and sorted(boxes_of(cells)) == sorted(matching), (name, value)
    assert [v for v, _, _ in options["result"]] == ['"&<x>', "ok\\x1b[2J", "updated"]
    assert LONG not in text and "ok\x1b" not in text  # left out, not cut or escaped


def test_a_filter_the_form_cannot_offer_still_works_by_address_and_stays_chosen() -> None:
    records = [rec("long", LONG, 1), rec("other", "updated", 1)]
    text, cells = page_of(records, urlencode({"result": LONG}))
    assert list(boxes_of(cells)) == ["long"]
    [(value, shown_text, selected)] = options_of(text)["result"][:1]
    assert (value, selected) == (LONG, True)  # submitted again, the same filter
    assert shown_text == "r" * fleetpage.MAX_TEXT + "…"


def test_choices_that_differ_only_in_normalisation_do_not_look_alike() -> None:
    records = [rec("nfc", "updated", 1, channel=NFC), rec("nfd", "updated", 1, channel=NFD)]
    text, _ = page_of(records, "")
    shown_texts = {value: label for value, label, _ in options_of(text)["channel"]}
    assert set(shown_texts) == {NFC, NFD}
    assert shown_texts[NFC] == NFC and shown_texts[NFD] == "cafe\\u0301.json"


def test_a_chosen_filter_with_control_characters_stays_chosen_without_raw_controls() -> None:
    records = [rec("esc", "ok\x1b[2J\u202e", 1), rec("other", "updated", 1)]
    text, cells = page_of(records, urlencode({"result": "ok\x1b[2J\u202e"}))
    assert list(boxes_of(cells)) == ["esc"]
    assert "\x1b" not in text and "\u202e" not in text
    # Character references: HTML keeps these characters (html.parser drops ESC's).
    assert '<option value="ok&#x1b;[2J&#x202e;" selected>ok\\x1b[2J\\u202e</option>' in text
    assert options_of(text)["result"][0][2]
