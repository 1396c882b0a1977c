"""The operator's views of the report store in a terminal: ``fleet`` and ``boxes list``.

Everything shown comes from boxes, or from anyone who can reach the collector: every cell
goes through :func:`~opq_box_updater.text.printable`, so no report can drive the operator's
terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..metadata import format_time
from ..text import printable
from .store import BoxRecord, ReportRecord, Store


@dataclass(frozen=True)
class FleetRow:
    """One box as its latest report describes it."""

    box_id: str
    installed: str
    result: str
    last_seen: str  # when the server received the report (the box clock may be wrong)
    message: str  # the error, or the box's last message


def fleet_rows(store: Store) -> list[FleetRow]:
    """The newest accepted (or unsigned) report of every box, sorted by box id."""
    rows = []
    for record in store.latest():
        report = record.report
        rows.append(FleetRow(
            box_id=record.box_id,
            installed=_installed(report),
            result=str(report.get("result") or report.get("last_result") or "-"),
            last_seen=format_time(record.received),
            message=str(report.get("error") or report.get("last_message") or "")))
    return rows


def _installed(report: dict[str, Any]) -> str:
    versions = report.get("versions")
    if isinstance(versions, dict):
        versions = versions.get("installed", versions.get("installed_version"))
    if versions is None:
        versions = report.get("installed_version")
    return "-" if versions is None else str(versions)


def format_fleet(rows: list[FleetRow]) -> str:
    """A plain-text table: BOX, INSTALLED, RESULT, LAST SEEN, MESSAGE, every cell
    :func:`printable`."""
    header = ("BOX", "INSTALLED", "RESULT", "LAST SEEN", "MESSAGE")
    table = [header] + [tuple(printable(cell) for cell in (
        r.box_id, r.installed, r.result, r.last_seen, " ".join(r.message.split())[:60]))
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
             + "  " + row[-1] for row in table]
    return "\n".join(line.rstrip() for line in lines) + "\n"


#: Conflicts ``boxes list`` shows, newest first (anyone can sign them: up to 100 per box).
CONFLICTS_LISTED = 1000


def format_boxes(boxes: list[BoxRecord], conflicts: list[ReportRecord],
                 conflict_count: int | None = None) -> str:
    """``boxes list``: BOX, STATE, KEY (the first 16 digits of its id), COUNTER, LAST SEEN;
    then the conflicts given (reports signed by another key than the box's), newest first,
    with the full key id to give to ``boxes accept BOX --key KEYID``; ``conflict_count``
    is how many there are (default: ``len(conflicts)``)."""
    total = len(conflicts) if conflict_count is None else conflict_count
    header = ("BOX", "STATE", "KEY", "COUNTER", "LAST SEEN")
    table = [header] + [tuple(printable(cell) for cell in (
        b.box_id, b.state, (b.key_id or "-")[:16], str(b.counter), format_time(b.last_seen)))
        for b in boxes]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in table]
    if total:
        shown = "" if total == len(conflicts) else f", the newest {len(conflicts)} shown"
        lines += ["", f"{total} conflict(s){shown}: reports signed by another key than "
                  "the box id is known by (never merged; accept a key with: "
                  "opq-box-publish boxes accept BOX --key KEYID)"]
        lines += [f"  {printable(c.box_id)}  key {c.key_id}  counter {c.counter}  received "
                  f"{format_time(c.received)} from {printable(c.remote)}" for c in conflicts]
    return "\n".join(lines) + "\n"
