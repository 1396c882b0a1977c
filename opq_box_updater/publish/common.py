"""What every publishing step shares: its error type, the clock, durations and safe file writes.

Files in a repository are only ever replaced whole, through :mod:`opq_box_updater.fsutil`
(re-exported here as ``atomic_file``/``atomic_write``): a box or a web server sees either the
old file or the new one, never a mix, even across a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import utcnow

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
#: How long a publishing step waits for another one on the same repository (seconds).
LOCK_WAIT = 600.0
WARN_WITHIN = timedelta(days=7)
DEFAULT_ROOT_EXPIRES = timedelta(days=730)
DEFAULT_RELEASE_EXPIRES = timedelta(days=30)


class PublishError(ConfigError):
    """The operator asked for something that cannot be done as asked (exit 2).

    The message says what to do instead. Verification failures of a repository's content
    are :class:`~opq_box_updater.errors.RepositoryError` (exit 3), as on the box.
    """


def normalize_now(now: datetime | None) -> datetime:
    """``now`` as an aware UTC datetime in whole seconds; the real clock when ``None``."""
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).replace(microsecond=0)


_DURATION = re.compile(r"(\d+)([smhdwy])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> timedelta:
    """Parse ``30d``, ``12h``, ``2y``, ``1w``, ``90m``, ``45s`` (y = 365 days)."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise PublishError(f"bad duration {text!r}: use a positive number and one of "
                           "s, m, h, d, w, y (for example 30d or 2y)")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, length) of a file, streamed: memory does not grow with its size."""
    digest = hashlib.sha256()
    length = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length


def is_within(child: Path, parent: Path) -> bool:
    """True when ``child`` is ``parent`` or below it, after resolving symlinks."""
    return child.resolve().is_relative_to(parent.resolve())


@contextlib.contextmanager
def repo_lock(repo: Path, wait: float | None = None) -> Iterator[None]:
    """Hold an exclusive flock on the repository directory itself (no lock file to serve or
    to leave behind) while a step reads the current release and replaces it: two releases,
    or a release and the weekly refresh, must not interleave, or version.json goes back.
    Waits up to ``wait`` (default :data:`LOCK_WAIT`) seconds for another step to finish."""
    try:
        fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PublishError(f"{repo} is not a repository (it does not exist); create one with "
                           "opq-box-publish init") from None
    except NotADirectoryError:
        raise PublishError(f"{repo} is not a directory") from None
    try:
        deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise PublishError(f"another opq-box-publish is still working on {repo}; "
                                   "nothing was changed, try again when it has finished")
            if not told:
                logger.warning("waiting for another opq-box-publish working on %s", repo)
                told = True
            time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


