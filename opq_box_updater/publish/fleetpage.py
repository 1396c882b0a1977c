"""The fleet page (issue 10, item 4): server-rendered HTML, no JavaScript. No I/O.

``/`` lists the known boxes (id, channel, installed release, last result, last seen, a stale
marker), filtered by the query string (``release``, ``result``, ``channel``) and
:data:`PAGE_SIZE` rows a page (``page``, 1-based, with links to the other pages that keep
the filters), under the rollout numbers of each channel's releases (:mod:`.rollout`, over
the whole fleet, not the page) and above the conflicts (reports signed by another key than
the one a box id is known by). ``/box/<id>`` shows one box's
history. The collector's WSGI application serves both (:func:`route`).

Everything a box sent is hostile: it goes through :func:`shown` (control and bidi characters
made visible as escapes, like the terminal commands' ``printable``, then ``html.escape``), and
into URLs only percent-encoded. The responses also carry a Content-Security-Policy that
allows no script at all, so an escaping mistake could still not run one.
"""

from __future__ import annotations

import html
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from ..metadata import format_time
from ..text import printable
from .rollout import BoxView, Health, Record, box_view, is_failed

#: Headers of every page: no script may run, nothing may frame it, no referrer leaks.
HEADERS = (("Content-Type", "text/html; charset=utf-8"),
           ("Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"),
           ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
           ("Cache-Control", "no-store"))
MAX_TEXT = 200  # characters of a box-sent string shown in a table cell
#: The highest release a box's report may claim (``rollout.box_view``): a filter up to it.
MAX_RELEASE = 2**63 - 1
#: The newest conflicts the page shows (the count says how many there are).
CONFLICTS_SHOWN = 200
#: Rows of the boxes table on one page: a fleet of 10 000 boxes in one table was 4.6 MB of
#: HTML a browser took seconds to lay out (docs/performance.md, "Fleet page").
PAGE_SIZE = 200
#: Choices of each filter in the form (the highest releases, the first results and
#: channels, and the one chosen): invented box ids each sending its own cannot make every
#: page as big as the fleet.
FORM_CHOICES = 100
_STYLE = """body{font-family:sans-serif;margin:1em 2em}table{border-collapse:collapse;
margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;
vertical-align:top}td.n{text-align:right}.stale{color:#a00;font-weight:bold}
.bar{background:#eee;width:10em;height:.8em;display:inline-block}
.bar span{background:#4a4;height:100%;display:block}"""


def shown(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as safe HTML text: non-printable characters escaped, then HTML-escaped."""
    text = printable("" if value is None else str(value))
    if len(text) > limit:
        text = text[:limit] + "…"
    return html.escape(text, quote=True)


def box_href(box_id: str) -> str:
    """The link from ``/`` to a box's page. Links are relative, so the pages work below any
    prefix (nginx serves them at ``/fleet/``)."""
    return "box/" + quote(box_id, safe="")


def parse_query(query: str) -> dict[str, list[str]]:
    """A page's query string, bounded (4 KiB, 50 fields); one past the bounds (``parse_qs``
    raises for too many fields: repeated keys) selects nothing rather than failing."""
    try:
        return parse_qs(query[:4096], max_num_fields=50)
    except ValueError:
        return {}


@dataclass(frozen=True)
class Filters:
    """The list's filters from the query string; a value of the wrong form is ignored."""

    release: int | None = None
    result: str | None = None
    channel: str | None = None

    @classmethod
    def parse(cls, query: str) -> Filters:
        return cls.from_query(parse_query(query))

    @classmethod
    def from_query(cls, args: Mapping[str, Sequence[str]]) -> Filters:
        """From a parsed query string (``parse_qs``); the first value of each name counts."""
        release = (args.get("release") or [""])[0]
        number = int(release) if release.isascii() and release.isdigit() \
            and len(release) <= len(str(MAX_RELEASE)) else None  # a bounded int() only
        return cls(release=number if number is not None and number <= MAX_RELEASE else None,
                   result=(args.get("result") or [""])[0] or None,
                   channel=(args.get("channel") or [""])[0] or None)

    def keep(self, box: BoxView) -> bool:
        return ((self.release is None or box.installed == self.release)
                and (self.result is None or box.result == self.result)
                and (self.channel is None or box.channel == self.channel))

    def active(self) -> bool:
        return (self.release, self.result, self.channel) != (None, None, None)

    def href(self, page: int) -> str:
        """A relative link (works below any prefix) to ``page`` of the list with these
        filters, every value percent-encoded; to be HTML-escaped into an attribute."""
        pairs = [(name, str(value)) for name, value in (
            ("release", self.release), ("result", self.result), ("channel", self.channel))
            if value is not None]
        return "?" + urlencode([*pairs, ("page", str(page))], quote_via=quote, safe="")


def requested_page(args: Mapping[str, Sequence[str]]) -> int:
    """The 1-based page a parsed query string asks for: 1 when it names none or something
    that is not a number; a number too long to be a page is past the last one (and so
    shows the last page, as any page past it does)."""
    value = (args.get("page") or [""])[0]
    if not (value.isascii() and value.isdigit()):
        return 1
    return int(value) if len(value) < 19 else sys.maxsize


def _page(title: str, body: list[str]) -> bytes:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n").encode("utf-8")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    """A table; ``rows`` hold HTML already made safe by the caller."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>\n" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>'


def _td(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _progress(h: Health) -> str:
    base = h.in_bucket or h.boxes
    done = min(100, round(100 * h.updated / base)) if base else 0
    return (f'<span class="bar" title="{done}% updated"><span style="width:{done}%">'
            "</span></span>")


def rollout_section(rows: Sequence[Health]) -> str:
    """Per-release rollout progress with the numbers of ``rollout status``."""
    header = ("channel", "release", "rollout", "progress", "boxes", "in bucket", "updated",
              "failed", "waiting", "not seen", "stale", "failure rate")
    body = [[_td(shown(h.release.channel)), _td(f"v{h.release.version}"),
             _td(f"{h.release.rollout}%", "n"), _td(_progress(h)),
             *(_td(str(n), "n") for n in (h.boxes, h.in_bucket, h.updated, h.failed,
                                           h.waiting, h.not_seen, h.stale)),
             _td(f"{h.failure_rate:.1f}%" if h.tried else "-", "n")] for h in rows]
    return "<h2>Rollouts</h2>\n" + _table(header, body, "rollouts")


def _option_text(value: str) -> str:
    """What an option shows: :func:`shown`, with every non-ASCII character escaped when
    ``value`` is not in Unicode's NFC, so that two choices that differ only in
    normalisation (``é`` as one character or as ``e`` and a combining accent) never look
    alike."""
    if not unicodedata.is_normalized("NFC", value):
        value = value.encode("ascii", "backslashreplace").decode("ascii")
    return shown(value)


def _offered(value: str) -> bool:
    """Whether the form offers ``value`` as a choice: only what it can send back exactly.
    A value :func:`shown` cuts or escapes (longer than :data:`MAX_TEXT`, or with a control
    or format character, which an HTML attribute does not carry intact) is left out: its
    cut or escaped text would filter by something no box sent, or by what another box
    sent literally. Such a value is still a filter through the address, exactly."""
    return len(value) <= MAX_TEXT and printable(value) == value


def _attribute(value: str) -> str:
    """``value`` for an HTML attribute, whole: escaped, and every character
    :func:`printable` would escape written as a character reference, so that none reaches
    the page raw (the form still sends it; not NUL, C1 controls or line breaks, which
    HTML changes)."""
    return "".join(ch if ch.isprintable() else f"&#x{ord(ch):x};"
                   for ch in html.escape(value, quote=True))


def _filter_form(filters: Filters, boxes: Sequence[BoxView]) -> str:
    def select(name: str, values: Sequence[str], chosen: str | None) -> str:
        # The value is the exact text (escaped for the attribute), the label shown.
        options = ['<option value="">any</option>'] + [
            f'<option value="{_attribute(v)}"{" selected" if v == chosen else ""}>'
            f"{_option_text(v)}</option>" for v in values]
        return (f'<label>{name} <select name="{name}">' + "".join(options)
                + "</select></label> ")
    def choices(values: set[str], chosen: str | None, newest: bool = False) -> list[str]:
        offered = [v for v in values if _offered(v)]
        ordered = sorted(offered, key=int) if newest else sorted(offered)
        kept = ordered[-FORM_CHOICES:] if newest else ordered[:FORM_CHOICES]
        return kept if chosen is None or chosen in kept else [chosen, *kept]
    release = None if filters.release is None else str(filters.release)
    return ('<form method="get" action="." class="filters">'
            + select("release", choices({str(b.installed) for b in boxes
                                         if b.installed is not None}, release, newest=True),
                     release)
            + select("result", choices({b.result for b in boxes if b.result is not None},
                                       filters.result), filters.result)
            + select("channel", choices({b.channel for b in boxes}, filters.channel),
                     filters.channel)
            + '<button type="submit">filter</button> <a href=".">all boxes</a></form>')


def _count(first: int, last: int, kept: int, total: int, filtered: bool) -> str:
    fleet = f"{total} in the fleet"
    if not kept:
        return ("no box matches the filters (" + fleet + ")" if filtered
                else "no box has reported yet")
    return f"boxes {first}&ndash;{last} of {kept}" + (f" matching the filters ({fleet})"
                                                if filtered else "")


def _pager(filters: Filters, page: int, pages: int) -> str:
    """Links to the first, previous, next and last page, keeping the filters; none on a
    single page."""
    if pages <= 1:
        return ""
    links = [(rel, text, target) for rel, text, target, present in (
        ("first", "first", 1, page > 1), ("prev", "previous", page - 1, page > 1),
        ("next", "next", page + 1, page < pages), ("last", "last", pages, page < pages))
        if present]
    return (f'<p class="pages">page {page} of {pages}: ' + " ".join(
        f'<a rel="{rel}" href="{html.escape(filters.href(target))}">{text}</a>'
        for rel, text, target in links) + "</p>")


def fleet_page(records: Sequence[Record], health_rows: Sequence[Health],
               conflicts: Sequence[Any], filters: Filters, now: datetime,
               conflict_count: int | None = None, page: int = 1,
               page_size: int = PAGE_SIZE) -> bytes:
    """``/``: the rollouts, one page of the filtered boxes and the conflicts. ``records``
    are the newest report of each box (the store's ``latest()``), ``conflicts`` the newest
    of the store's ``conflicts()`` (:data:`CONFLICTS_SHOWN` are shown) and
    ``conflict_count`` how many there are (default: ``len(conflicts)``). ``page`` is the
    1-based page asked for, brought into range (below 1: the first, past the end: the
    last); the boxes are in box id order (Python's, not the database's collation, so that
    a page holds the same boxes on SQLite and PostgreSQL)."""
    if conflict_count is None:
        conflict_count = len(conflicts)
    boxes = sorted((box_view(r) for r in records), key=lambda b: b.box_id)
    kept = [b for b in boxes if filters.keep(b)]
    pages = max(1, -(-len(kept) // page_size))
    page = min(max(page, 1), pages)
    start = (page - 1) * page_size
    on_page = kept[start:start + page_size]
    current = {h.release.channel: h.release for h in reversed(health_rows)}
    stale = sum(1 for b in boxes if b.stale(now))
    pager = _pager(filters, page, pages)
    body = [f"<h1>OPQ Box fleet</h1>\n<p>{len(boxes)} boxes, {stale} stale (no report for "
            f"more than two days), {conflict_count} conflicting reports; "
            f"{html.escape(format_time(now))}</p>",
            rollout_section(health_rows), "<h2>Boxes</h2>", _filter_form(filters, boxes),
            '<p class="count">' + _count(start + 1, start + len(on_page), len(kept),
                                         len(boxes), filters.active()) + "</p>", pager]
    rows = []
    for b in on_page:
        release = current.get(b.channel)
        failed = release is not None and is_failed(b, release)
        rows.append([
            _td(f'<a href="{html.escape(box_href(b.box_id))}">{shown(b.box_id)}</a>'),
            _td(shown(b.channel)), _td(shown(b.installed if b.installed is not None else "?")),
            _td(shown(b.result or "?") + (" (failed current release)" if failed else "")),
            _td(html.escape(format_time(b.last_seen))
                + (' <span class="stale">stale</span>' if b.stale(now) else "")),
            _td(shown(b.error or ""))])
    body.append(_table(("box", "channel", "installed", "last result", "last seen", "error"),
                       rows, "boxes"))
    body.append(pager)
    body.append("<h2>Conflicts</h2>\n<p>Reports signed by another key than the one the box "
                "id is known by: stored, never merged (opq-box-publish boxes).</p>")
    body.append(_table(("box", "received", "from", "key", "result"), [[
        _td(f'<a href="{html.escape(box_href(c.box_id))}">{shown(c.box_id)}</a>'),
        _td(html.escape(format_time(c.received))), _td(shown(c.remote)),
        _td(shown(c.key_id or "-")),
        _td(shown(c.report.get("last_result") if isinstance(c.report, Mapping) else "?"))]
        for c in conflicts[:CONFLICTS_SHOWN]], "conflicts"))
    return _page("OPQ Box fleet", body)


def box_page(box_id: str, history: Sequence[Any], now: datetime) -> bytes:
    """``/box/<id>``: the box's reports, newest first (the store's ``history()``)."""
    body = [f"<h1>Box {shown(box_id, 1000)}</h1>", '<p><a href="../">back to the fleet</a></p>']
    if not history:
        body.append("<p>No report from this box.</p>")
    rows = []
    for rec in history:
        view = box_view(rec)
        report = rec.report if isinstance(rec.report, Mapping) else {}
        rows.append([_td(html.escape(format_time(rec.received))), _td(shown(rec.status)),
                     _td(shown(rec.remote)), _td(shown(view.channel)),
                     _td(shown(view.installed if view.installed is not None else "?")),
                     _td(shown(report.get("release_version"))), _td(shown(view.result or "?")),
                     _td(shown(", ".join(str(v) for v in sorted(view.failed_versions)))),
                     _td(shown(view.error or "")), _td(shown(rec.key_id or "-"))])
    body.append(_table(("received", "status", "from", "channel", "installed", "release",
                        "result", "failed versions", "error", "key"), rows, "history"))
    return _page(f"Box {printable(box_id)[:100]}", body)


def not_found() -> bytes:
    return _page("Not found", ["<h1>Not found</h1>", '<p><a href="../">the fleet</a></p>'])
