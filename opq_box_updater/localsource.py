"""The repository read from a local directory (``run --from DIR``: a USB stick), the fetcher's
sibling behind the same :class:`~opq_box_updater.source.Source` interface.

It only delivers bytes; the updater verifies them exactly as it verifies what the fetcher
delivers. DIR is treated as hostile, like a server:

* **Plain files only, never a link.** Every path is opened one component at a time below
  DIR's own handle, each with ``O_NOFOLLOW`` and checked with ``lstat`` before and ``fstat``
  after opening: a symbolic link anywhere below DIR (pointing out of it or not), a FIFO, a
  device, a socket, or a directory where a file belongs is refused
  (:class:`NotPlainFileError`, exit 3) without being read; nothing blocks on a FIFO.
* **Bounded size.** Metadata is read to at most ``max_bytes + 1`` bytes and a package whose
  size is not its signed length is refused before a byte is copied
  (:class:`LengthOrHashMismatchError`, exit 3), as over the network.
* **Stable content.** A file whose size, mtime or ctime changes while it is read, or that
  yields more or fewer bytes than its size, is a :class:`DownloadError` (exit 4): something
  is writing to DIR; run again when it has finished.
* **Missing is 404.** A missing file is :class:`MissingFileError` (exit 4), what HTTP 404
  is; an empty DIR (a mount point with nothing mounted) is a :class:`ConfigError` (exit 2),
  like a DIR that does not exist; a read error of a failing stick is a
  :class:`DownloadError` (exit 4).
* **What is verified is what is applied.** The package is copied into the download
  directory as ``<sha256>.part`` (opened as the fetcher opens it), hashed while copied and
  renamed to ``<sha256>.zip`` only when length and SHA-256 match; extraction reads that copy,
  so the stick may change or go away afterwards.

No network: this module imports neither sockets nor HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import (
    ConfigError,
    DownloadError,
    LengthOrHashMismatchError,
    MissingFileError,
    NotPlainFileError,
)
from .partfile import CHUNK_SIZE, Progress, commit, open_part, zip_matches
from .source import MetadataResponse

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISREG, "a file"))


class LocalSource:
    """Reads one repository directory; use as a context manager, or call :meth:`close`."""

    def __init__(self, directory: Path, *, progress: bool | None = None) -> None:
        self.directory = directory
        try:
            self._fd: int | None = os.open(directory, os.O_RDONLY | os.O_DIRECTORY
                                           | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"--from {directory}: {exc.strerror}; give the directory the "
                              "stick is mounted on (mount -o ro,nodev,nosuid,noexec "
                              "/dev/sda1 /mnt/usb)") from None
        try:
            empty = not os.listdir(self._fd)
        except OSError:
            empty = False  # reading it fails again, with the file's own message
        if empty:  # a mount point with nothing mounted: not "an incomplete copy" (exit 4)
            self.close()
            raise ConfigError(f"--from {directory}: the directory is empty; is the stick "
                              "mounted? (mount -o ro,nodev,nosuid,noexec /dev/sda1 "
                              "/mnt/usb)")
        if progress is None:
            progress = sys.stderr is not None and sys.stderr.isatty()
        self._progress = progress

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LocalSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def location(self, relpath: str) -> str:
        """The path shown in messages (and kept as the release's origin in the state)."""
        return os.path.join(self.directory, relpath)

    # --- the Source interface -----------------------------------------------------------------

    def fetch_metadata(self, relpath: str, max_bytes: int = 65536, *, etag: str | None = None,
                       last_modified: str | None = None) -> MetadataResponse:
        """``relpath``, at most ``max_bytes`` bytes; always a 200 without validators (the
        ones given are ignored: a file has none)."""
        where = self.location(relpath)
        with self._open(relpath) as (fd, before):
            if before.st_size > max_bytes:
                raise LengthOrHashMismatchError(
                    f"{where}: {before.st_size} bytes, more than the limit of {max_bytes}; "
                    "refused")
            body = bytearray()
            while len(body) <= max_bytes:
                chunk = self._read(fd, min(CHUNK_SIZE, max_bytes + 1 - len(body)), where)
                if not chunk:
                    break
                body += chunk
            self._check_unchanged(fd, before, len(body), where)
        return MetadataResponse(200, bytes(body), None, None)

    def fetch_package(self, relpath: str, dest_dir: Path, sha256: str, length: int) -> Path:
        """Copy ``relpath`` to ``dest_dir/<sha256>.zip`` and return that path; the file exists
        only if its length and SHA-256 match (an existing one that matches is reused). A
        refused or interrupted copy leaves no ``.part``: copying again is cheap."""
        if not _SHA256_RE.fullmatch(sha256):
            raise ValueError(f"not a lowercase hex SHA-256: {sha256!r}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / f"{sha256}.zip"
        part = dest_dir / f"{sha256}.part"
        if zip_matches(final, sha256, length):
            logger.info("%s already copied and verified", final)
            return final
        where = self.location(relpath)
        with self._open(relpath) as (fd, before):
            if before.st_size != length:
                raise LengthOrHashMismatchError(
                    f"{where}: {before.st_size} bytes, the release signs {length}; refused")
            hasher = hashlib.sha256()
            try:
                with open_part(part) as out:
                    out.truncate(0)  # a network download's partial file: start over
                    copied = self._copy(fd, out, hasher, length, where)
                    self._check_unchanged(fd, before, copied, where)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        if hasher.hexdigest() != sha256:
            part.unlink()
            raise LengthOrHashMismatchError(
                f"{where}: SHA-256 mismatch (got {hasher.hexdigest()}, signed {sha256})")
        return commit(part, final)

    # --- reading DIR --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open(self, relpath: str) -> Iterator[tuple[int, os.stat_result]]:
        """An open descriptor of the regular file ``relpath`` below DIR, reached without
        following any link, and its stat; raises the errors the module docstring lists."""
        if self._fd is None:
            raise ValueError("the source is closed")
        parts = relpath.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a plain relative path: {relpath!r}")
        dir_fd, opened = self._fd, []
        try:
            for depth, part in enumerate(parts, start=1):
                last = depth == len(parts)
                shown = self.location("/".join(parts[:depth]))
                fd, st = _open_below(dir_fd, part, shown, last, self.directory)
                opened.append(fd)
                dir_fd = fd
            os.set_blocking(dir_fd, True)
            yield dir_fd, st
        finally:
            for fd in opened:
                os.close(fd)

    def _read(self, fd: int, size: int, where: str) -> bytes:
        try:
            return os.read(fd, size)
        except OSError as exc:
            raise DownloadError(f"{where}: cannot read ({exc.strerror}); the stick may be "
                                "failing: export to another one") from None

    def _copy(self, fd: int, out: IO[bytes], hasher: Any, length: int, where: str) -> int:
        """Copy at most ``length + 1`` bytes (one more to find out) into ``out`` and
        ``hasher``; return how many were read."""
        copied = 0
        bar = Progress(length) if self._progress else None
        while copied <= length:
            chunk = self._read(fd, min(CHUNK_SIZE, length + 1 - copied), where)
            if not chunk:
                break
            copied += len(chunk)
            out.write(chunk)
            hasher.update(chunk)
            if bar:
                bar.update(min(copied, length))
        if bar:
            bar.finish(min(copied, length))
        return copied

    def _check_unchanged(self, fd: int, before: os.stat_result, got: int, where: str) -> None:
        after = os.fstat(fd)
        if got != before.st_size or (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                before.st_size, before.st_mtime_ns, before.st_ctime_ns):
            raise DownloadError(f"{where} changed while it was being read (is something "
                                f"writing to {self.directory}?); nothing of it was used, run "
                                "again when it has finished")


def _open_below(dir_fd: int, name: str, shown: str, last: bool,
                top: Path) -> tuple[int, os.stat_result]:
    """Open ``name`` in ``dir_fd``: a regular file when ``last``, else a directory; never a
    link, never blocking; ``lstat`` before and ``fstat`` after must agree."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise MissingFileError(f"{shown}: no such file in {top} (an incomplete copy? "
                               "export it again)") from None
    except OSError as exc:
        raise DownloadError(f"{shown}: cannot read ({exc.strerror})") from None
    wanted = stat.S_ISREG if last else stat.S_ISDIR
    if not wanted(st.st_mode):
        raise NotPlainFileError(
            f"{shown} is {_kind(st.st_mode)}, not a {'file' if last else 'directory'}: "
            "refused (an export has only plain files and directories)")
    try:
        fd = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise DownloadError(f"{shown}: cannot open ({exc.strerror}); was it just "
                            "replaced?") from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not wanted(now.st_mode):
        os.close(fd)
        raise DownloadError(f"{shown} changed while it was being opened (is something "
                            f"writing to {top}?); run again when it has finished")
    return fd, now


def _kind(mode: int) -> str:
    return next((text for test, text in _KINDS if test(mode)), "not a regular file")
