"""The repository's release history: every signed version file it ever published, in order.

``REPO/.history.jsonl`` gets one JSON line per step that replaced a version file (release,
refresh, rotate, rollout widen/halt, recall): when, what, and the signed envelope written.
It is how ``recall`` finds the last good release's package, and the operators' log of who
moved a rollout when. A dotfile, so neither ``serve`` nor the shipped nginx configuration
serves it.

The file is not trusted: a reader re-verifies each envelope against the repository's own
root chain before using it (:func:`.recall.signed_releases`), so an entry written by anyone
without the release keys can name no package. Appends are one ``write`` on an ``O_APPEND``
descriptor, fsynced; a line torn by a power cut is skipped on reading and cannot swallow
the next entry (a missing newline is written first).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..fsutil import open_regular
from ..metadata import format_time, parse_time

logger = logging.getLogger(__name__)

HISTORY_FILE = ".history.jsonl"
#: A line longer than this is not ours (a version file is at most 64 KiB, plus a little).
MAX_LINE = 96 * 1024


@dataclass(frozen=True)
class Entry:
    """One step that replaced a version file."""

    time: datetime
    action: str  # release, refresh, rotate, widen, halt, recall
    channel: str  # the version file
    version: int
    rollout: int
    envelope: dict[str, Any]  # the signed document as written (not verified here)
    note: str = ""


def history_path(repo: Path) -> Path:
    return repo / HISTORY_FILE


def record(repo: Path, action: str, channel: str, envelope_bytes: bytes, now: datetime,
           note: str = "") -> None:
    """Append the step that just wrote ``envelope_bytes`` to ``channel``; logged at info.
    Never raises for the disk: the version file is already published when this runs."""
    envelope = json.loads(envelope_bytes)
    signed = envelope["signed"]
    line = json.dumps({"time": format_time(now), "action": action, "channel": channel,
                       "version": signed["version"], "rollout": signed["rollout_percent"],
                       "note": note, "envelope": envelope},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    try:
        _append(history_path(repo), line.encode("utf-8"))
    except OSError as exc:  # the version file is already live: say so, do not fail the step
        logger.warning("could not add to %s (%s): recall will not know this release",
                       HISTORY_FILE, exc)
    logger.info("%s: %s v%d, rollout %d%%%s", channel, action, signed["version"],
                signed["rollout_percent"], f" ({note})" if note else "")


def _append(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")  # end a line torn by a crash, so it cannot eat this one
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def entries(repo: Path, channel: str | None = None) -> list[Entry]:
    """The history, oldest first (only ``channel``'s when given); unreadable lines skipped."""
    found: list[Entry] = []
    for number, raw in _lines(history_path(repo)):
        try:
            entry = _parse(raw)
        except (ValueError, KeyError, TypeError, FormatError) as exc:
            logger.warning("%s line %d is unreadable (%s); skipped", HISTORY_FILE, number, exc)
            continue
        if channel is None or entry.channel == channel:
            found.append(entry)
    return found


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The file's lines, each read bounded: only a regular file (no symlink: a link to
    /dev/zero, a FIFO, would read without end or block the collector's page for ever)."""
    try:
        opened = open_regular(path)
    except FileNotFoundError:
        return
    except OSError as exc:  # ELOOP (a symbolic link), or not a regular file
        logger.warning("%s is not read (%s)", HISTORY_FILE, exc)
        return
    with opened as handle:
        number = 0
        while raw := handle.readline(MAX_LINE + 1):
            number += 1
            if len(raw) > MAX_LINE or not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of a long line
                    raw = handle.readline(MAX_LINE + 1)
                logger.warning("%s line %d is torn or too long; skipped", HISTORY_FILE, number)
                continue
            yield number, raw


def _parse(raw: bytes) -> Entry:
    doc = json.loads(raw)
    values = (doc["version"], doc["rollout"])
    if not all(type(v) is int for v in values) or not isinstance(doc["envelope"], dict):
        raise ValueError("wrong types")
    return Entry(time=parse_time(str(doc["time"])), action=str(doc["action"]),
                 channel=str(doc["channel"]), version=values[0], rollout=values[1],
                 envelope=doc["envelope"], note=str(doc.get("note", "")))
