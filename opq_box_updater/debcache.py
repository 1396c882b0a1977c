"""The box's cache of debs for rollbacks (``<state_dir>/debs/``), kept so that the box knows
*before* applying that it can go back (issue 12).

What this module guarantees:

* every deb it stores has its sha256 beside it (``<deb>.sha256``), both written atomically;
  a deb is used only while it still matches (a truncated or flipped file is never
  reinstalled by a rollback, and is found before applying, not during the rollback);
* a deb found elsewhere (apt's archive cache, ``apt-get download``) is checked whole
  (``dpkg-deb --contents`` reads every byte of its data part) and by its own control
  fields, then copied into the cache: a later ``apt-get clean`` cannot take it away;
* a deb cached by an older updater, without a sha256, is checked whole once and then gets
  one.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from .fsutil import unsafe_dir_reason, unsafe_file_reason
from .runner import run

logger = logging.getLogger(__name__)

SUFFIX = ".sha256"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fin:
        for block in iter(lambda: fin.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(path: Path) -> tuple[str, str, str] | None:
    """(Package, Version, Architecture) from the deb's own control part; None when it is not
    a deb."""
    result = run(["dpkg-deb", "--show",
                  "--showformat=${Package}\t${Version}\t${Architecture}\n", path],
                 check=False, timeout=120)
    fields = result.output.partition("\n")[0].split("\t")
    return (fields[0], fields[1], fields[2]) if result.returncode == 0 and len(fields) == 3 \
        else None


def _is(path: Path, name: str, version: str, arch: str) -> bool:
    """True when the deb at ``path`` is ``name`` ``version`` (and ``arch``, unless empty)."""
    found = identity(path)
    return found is not None and found[:2] == (name, version) and arch in ("", found[2])


def readable_whole(path: Path) -> bool:
    """True when dpkg-deb can read every member of the deb to its end (a truncated or
    corrupted data part fails here, not in the middle of a rollback)."""
    return run(["dpkg-deb", "--contents", path], check=False, timeout=600).returncode == 0


def _write_atomically(dest: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("wb") as fout:
        write(fout)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)


def store(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` (fsynced temp file and rename, mtime now), then its sha256
    to ``dest.sha256``: a deb without a matching sha256 is never trusted."""
    sidecar = dest.with_name(dest.name + SUFFIX)
    sidecar.unlink(missing_ok=True)  # never a new deb under an old digest
    with src.open("rb") as fin:
        _write_atomically(dest, lambda fout: shutil.copyfileobj(fin, fout))
    os.utime(dest)
    digest = sha256_file(dest)
    _write_atomically(sidecar, lambda fout: fout.write(f"{digest}\n".encode()))


def intact(path: Path) -> bool:
    """True when the cached deb matches its sha256; one without (cached by an older updater)
    is checked whole and then gets one."""
    sidecar = path.with_name(path.name + SUFFIX)
    try:
        expected = sidecar.read_text().strip()
    except FileNotFoundError:
        if not readable_whole(path):
            return False
        digest = sha256_file(path)
        _write_atomically(sidecar, lambda fout: fout.write(f"{digest}\n".encode()))
        return True
    except OSError:
        return False
    try:
        return sha256_file(path) == expected
    except OSError:
        return False


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + SUFFIX).unlink(missing_ok=True)


def clean_leftovers(cache: Path) -> None:
    """Remove temp files of a run that died while copying."""
    for leftover in cache.glob("*.tmp"):
        leftover.unlink(missing_ok=True)


def _candidates(directory: Path, name: str, version: str, arch: str) -> Iterable[Path]:
    forms = dict.fromkeys([version.replace(":", "%3a"), version,
                           version.partition(":")[2] if ":" in version else version])
    archs = glob.escape(arch) if arch else "*"
    for form in forms:
        yield from sorted(directory.glob(f"{glob.escape(name)}_{glob.escape(form)}_{archs}.deb"))


def find(cache: Path, others: Iterable[Path], name: str, version: str,
         arch: str = "", *, root_owned: bool = True) -> Path | None:
    """An intact deb of exactly ``name`` ``version`` (and architecture ``arch`` unless it is
    empty: the ``i386`` copy of a Multi-Arch package is not the ``amd64`` one): from
    ``cache``, else from one of ``others`` (checked whole, then copied into ``cache`` with
    its sha256). None when there is none.

    With ``root_owned`` (apt's archive cache: nothing vouches for its files but their
    owner), a deb of ``others`` is used only when it and its directory are root's and
    writable by nobody else: another account could plant a deb of the right name and
    version there, which a rollback would install as root. ``apt-get download``'s own
    files, whose hashes apt checked against its signed lists, need not be."""
    for path in _candidates(cache, name, version, arch):
        if _is(path, name, version, arch) and intact(path):
            return path
        logger.warning("rollback cache: %s is damaged or not %s %s; ignored", path.name,
                       name, version)
    for directory in others:
        why = unsafe_dir_reason(directory) if root_owned and directory.is_dir() else None
        if why is not None:
            logger.warning("not using debs from %s: it %s", directory, why)
            continue
        for path in _candidates(directory, name, version, arch):
            why = unsafe_file_reason(path, directory) if root_owned else None
            if why is not None:
                logger.warning("not using %s: it %s", path, why)
                continue
            if not _is(path, name, version, arch) or not readable_whole(path):
                logger.warning("%s is damaged or not %s %s; ignored", path, name, version)
                continue
            try:
                cache.mkdir(parents=True, exist_ok=True, mode=0o700)
                store(path, cache / path.name)
            except OSError as exc:
                logger.warning("cannot copy %s into %s (%s); using it where it is", path,
                               cache, exc)
                return path
            return cache / path.name
    return None
