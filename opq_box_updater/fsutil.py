"""File-system helpers that the box and the publisher share: atomic writes and directory
checks. Nothing here knows about updates; both sides import it, neither reaches into the
other's modules for it.

Files are only ever replaced whole (python-tuf's ``_persist_metadata``): a temp file in the
same directory (a dotfile, so a web server never shows it half-written), fsync,
``os.replace``, fsync of the directory. A reader sees the old file or the new one, never a
mix, even across a power cut.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO


def utcnow() -> datetime:
    """The current UTC time in whole seconds (repository and state times have no fractions)."""
    return datetime.now(UTC).replace(microsecond=0)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, mode: int = 0o644, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a temp file next to ``path``; on a clean exit it replaces ``path`` atomically.

    On an exception the temp file is removed and ``path`` is untouched. ``durable`` also makes
    the new content survive a power cut (fsync of the file and of the directory).
    """
    try:
        old_second: int | None = int(os.stat(path).st_mtime)
    except FileNotFoundError:
        old_second = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if old_second is not None and int(os.fstat(handle.fileno()).st_mtime) <= old_second:
                # Static servers (nginx) derive ETag and Last-Modified from the mtime's second
                # and the size: a same-size rewrite within one second would keep the old
                # validators, and clients would be told 304 and miss the new content.
                os.utime(handle.fileno(), (old_second + 1, old_second + 1))
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (and durably unless ``durable`` is false)."""
    with atomic_file(path, mode, durable=durable) as handle:
        handle.write(data)


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only as a regular file: not through a symbolic link
    (``ELOOP``), and not a FIFO or device (``OSError``), which would block or read without
    end (a link to /dev/zero)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise OSError(f"{path} is not a regular file")
    return handle


def unsafe_dir_reason(path: Path) -> str | None:
    """Why a directory that root writes into could be influenced by another local user, or
    ``None`` when it is safe: it must be a real directory (not a symlink), owned by the
    effective user (root on a box), and not writable by group or others; and every directory
    above it must be owned by root or that user and writable by nobody else unless sticky
    (like ``/tmp``): whoever may rename an ancestor can swap the whole path for a symlink
    between the check and the write. A directory another account owns or may write to lets
    that account plant symlinks (``<sha>.part`` pointing at ``/etc/shadow``) or hold the
    lock. A path that does not exist yet is judged by its existing ancestors."""
    path = Path(os.path.abspath(path))
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    # Every directory above the path (the nearest existing one included, when the path
    # itself is still to be made), as the kernel resolves them.
    above = Path(os.path.realpath(existing if existing != path else path.parent))
    for ancestor in (*reversed(above.parents), above):
        why = _ancestor_reason(ancestor)
        if why is not None:
            return why
    if existing != path:
        return None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return _owner_reason(st)


def _owner_reason(st: os.stat_result) -> str | None:
    """Owned by the effective user and writable by nobody else, or why not."""
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _ancestor_reason(directory: Path) -> str | None:
    st = os.stat(directory)
    if st.st_uid not in (0, os.geteuid()):
        return f"is below {directory}, which uid {st.st_uid} owns"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return (f"is below {directory}, which group or others may write "
                f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def unsafe_file_reason(path: Path, inside: Path) -> str | None:
    """Why a file that root executes (a hook) could be changed by another local user, or
    ``None`` when it is safe: a regular file owned by the effective user and not writable by
    group or others (lstat: the name itself is judged; its directory is the caller's to
    check with :func:`unsafe_dir_reason`). A symbolic link is accepted only when it resolves
    inside the directory ``inside`` to a file, in a safe directory, that passes the same
    checks: a link pointing out could name a file anyone may rewrite."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(os.path.realpath(inside)):
            return f"is a symbolic link pointing outside {inside} (to {target})"
        if not os.path.lexists(target) or os.path.islink(target):
            return "is a dangling symbolic link"
        why = unsafe_dir_reason(target.parent) or unsafe_file_reason(target, inside)
        return None if why is None else f"links to {target}, which {why}"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return _owner_reason(st)
