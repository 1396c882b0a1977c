"""Rollout health: what the boxes' reports say about each channel's releases. No I/O.

Takes report records (the collector's ``ReportRecord``: anything with ``box_id``,
``received``, ``report`` and ``status``), releases and a clock; returns numbers. A box's
report is hostile input: every field is type-checked here and a wrong type counts as
absent, never as an error.

Definitions (docs/operations.md, "Rollout"):

* **known boxes**: every box that ever sent an accepted report; a box belongs to the channel
  its newest report names (``version.json`` when it names none).
* **in the bucket**: DESIGN 2.3's formula (:func:`~opq_box_updater.metadata.in_rollout`, the
  box's own function) at the release's current percentage.
* **updated**: installed version ≥ the release's (any box of the channel); an installed
  version above every version the channel published counts as unknown.
* **failed**: not updated, and the release is in the box's ``failed_versions``, or the box's
  newest report, received since the release was first published, says ``apply-failed`` or
  ``refused``.
* **not seen**: in the bucket, neither updated nor failed, no report since the release was
  first published. **waiting**: the same but it has reported since (postponed, network
  errors, not run yet). **stale**: in the bucket, no report for more than two days.
* **failure rate** of the stage: failed / (updated + failed): of the boxes that tried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from ..metadata import in_rollout, rollout_bucket

STALE_AFTER = timedelta(days=2)
FAILED_RESULTS = frozenset({"apply-failed", "refused"})
DEFAULT_CHANNEL = "version.json"
DEFAULT_MAX_FAILURE_RATE = 5.0  # percent
_MAX_VERSION = 2**63 - 1


class Record(Protocol):
    """What this module reads of a stored report (``store.ReportRecord`` has it)."""

    @property
    def box_id(self) -> str: ...
    @property
    def received(self) -> datetime: ...
    @property
    def report(self) -> Mapping[str, Any]: ...
    @property
    def status(self) -> str: ...


@dataclass(frozen=True)
class BoxView:
    """One box as its newest report describes it; fields the box sent wrongly are None."""

    box_id: str
    channel: str
    installed: int | None
    result: str | None
    last_seen: datetime  # when the collector received it (the box's clock may be wrong)
    failed_versions: frozenset[int]
    error: str | None

    def stale(self, now: datetime) -> bool:
        return now - self.last_seen > STALE_AFTER


@dataclass(frozen=True)
class ReleaseRef:
    """A release as the health numbers need it: its channel file, version, current
    percentage and when it was first published (older reports say nothing about it)."""

    channel: str
    version: int
    rollout: int
    since: datetime


@dataclass(frozen=True)
class Health:
    """The numbers of one channel's release (module docstring for their meaning)."""

    release: ReleaseRef
    boxes: int  # known boxes of the channel
    in_bucket: int
    updated: int
    failed: int
    waiting: int
    not_seen: int
    stale: int

    @property
    def tried(self) -> int:
        return self.updated + self.failed

    @property
    def failure_rate(self) -> float:
        """Percent of the boxes that tried the release and failed it; 0 before any tried."""
        return 100.0 * self.failed / self.tried if self.tried else 0.0


def _int(value: Any) -> int | None:
    """A version number a box sent, or None when it is not a plain non-negative int."""
    return value if type(value) is int and 0 <= value <= _MAX_VERSION else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def box_view(record: Record) -> BoxView:
    """What the health numbers and the fleet page use of one record."""
    report = record.report if isinstance(record.report, Mapping) else {}
    channel = _text(report.get("channel")) or DEFAULT_CHANNEL
    installed = _int(report.get("installed_version"))
    installed_channel = _text(report.get("installed_channel"))
    if installed_channel is not None and installed_channel != channel:
        installed = 0  # another channel's software: this channel's release is not on it
    failed = report.get("failed_versions")
    versions = frozenset(v for v in failed if _int(v) is not None) if isinstance(
        failed, list) else frozenset()
    return BoxView(box_id=record.box_id, channel=channel, installed=installed,
                   result=_text(report.get("last_result")), last_seen=record.received,
                   failed_versions=versions, error=_text(report.get("error")))


def latest_views(records: Iterable[Record]) -> list[BoxView]:
    """The newest non-conflict record of each box, as views, sorted by box id."""
    newest: dict[str, Record] = {}
    for rec in records:
        if rec.status == "conflict":
            continue
        seen = newest.get(rec.box_id)
        if seen is None or rec.received >= seen.received:
            newest[rec.box_id] = rec
    return [box_view(newest[b]) for b in sorted(newest)]


def is_updated(box: BoxView, version: int) -> bool:
    return box.installed is not None and box.installed >= version


def is_failed(box: BoxView, release: ReleaseRef) -> bool:
    if is_updated(box, release.version):
        return False
    if release.version in box.failed_versions:
        return True
    return box.result in FAILED_RESULTS and box.last_seen >= release.since


def health(release: ReleaseRef, boxes: Sequence[BoxView], now: datetime,
           newest: int | None = None) -> Health:
    """The numbers of ``release`` over the known boxes (of every channel: filtered here).
    ``newest`` is the highest version the channel has published: a box claiming to have
    installed a higher one is wrong or lying, and its installed version counts as unknown
    (else any number of such reports would dilute a stage's failure rate)."""
    mine = [b if newest is None or b.installed is None or b.installed <= newest
            else dataclasses.replace(b, installed=None)
            for b in boxes if b.channel == release.channel]
    bucket = [b for b in mine if in_rollout(b.box_id, release.version, release.rollout)]
    updated = sum(1 for b in mine if is_updated(b, release.version))
    failed = sum(1 for b in mine if is_failed(b, release))
    rest = [b for b in bucket if not is_updated(b, release.version) and not is_failed(b, release)]
    not_seen = sum(1 for b in rest if b.last_seen < release.since)
    return Health(release=release, boxes=len(mine), in_bucket=len(bucket), updated=updated,
                  failed=failed, waiting=len(rest) - not_seen, not_seen=not_seen,
                  stale=sum(1 for b in bucket if b.stale(now)))


def bucket_of(box_id: str, version: int) -> int:
    """The box's bucket for a release (0-99): it takes the release at any percentage above."""
    return rollout_bucket(box_id, version)


def widen_refusal(current: Health, max_failure_rate: float) -> str | None:
    """Why widening the rollout of ``current`` must not go ahead, or None."""
    if current.failure_rate > max_failure_rate:
        return (f"{current.release.channel} v{current.release.version}: {current.failed} of "
                f"{current.tried} boxes that tried it failed ({current.failure_rate:.1f}%, "
                f"above {max_failure_rate:g}%)")
    return None


def format_health(rows: Sequence[Health]) -> str:
    """The table ``rollout status`` prints (channel names come from our own repository)."""
    header = ("CHANNEL", "RELEASE", "ROLLOUT", "BOXES", "IN BUCKET", "UPDATED", "FAILED",
              "WAITING", "NOT SEEN", "STALE", "FAILURE RATE")
    table = [header] + [(
        h.release.channel, f"v{h.release.version}", f"{h.release.rollout}%", str(h.boxes),
        str(h.in_bucket), str(h.updated), str(h.failed), str(h.waiting), str(h.not_seen),
        str(h.stale), f"{h.failure_rate:.1f}%" if h.tried else "-") for h in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                   + "\n" for row in table)
