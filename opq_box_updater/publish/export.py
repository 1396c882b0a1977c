"""``opq-box-publish export``: what a box needs for ``run --from DIR``, written to DIR.

DIR gets the repository's own layout for one channel: every root, the channel's version
file and the package it names (DESIGN 3.6). DIR is usually a USB stick formatted vfat, which
has no symbolic links, no modes and no owners, so nothing here makes a link, chmods or
chowns. Guarantees:

* **Only what verifies is exported.** The repository's chain and channel are verified
  first (under the repository's lock, so a release cannot change them halfway); a
  repository that would not verify exports nothing (exit 3).
* **Every file whole.** Each file is written to a temp file in its directory, fsynced and
  renamed into place, then the directory is fsynced; files already on DIR with the same
  bytes are left as they are.
* **A pulled stick is never inconsistent.** The package first, then the roots, the version
  file last: a copy cut short has the old version file (whose package is still there) or
  the new one with everything it names.
* **The stick, not memory, is verified.** The page cache of every exported file is dropped
  after its fsync, then DIR is verified like a repository, from REPO's own
  ``root/1.root.json``, before success is reported (exit 3 when it does not verify).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..errors import RepositoryError
from ..fsutil import fsync_dir
from ..metadata import Release
from .common import CHUNK, PublishError, is_within, normalize_now, repo_lock
from .repo import (
    PACKAGES_DIR,
    ROOT_DIR,
    check_version_file_name,
    root_file,
    root_versions,
)
from .verify import verify_repo

#: Temp files this module makes (``.<name>.<random>.tmp``), removed when a cut export left
#: them behind; nothing else in DIR is ever removed.
_TEMP_RE = re.compile(r"\.(version[A-Za-z0-9_-]*\.json|[0-9]+\.root\.json|[0-9a-f]{64}\.zip)"
                      r"\.[A-Za-z0-9_]+\.tmp")


@dataclass
class ExportResult:
    """What :func:`export_repo` wrote: ``written`` lists the files that changed on DIR."""

    release: Release
    root_version: int
    written: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def export_repo(repo: Path, dest: Path, *, version_file: str = "version.json",
                now: datetime | None = None) -> ExportResult:
    """Export ``version_file``'s release of ``repo`` with every root to ``dest`` and verify
    ``dest``; raises :class:`PublishError` (exit 2) for what cannot be done as asked and
    :class:`RepositoryError` (exit 3) when the repository or the written copy does not
    verify."""
    check_version_file_name(version_file)
    now = normalize_now(now)
    anchor = root_file(repo, 1)
    if not anchor.is_file():
        raise PublishError(f"{repo} is not a repository (no {ROOT_DIR}/1.root.json)")
    if is_within(dest, repo) or is_within(repo, dest):
        raise PublishError(f"{dest} and the repository {repo} overlap; export to a "
                           "separate directory (the stick's mount point)")
    with repo_lock(repo.absolute()):
        if not (repo / version_file).is_file():
            raise PublishError(f"{repo} has no {version_file}: publish a release there first "
                               f"(opq-box-publish release REPO PACKAGE.zip --version-file "
                               f"{version_file})")
        report = verify_repo(repo, now=now, channels=[version_file])
        if not report.ok:
            raise RepositoryError(f"{repo} does not verify, nothing was exported: "
                                  + "; ".join(report.problems))
        release = report.releases[version_file]
        newest = report.roots[-1].version
        _prepare(dest, newest)
        result = ExportResult(release, newest, warnings=list(report.warnings))
        names = [release.package.path,
                 *(f"{ROOT_DIR}/{v}.root.json" for v in range(1, newest + 1)), version_file]
        for name in names:
            if _export_file(repo / name, dest / name):
                result.written.append(name)
    check = verify_repo(dest, trust_root=anchor, now=now, channels=[version_file])
    if not check.ok:
        raise RepositoryError(f"what was written to {dest} does not verify (a faulty or "
                              "full stick?): " + "; ".join(check.problems))
    return result


def _prepare(dest: Path, newest: int) -> None:
    """Make ``dest``, ``root/`` and ``packages/`` (real directories, never links); refuse a
    DIR holding a newer root than the repository's (another repository's export: a box
    would walk into it); remove temp files a cut export left."""
    directories = (dest, dest / ROOT_DIR, dest / PACKAGES_DIR)
    for directory in directories:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                raise PublishError(f"{directory} is not a directory (a link or a file); "
                                   "export to an empty directory")
    above = [v for v in root_versions(dest) if v > newest]
    if above:
        raise PublishError(f"{dest / ROOT_DIR} has {above[0]}.root.json, newer than the "
                           f"repository's root v{newest}: it holds another repository's "
                           "export; use an empty directory")
    for directory in directories:
        try:
            directory.mkdir(exist_ok=True)
        except OSError as exc:
            raise PublishError(f"cannot create {directory}: {exc.strerror}") from None
        for entry in os.scandir(directory):
            if _TEMP_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)


def _export_file(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` whole and durably unless ``target`` already has the
    same bytes; either way drop ``target`` from the page cache. Returns whether it wrote."""
    if _same_content(source, target):
        _drop_cache(target)
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                   dir=target.parent)
    except OSError as exc:
        raise PublishError(f"cannot write in {target.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            _advise_dontneed(out.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PublishError(f"cannot write {target}: {exc.strerror or exc} (is the stick "
                           "full or read-only?); nothing older on it was changed") from None
    return True


def _same_content(source: Path, target: Path) -> bool:
    """True when ``target`` is a regular file (not a link) with ``source``'s bytes."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != source.stat().st_size:
        return False
    return _digest(source) == _digest(target)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _drop_cache(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _advise_dontneed(fd)
        finally:
            os.close(fd)


def _advise_dontneed(fd: int) -> None:
    """Ask the kernel to forget the file's cached pages (written back by the fsync before),
    so that reading it again reads the device."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
