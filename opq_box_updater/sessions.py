"""Records of the sessions the updater's children run in, for the run after a killed one.

Every child that can change the box (dpkg and its hooks, run-parts, the run script, the
health check) leads a session of its own (:mod:`opq_box_updater.runner`). When the updater
itself is SIGKILLed (the OOM killer, ``kill -9``, a supervisor's timeout) its children are
re-parented to init and keep running, and the next run's crash recovery would roll back
while they still work on the box. So before such a child may run, its session is recorded
here; the next run stops what is still alive in a recorded session before it recovers.

One file per session, ``<state_dir>/sessions/<sid>.json``::

    {"sid": 1234, "start": 567890, "boot_id": "..."}

``start`` is the leader's start time (field 22 of ``/proc/PID/stat``, clock ticks after
boot) and ``boot_id`` the kernel's ``/proc/sys/kernel/random/boot_id``: together they tell
the recorded leader from a later process that reuses its pid, and a record from an earlier
boot, of which nothing can still run. One file per session (not one shared file) because
two writers exist: the updater for its own children and the run-script guard, running
under dpkg, for the run script's session. Files are written like the journal
(:func:`~opq_box_updater.fsutil.atomic_write`: temp file, fsync, rename, fsync of the
directory). This module does the file I/O only; stopping the processes is the runner's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

from .fsutil import atomic_write, fsync_dir, open_regular, utcnow

logger = logging.getLogger(__name__)

#: The records' directory under ``state_dir``.
SESSIONS_DIRNAME = "sessions"
#: How the updater tells the guard (through dpkg's environment) where to record the run
#: script's session; an older guard ignores it.
SESSIONS_ENV = "OPQ_BOX_UPDATER_SESSIONS"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: A record is about 80 bytes; anything much longer is damaged, and is not read whole.
MAX_RECORD_BYTES = 4096
_NAME = re.compile(r"[0-9]{1,10}\.json")


class Session(NamedTuple):
    """One recorded session: its id (the leader's pid), the leader's start time, the boot."""

    sid: int
    start: int
    boot_id: str


def boot_id() -> str:
    """This boot's id ("" where the kernel does not say: such records are never trusted)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


class SessionRecords:
    """The record files in one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def add(self, sid: int, start: int) -> None:
        """Record session ``sid`` whose leader started at ``start``, durably; raises
        OSError."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {"sid": sid, "start": start, "boot_id": boot_id()}
        atomic_write(self.dir / f"{sid}.json", json.dumps(doc).encode() + b"\n", 0o600)

    def remove(self, sid: int) -> None:
        """Forget session ``sid`` (it is done), durably; raises OSError."""
        try:
            (self.dir / f"{sid}.json").unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    def names(self) -> list[str]:
        """The entries of the directory; none when it is missing (the cheap no-op check)."""
        try:
            return sorted(os.listdir(self.dir))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def load(self) -> list[Session]:
        """Every readable record. A damaged one (not JSON, wrong fields, a link, a FIFO, far
        too long) is treated like a damaged ``state.json``: moved aside as
        ``<name>.corrupt-<time>`` with an error in the log, never a crash; its session is
        then unknown, so nothing of it is stopped."""
        found = []
        for name in self.names():
            if not _NAME.fullmatch(name):
                continue  # a moved-aside record, a temp file of a cut write
            path = self.dir / name
            try:
                found.append(_parse(path, int(name.split(".", 1)[0])))
            except (OSError, ValueError, RecursionError) as exc:
                aside = path.with_name(f"{name}.corrupt-{utcnow():%Y%m%dT%H%M%S}")
                logger.error("session record %s is damaged (%s); moved to %s, its processes "
                             "(if any) are not stopped", path, exc, aside.name)
                with contextlib.suppress(OSError):
                    os.replace(path, aside)
        return found

    def clear(self) -> None:
        """Forget every record (and temp files of cut writes); moved-aside records stay for
        the administrator, like ``state.json.corrupt-*``. Never fails the run."""
        removed = False
        for name in self.names():
            if _NAME.fullmatch(name) or (name.startswith(".") and name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    (self.dir / name).unlink()
                    removed = True
        if removed:
            with contextlib.suppress(OSError):
                fsync_dir(self.dir)


def _parse(path: Path, sid: int) -> Session:
    """The record in ``path``, which must name session ``sid``; ValueError if damaged."""
    with open_regular(path) as handle:
        data = handle.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"longer than {MAX_RECORD_BYTES} bytes")
    doc = json.loads(data)
    if not isinstance(doc, dict) or set(doc) != {"sid", "start", "boot_id"}:
        raise ValueError("not a session record")
    # type(): true and 1.0 compare equal to 1 but are nothing this module wrote
    if type(doc["sid"]) is not int or doc["sid"] != sid or sid <= 1:
        raise ValueError(f"sid {doc['sid']!r:.40} does not match the file name")
    if type(doc["start"]) is not int or doc["start"] < 0:
        raise ValueError(f"start {doc['start']!r:.40} is no start time")
    if not isinstance(doc["boot_id"], str):
        raise ValueError("boot_id is not a string")
    return Session(sid, doc["start"], doc["boot_id"])
