"""The fleet page (issue 10, item 4): server-rendered HTML, no JavaScript. No I/O.

``/`` lists every known box (id, channel, installed release, last result, last seen, a stale
marker), filtered by the query string (``release``, ``result``, ``channel``), under the
rollout numbers of each channel's releases (:mod:`.rollout`) and above the conflicts (reports
signed by another key than the one a box id is known by). ``/box/<id>`` shows one box's
history. The collector's WSGI application serves both (:func:`route`).

Everything a box sent is hostile: it goes through :func:`shown` (control and bidi characters
made visible as escapes, like the terminal commands' ``printable``, then ``html.escape``), and
into URLs only percent-encoded. The responses also carry a Content-Security-Policy that
allows no script at all, so an escaping mistake could still not run one.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote

from ..metadata import format_time
from .common import printable
from .rollout import BoxView, Health, Record, box_view, is_failed

#: Headers of every page: no script may run, nothing may frame it, no referrer leaks.
HEADERS = (("Content-Type", "text/html; charset=utf-8"),
           ("Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"),
           ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
           ("Cache-Control", "no-store"))
MAX_TEXT = 200  # characters of a box-sent string shown in a table cell
#: The newest conflicts the page shows (the count says how many there are).
CONFLICTS_SHOWN = 200
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
        return cls(release=int(release) if release.isascii() and release.isdigit()
                   and len(release) < 19 else None,
                   result=(args.get("result") or [""])[0] or None,
                   channel=(args.get("channel") or [""])[0] or None)

    def keep(self, box: BoxView) -> bool:
        return ((self.release is None or box.installed == self.release)
                and (self.result is None or box.result == self.result)
                and (self.channel is None or box.channel == self.channel))


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


def _filter_form(filters: Filters, boxes: Sequence[BoxView]) -> str:
    def select(name: str, values: Sequence[str], chosen: str | None) -> str:
        options = ['<option value="">any</option>'] + [
            f'<option value="{shown(v)}"{" selected" if v == chosen else ""}>{shown(v)}'
            "</option>" for v in values]
        return (f'<label>{name} <select name="{name}">' + "".join(options)
                + "</select></label> ")
    releases = sorted({b.installed for b in boxes if b.installed is not None})
    results = sorted({b.result for b in boxes if b.result is not None})[:100]
    channels = sorted({b.channel for b in boxes})[:100]
    return ('<form method="get" action="." class="filters">'
            + select("release", [str(r) for r in releases],
                     None if filters.release is None else str(filters.release))
            + select("result", results, filters.result)
            + select("channel", channels, filters.channel)
            + '<button type="submit">filter</button> <a href=".">all boxes</a></form>')


def fleet_page(records: Sequence[Record], health_rows: Sequence[Health],
               conflicts: Sequence[Any], filters: Filters, now: datetime,
               conflict_count: int | None = None) -> bytes:
    """``/``: the rollouts, the filtered boxes and the conflicts. ``records`` are the newest
    report of each box (the store's ``latest()``), ``conflicts`` the newest of the store's
    ``conflicts()`` (:data:`CONFLICTS_SHOWN` are shown) and ``conflict_count`` how many
    there are (default: ``len(conflicts)``)."""
    if conflict_count is None:
        conflict_count = len(conflicts)
    boxes = [box_view(r) for r in records]
    kept = [b for b in boxes if filters.keep(b)]
    current = {h.release.channel: h.release for h in reversed(health_rows)}
    stale = sum(1 for b in boxes if b.stale(now))
    body = [f"<h1>OPQ Box fleet</h1>\n<p>{len(boxes)} boxes, {stale} stale (no report for "
            f"more than two days), {conflict_count} conflicting reports; "
            f"{html.escape(format_time(now))}</p>",
            rollout_section(health_rows), "<h2>Boxes</h2>", _filter_form(filters, boxes),
            f'<p class="count">{len(kept)} of {len(boxes)} boxes shown</p>']
    rows = []
    for b in kept:
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
