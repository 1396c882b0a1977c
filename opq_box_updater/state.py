"""The box's persistent state: the journal, accepted roots, the lock and trusted time.

Every file is written like python-tuf's ``_persist_metadata``: a temp file in the same
directory, fsync, ``os.replace``, fsync of the directory, so a power cut leaves either the old
or the new file. ``state.json`` holds what security depends on (installed version, floors,
failed versions, the journal); ``last_run.json`` holds bookkeeping only, so a refused run
can report its result without touching ``state.json``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import LockError, StateError

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
PHASES = ("idle", "downloading", "applying", "rolling-back")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Journal:
    """What an interrupted run was doing, recorded before each phase (DESIGN 3.4)."""

    phase: str = "idle"
    target_version: int = 0
    previous_version: int = 0
    previous: dict[str, str | None] = field(default_factory=dict)  # pkg -> version before
    targets: dict[str, str] = field(default_factory=dict)  # pkg -> version the update installs
    workdir: str | None = None  # extraction directory, kept until the run ends
    package_sha256: str | None = None


@dataclass(frozen=True)
class State:
    """``state.json``: everything the box's security and recovery depend on."""

    installed_version: int = 0
    floor_version: int = 0  # highest release version accepted
    floor_issued: str | None = None  # issued of the accepted release at floor_version
    time_floor: str | None = None  # newest issued ever accepted (trusted_now)
    etag: str | None = None
    last_modified: str | None = None
    metadata_url: str | None = None  # the URL the validators belong to
    failed_versions: tuple[int, ...] = ()
    applied_packages: dict[str, str] = field(default_factory=dict)
    unrestored: tuple[str, ...] = ()
    journal: Journal = field(default_factory=Journal)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"format": STATE_FORMAT, **asdict(self)}
        doc["failed_versions"] = list(self.failed_versions)
        doc["unrestored"] = list(self.unrestored)
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> State:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError("unknown state format")
        journal = Journal(**doc.pop("journal", {}))
        if journal.phase not in PHASES:
            raise ValueError(f"unknown journal phase {journal.phase!r}")
        doc.pop("format")
        state = cls(**{**doc, "journal": journal})
        state = replace(state, failed_versions=tuple(int(v) for v in state.failed_versions),
                        unrestored=tuple(state.unrestored))
        if type(state.installed_version) is not int or type(state.floor_version) is not int:
            raise ValueError("versions must be integers")
        return state


class Store:
    """The files under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.state_path = state_dir / "state.json"
        self.last_run_path = state_dir / "last_run.json"
        self.roots_dir = state_dir / "roots"
        self.release_path = state_dir / "release.json"
        self.debs_dir = state_dir / "debs"
        self.lock_path = state_dir / "lock"

    def ensure_dirs(self) -> None:
        try:
            self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.roots_dir.mkdir(mode=0o755, exist_ok=True)
            self.debs_dir.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc.strerror}") from None

    # --- state.json --------------------------------------------------------------------

    def load(self) -> State:
        """Read ``state.json``; a corrupt file is moved aside and a fresh state begins.

        Starting fresh costs a re-install of the current release and resets the rollback
        floors (the trusted roots in ``roots/`` are kept); refusing to run would instead leave
        the box stuck until someone logs in, which is worse for an unattended fleet.
        """
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StateError(f"cannot read {self.state_path}: {exc.strerror}") from None
        try:
            return State.from_json(data)
        except (ValueError, TypeError, KeyError) as exc:
            aside = self.state_path.with_name(f"state.json.corrupt-{utcnow():%Y%m%dT%H%M%S}")
            logger.error("%s is corrupt (%s); moved to %s and starting from a fresh state "
                         "(rollback floors reset, trusted roots kept)", self.state_path, exc,
                         aside.name)
            try:
                os.replace(self.state_path, aside)
            except OSError as err:
                raise StateError(f"{self.state_path} is corrupt and cannot be moved aside: "
                                 f"{err.strerror}") from None
            return State()

    def save(self, state: State) -> None:
        try:
            atomic_write(self.state_path, state.to_json())
        except OSError as exc:
            raise StateError(f"cannot write {self.state_path}: {exc.strerror}") from None

    # --- bookkeeping ---------------------------------------------------------------------

    def load_last_run(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.last_run_path.read_bytes())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_last_run(self, info: dict[str, Any]) -> None:
        """Bookkeeping must never fail a run: errors are logged only."""
        try:
            atomic_write(self.last_run_path, (json.dumps(info, indent=2, sort_keys=True)
                                              + "\n").encode())
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.last_run_path, exc.strerror)

    # --- accepted roots and the last accepted release --------------------------------------

    def stored_roots(self) -> dict[int, Path]:
        roots: dict[int, Path] = {}
        if self.roots_dir.is_dir():
            for path in self.roots_dir.glob("*.root.json"):
                number = path.name.split(".", 1)[0]
                if number.isdigit():
                    roots[int(number)] = path
        return roots

    def save_root(self, version: int, data: bytes) -> None:
        try:
            atomic_write(self.roots_dir / f"{version}.root.json", data)
        except OSError as exc:
            raise StateError(f"cannot store root v{version}: {exc.strerror}") from None

    def load_release(self) -> bytes | None:
        try:
            return self.release_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.release_path}: {exc.strerror}") from None

    def save_release(self, data: bytes) -> None:
        try:
            atomic_write(self.release_path, data)
        except OSError as exc:
            raise StateError(f"cannot write {self.release_path}: {exc.strerror}") from None


class Lock:
    """``flock`` on ``<state_dir>/lock``, non-blocking; the holder's pid is written inside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise LockError(f"another opq-box-updater run holds {self.path}{who}; "
                                "try again when it has finished", holder) from None
            raise StateError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
