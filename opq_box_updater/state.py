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
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ConfigError, FormatError, LockError, StateError
from .fsutil import atomic_write, unsafe_dir_reason, utcnow
from .metadata import parse_time
from .sessions import SESSIONS_DIRNAME

logger = logging.getLogger(__name__)

STATE_FORMAT = 2
PHASES = ("idle", "downloading", "applying", "rolling-back")
DEFAULT_CHANNEL = "version.json"


class Journal(NamedTuple):
    """What an interrupted run was doing, recorded before each phase (DESIGN 3.4)."""

    phase: str = "idle"
    target_version: int = 0
    previous_version: int = 0
    # Never mutated (a new Journal replaces the old), so one shared empty default is safe.
    previous: dict[str, str | None] = {}  # pkg -> version before
    targets: dict[str, str] = {}  # pkg -> version the update installs
    workdir: str | None = None  # extraction directory, kept until the run ends
    package_sha256: str | None = None
    channel: str | None = None  # the channel the target version belongs to
    # Every package dpkg knew before applying, "want flag status version" (applyplan's
    # encode_states): what the rollback returns the box to. Empty in older journals.
    before: dict[str, str] = {}
    # The packages the update may change (RollbackCache.prepare): all a rollback touches.
    scope: tuple[str, ...] = ()


class ChannelState(NamedTuple):
    """What the box knows of one channel (a version file). Kept per channel so that another
    channel's release can never raise this one's floor, and moving a box between channels
    never locks it out (DESIGN 2.3)."""

    installed_version: int = 0  # the last release of this channel the box installed
    floor_version: int = 0  # highest release version accepted
    floor_issued: str | None = None  # issued of the accepted release at floor_version
    floor_keys: str | None = None  # the release keys the floor was set under
    failed_versions: tuple[int, ...] = ()
    interrupted_version: int = 0  # a release whose apply a power cut interrupted ...
    interruptions: int = 0  # ... this many times (it counts as failed at MAX_INTERRUPTIONS)


class State(NamedTuple):
    """``state.json``: everything the box's security and recovery depend on."""

    installed_channel: str | None = None  # the channel whose release is on the box
    channels: dict[str, ChannelState] = {}
    time_floor: str | None = None  # newest issued ever accepted (trusted_now), any channel
    time_floor_keys: str | None = None  # the release keys the time floor was set under
    etag: str | None = None
    last_modified: str | None = None
    metadata_url: str | None = None  # the URL the validators belong to
    applied_packages: dict[str, str] = {}
    unrestored: tuple[str, ...] = ()
    journal: Journal = Journal()

    def channel(self, name: str) -> ChannelState:
        return self.channels.get(name, ChannelState())

    def with_channel(self, name: str, channel: ChannelState) -> State:
        return self._replace(channels={**self.channels, name: channel})

    @property
    def installed_version(self) -> int:
        """The release on the box (of ``installed_channel``); 0 before the first update."""
        if self.installed_channel is None:
            return 0
        return self.channel(self.installed_channel).installed_version

    def installed_for(self, name: str) -> int:
        """The installed release as ``name``'s versions count: 0 when the box runs another
        channel's release, so a box moved to ``name`` takes that channel's release."""
        return self.installed_version if self.installed_channel == name else 0

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"format": STATE_FORMAT, **self._asdict(),
                               "journal": _journal_doc(self.journal),
                               "unrestored": list(self.unrestored)}
        doc["channels"] = {name: {**ch._asdict(), "failed_versions": list(ch.failed_versions)}
                           for name, ch in self.channels.items()}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> State:
        """Parse ``state.json``; raise :class:`ValueError` for anything but a document this
        module wrote: every field is type-checked, so a damaged file is caught here, once,
        instead of failing every later run somewhere else (a crash loop)."""
        doc = json.loads(data)
        # type(): true and 1.0 compare equal to 1 but are no format this module wrote
        if not isinstance(doc, dict) or type(doc.get("format")) is not int \
                or doc["format"] not in (1, STATE_FORMAT):
            raise ValueError("unknown state format")
        if doc.pop("format") == 1:
            doc = _from_format_1(doc)
        journal_doc = doc.pop("journal", {})
        if not isinstance(journal_doc, dict):
            raise ValueError("'journal' is not an object")
        channels_doc = doc.pop("channels", {})
        if not isinstance(channels_doc, dict):
            raise ValueError("'channels' is not an object")
        channels: dict[str, ChannelState] = {}
        for name, channel_doc in channels_doc.items():
            if not isinstance(channel_doc, dict):
                raise ValueError(f"channel {name!r:.60} is not an object")
            _check_fields(channel_doc, _CHANNEL_FIELDS, f"channels.{name}.")
            channel = ChannelState(**channel_doc)
            channels[name] = channel._replace(failed_versions=tuple(channel.failed_versions))
        _check_fields(doc, _STATE_FIELDS, "")
        _check_fields(journal_doc, _JOURNAL_FIELDS, "journal.")
        journal = Journal(**journal_doc)
        state = cls(**{**doc, "channels": channels,
                       "journal": journal._replace(scope=tuple(journal.scope))})
        return state._replace(unrestored=tuple(state.unrestored))


def _journal_doc(journal: Journal) -> dict[str, Any]:
    """The journal as stored; an empty ``before`` is left out, so that an updater from
    before the field (a rolled-back self-update) still reads an idle state."""
    doc = journal._asdict()
    for key in ("before", "scope"):
        if not doc[key]:
            del doc[key]
    return doc


def _from_format_1(doc: dict[str, Any]) -> dict[str, Any]:
    """A state written before channels: its floors and versions belong to the channel its
    validators were fetched from (``version.json`` when it never fetched one)."""
    own = {key: doc.pop(key) for key in ("installed_version", "floor_version", "floor_issued",
                                         "failed_versions") if key in doc}
    url = doc.get("metadata_url")
    name = url.rsplit("/", 1)[-1] if isinstance(url, str) and url else DEFAULT_CHANNEL
    doc["channels"] = {name: own} if own else {}
    if isinstance(own.get("installed_version"), int) and own["installed_version"] > 0:
        doc["installed_channel"] = name
    if isinstance(doc.get("journal"), dict) and doc["journal"].get("phase", "idle") != "idle":
        doc["journal"]["channel"] = name
    return doc


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _optional_time(value: Any) -> bool:
    if value is None:
        return True
    try:
        parse_time(value)
    except (TypeError, FormatError):
        return False
    return True


def _counts(value: Any) -> bool:
    return isinstance(value, list) and all(_count(v) for v in value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _optional_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(_optional_str(v) for v in value.values())


_STATE_FIELDS: dict[str, Any] = {
    "installed_channel": _optional_str, "time_floor": _optional_time,
    "time_floor_keys": _optional_str, "etag": _optional_str,
    "last_modified": _optional_str, "metadata_url": _optional_str,
    "applied_packages": _string_map, "unrestored": _strings,
}
_CHANNEL_FIELDS: dict[str, Any] = {
    "installed_version": _count, "floor_version": _count, "floor_issued": _optional_time,
    "floor_keys": _optional_str, "failed_versions": _counts, "interrupted_version": _count,
    "interruptions": _count,
}
_JOURNAL_FIELDS: dict[str, Any] = {
    "phase": lambda v: v in PHASES, "target_version": _count, "previous_version": _count,
    "previous": _optional_string_map, "targets": _string_map, "workdir": _optional_str,
    "package_sha256": _optional_str, "channel": _optional_str, "before": _string_map,
    "scope": _strings,
}


def _check_fields(doc: dict[str, Any], checks: dict[str, Any], prefix: str) -> None:
    for key, value in doc.items():
        check = checks.get(key)
        if check is None:
            raise ValueError(f"unknown field '{prefix}{key}'")
        if not check(value):
            raise ValueError(f"field '{prefix}{key}' has a wrong value {value!r:.60}")


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
        self.sessions_dir = state_dir / SESSIONS_DIRNAME

    def ensure_dirs(self) -> None:
        """Create the state directories 0700, and refuse ones another local user could
        influence (owned by another account, group/world-writable, a symlink): such a user
        could hold the lock, or plant files root then trusts (:class:`ConfigError`, exit 2)."""
        for path in (self.dir, self.roots_dir, self.debs_dir, self.sessions_dir):
            why = unsafe_dir_reason(path)
            if why is not None:
                raise ConfigError(f"state directory {path} {why}; make it root's, mode 0700 "
                                  "(chown root:root, chmod 0700) or set 'state_dir'")
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.roots_dir.mkdir(mode=0o700, exist_ok=True)
            self.debs_dir.mkdir(mode=0o700, exist_ok=True)
            self.sessions_dir.mkdir(mode=0o700, exist_ok=True)
            self.dir.chmod(0o700)  # tighten one an older version made 0755
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc.strerror}") from None

    # --- state.json --------------------------------------------------------------------

    def load(self, *, repair: bool = True) -> State:
        """Read ``state.json``; a corrupt file is moved aside and a fresh state begins.

        Starting fresh costs a re-install of the current release and resets the rollback
        floors (the trusted roots in ``roots/`` are kept); refusing to run would instead leave
        the box stuck until someone logs in, which is worse for an unattended fleet.
        Without ``repair`` (readers that do not hold the lock, such as ``status``) a corrupt
        file is left alone and reported as a :class:`StateError`.
        """
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StateError(f"cannot read {self.state_path}: {exc.strerror}") from None
        try:
            return State.from_json(data)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            if not repair:
                raise StateError(f"{self.state_path} is corrupt ({exc}); the next run moves "
                                 "it aside and starts from a fresh state") from None
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
        """Bookkeeping must never fail a run: errors are logged only. Not fsynced: losing
        the last run's result to a power cut is harmless, and every daily no-op would pay
        for it (DESIGN 7)."""
        try:
            atomic_write(self.last_run_path, (json.dumps(info, indent=2, sort_keys=True)
                                              + "\n").encode(), durable=False)
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise StateError(f"cannot open lock {self.path}: {exc.strerror}") from None
        # A lock others can open (0644 from an older version) can be held by any user with a
        # read-only open, and every run would then exit 6.
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)
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
