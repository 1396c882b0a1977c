"""The download directory's files: ``<sha256>.part`` being written, ``<sha256>.zip`` verified
(and the hashing thread and progress bar of a download).

Both are opened with ``O_NOFOLLOW`` and accepted only as a regular file with one link, owned
by the user running the updater: a symlink or hard link planted in the download directory
(issue 13, item 2) is removed, never written or read through, so root never overwrites
another file with package bytes. (The ownership and mode of the directory itself are
checked by the updater before it gets here.)
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from .errors import StateError

CHUNK_SIZE = 64 * 1024
HASH_QUEUE = 16  # chunks in flight to the hashing thread (1 MiB)
MIB = 1024 * 1024

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted FIFO


def open_part(path: Path) -> IO[bytes]:
    """Open ``path`` for reading and writing, creating it (mode 0600) if missing.

    Whatever else is found there (a symlink, a FIFO, a hard link, another user's file) is
    removed and a fresh empty file created in its place. Raises :class:`StateError` when
    that cannot be done (a planted directory, a race with whoever planted it).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
    except OSError as exc:  # ELOOP: a symlink; EISDIR, ENXIO...: anything else odd
        fd = _replace(path, f"cannot be opened ({exc.strerror})")
    else:
        if not _is_own_regular_file(fd):
            os.close(fd)
            fd = _replace(path, "is not a regular file of this user with one link")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b")


def _replace(path: Path, why: str) -> int:
    """Remove what is at ``path`` (never following it) and create a fresh file there."""
    try:
        path.unlink()
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    except OSError as exc:
        raise StateError(f"{path} {why}, and cannot be replaced ({exc.strerror}); "
                         "remove it by hand") from None


def _is_own_regular_file(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def zip_matches(path: Path, sha256: str, length: int) -> bool:
    """True if ``path`` is a regular file of this user with exactly ``length`` bytes hashing
    to ``sha256``. Anything else found at ``path`` is removed (a missing file is False)."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except FileNotFoundError:
        return False
    except OSError:
        path.unlink()  # a symlink (ELOOP) or worse: never read through it
        return False
    with os.fdopen(fd, "rb") as src:
        if not _is_own_regular_file(fd) or os.fstat(fd).st_size != length:
            path.unlink()
            return False
        hasher = hashlib.sha256()
        hash_file(src, hasher)
    if hasher.hexdigest() != sha256:
        path.unlink()
        return False
    return True


def hash_file(src: IO[bytes], hasher: Any) -> None:
    """Feed ``src`` from its start to its end into ``hasher``; leaves it at the end."""
    src.seek(0)
    while chunk := src.read(CHUNK_SIZE):
        hasher.update(chunk)


def commit(part: Path, final: Path) -> Path:
    """Rename a verified ``part`` to ``final`` (replacing whatever is there, a symlink
    included, without following it).

    Deliberately no fsync: nothing trusts the file across a power cut. A ``<sha256>.zip``
    found by a later run is hashed again before use (:func:`zip_matches`), and recovery
    re-reads the extracted package, so a torn file costs a re-download, never a wrong
    install; an fsync would cost every download its whole write-back time (measured: 0.3-0.4
    s of 3 s for 1 GiB).
    """
    os.replace(part, final)
    return final


class HashingThread:
    """Hashes chunks on the second core while the caller reads and writes the next ones.

    hashlib releases the GIL, so on a fast link the hash no longer adds its whole time to
    the transfer's (measured on loopback against nginx, 512 MiB: 1.23x ``curl -o`` hashing
    inline, 1.06x with this thread). The queue holds at most :data:`HASH_QUEUE` chunks, so
    memory stays flat in the package size.
    """

    def __init__(self, hasher: Any) -> None:
        import queue  # only on the download path: the no-op check never needs it

        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_QUEUE)
        self._thread = threading.Thread(target=self._work, args=(hasher,), name="sha256",
                                        daemon=True)
        self._thread.start()

    def _work(self, hasher: Any) -> None:
        while (chunk := self._queue.get()) is not None:
            hasher.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class Progress:
    """A one-line progress bar on stderr: ``\\r  12.3 MiB / 40.0 MiB  31%``."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.2:  # a terminal cannot show more anyway
            return
        self._last = now
        percent = done * 100 // self._total if self._total else 100
        sys.stderr.write(f"\r  {done / MIB:.1f} MiB / {self._total / MIB:.1f} MiB  {percent}%")
        sys.stderr.flush()

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        sys.stderr.write("\n")
        sys.stderr.flush()
