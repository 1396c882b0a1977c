"""One run of the box updater: the steps of DESIGN 3.1, in order, top to bottom.

This module does the I/O around the verification core (``metadata``): it reads and writes
state, talks to the fetcher, extracts and applies. It raises typed errors and returns an
:class:`Outcome`; the CLI alone turns either into an exit code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from . import metadata, trust
from .config import Config
from .errors import (
    ApplyError,
    BadVersionError,
    ConfigError,
    DownloadError,
    DownloadHTTPError,
    FormatError,
    LengthOrHashMismatchError,
    LockError,
    MissingFileError,
    RepositoryError,
    StateError,
    UnsafePackageError,
    UpdaterError,
)
from .faults import fault_point
from .fsutil import unsafe_dir_reason, utcnow
from .metadata import Floors, Release, Root
from .sessions import SessionRecords, boot_id
from .source import Source
from .state import Journal, Lock, State, Store
from .transaction import Transaction
from .trust import TrustedSet

logger = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """How a run that raised nothing ended; ``result`` is the word ``status`` shows."""

    result: str  # updated, up-to-date, update-available, outside-rollout, skipped-failed,
    #              postponed, dry-run
    message: str
    version: int | None = None

    @property
    def update_available(self) -> bool:
        return self.result == "update-available"


def result_word(exc: BaseException) -> str:
    """The ``last_result`` word for a run that ended with ``exc``."""
    if isinstance(exc, RepositoryError):
        return "refused"
    if isinstance(exc, DownloadError):
        return "network-error"
    if isinstance(exc, ApplyError):
        return "apply-failed"
    if isinstance(exc, ConfigError):
        return "config-error"
    return "error"


def load_anchor(config: Config) -> tuple[Root, bytes]:
    """Read the pinned trust anchor; its structure is checked here, signatures on first use."""
    try:
        data = config.trust_root.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"trust anchor {config.trust_root} is missing: install the operator's root.json "
            "there (build the package with 'make deb TRUST_ROOT=...') or set 'trust_root' in "
            f"{config.path}") from None
    except OSError as exc:
        raise ConfigError(f"trust anchor {config.trust_root}: {exc.strerror}") from None
    try:
        return metadata.parse_root(data), data
    except RepositoryError as exc:
        raise ConfigError(f"trust anchor {config.trust_root} is invalid: {exc}") from None


class Updater:
    """Runs ``check`` and ``run`` against one configuration, reading the repository from
    ``server_url`` or, with ``from_dir``, from that directory (``--from``: no network at
    all, not even the status report)."""

    def __init__(self, config: Config, *, clock: Callable[[], datetime] = utcnow,
                 progress: bool | None = None, from_dir: Path | None = None) -> None:
        self.config = config
        self.from_dir = from_dir
        self.clock = clock
        self.progress = progress
        self.channel = config.version_file
        self.store = Store(config.state_dir)
        self.tx = Transaction(config, self.store)
        # The pinned anchor is read at the start of each run (after crash recovery, before
        # any request), so a missing or broken one is recorded in last_run like any error.
        self.anchor: Root
        self.anchor_bytes: bytes
        self._fetcher: Source | None = None
        self._stopped: list[str] = []  # what a killed run left running, stopped by this one

    # --- entry points ------------------------------------------------------------------

    def run(self, *, check_only: bool = False, force: bool = False, dry_run: bool = False,
            random_delay: float = 0) -> Outcome:
        """One whole run (DESIGN 3.1); records ``last_run`` and raises typed errors."""
        started = time.monotonic()
        self.store.ensure_dirs()
        why = unsafe_dir_reason(self.config.download_dir_path)
        if why is not None:  # another account could plant <sha>.part -> /etc/shadow there
            raise ConfigError(f"download directory {self.config.download_dir_path} {why}; make "
                              "it root's, mode 0700 (chown root:root, chmod 0700) or set "
                              "'download_dir_path'")
        lock = Lock(self.store.lock_path)
        lock.acquire()
        try:
            outcome = self._locked_run(check_only, force, dry_run, random_delay)
        except LockError:
            raise
        except UpdaterError as exc:
            self._record(result_word(exc), str(exc), started, failed=True)
            raise
        except Exception as exc:
            self._record("error", f"{type(exc).__name__}: {exc}", started, failed=True)
            raise
        finally:
            if self._fetcher is not None:
                self._fetcher.close()
            self._forget_sessions()
            lock.release()
        self._record(outcome.result, outcome.message, started,
                     release_version=outcome.version)
        return outcome

    def _record(self, result: str, message: str, started: float, *,
                release_version: int | None = None, failed: bool = False) -> None:
        """Bookkeeping for ``status`` and the optional report; never fails the run."""
        state = self._peek_state()
        info: dict[str, Any] = {
            "last_run": metadata.format_time(self.clock()),
            "last_result": result,
            "last_message": message,
            "duration": round(time.monotonic() - started, 3),
            "installed_version": state.installed_version,
        }
        if self._stopped:
            info["leftovers_killed"] = self._stopped
        self.store.save_last_run(info)
        if self.config.report_url and self.from_dir is not None:
            logger.info("no status report sent: a --from run makes no network request",
                        extra={"log_file_only": True})
        elif self.config.report_url:
            from . import __version__
            from .fetcher import post_report
            from .reporting import signed_report

            stored = self.store.stored_roots()
            # Signed documents hold no floats (DESIGN 2.1): the duration in milliseconds.
            fields = {**info, "duration_ms": round(info["duration"] * 1000)}
            del fields["duration"]
            fields.pop("leftovers_killed", None)  # the log and status have it; not the fleet
            report = {**fields, "box_id": self.config.box_id, "release_version": release_version,
                      "channel": self.channel, "installed_channel": state.installed_channel,
                      "failed_versions": list(state.channel(self.channel).failed_versions),
                      "root_version": max(stored) if stored else None,
                      "updater_version": __version__, "error": message if failed else None}
            floor = _time(state.time_floor)
            now = max(self.clock(), floor) if floor else self.clock()  # trusted_now
            try:
                envelope = signed_report(self.config.state_dir, report, self.config.box_id,
                                         now)
            except Exception as exc:  # a report never fails the run (ReportKeyError, disk)
                logger.warning("status report not sent: %s", exc)
                return
            post_report(self.config.report_url, envelope, self.config.timeouts,
                        ca_bundle=self.config.ca_bundle)

    def _peek_state(self) -> State:
        try:
            return self.store.load()
        except UpdaterError:
            return State()

    # --- the steps ---------------------------------------------------------------------

    def _locked_run(self, check_only: bool, force: bool, dry_run: bool,
                    random_delay: float) -> Outcome:
        # 0. A killed run's children still at work are stopped before anything else, above
        # all before its apply is finished or undone: never two actors on one box.
        state = self.store.load()
        self._stopped = self._stop_orphans(state.journal.phase)
        # A dead run's apply is finished or undone before any network request.
        if state.journal.phase in ("applying", "rolling-back"):
            state = self.tx.recover(state)
        elif state.journal.phase == "downloading":
            # It died before anything was applied: only its extraction is garbage (a partial
            # download is kept for resuming). Reset now, so the journal is idle even when the
            # server cannot be reached.
            logger.info("a previous run died while downloading release %d; nothing was "
                        "applied", state.journal.target_version)
            download_dir = self.config.download_dir_path
            if download_dir.is_dir():
                clean_downloads(download_dir, keep=state.journal.package_sha256 or "")
            state = self.tx.journal(state, Journal())
        self.anchor, self.anchor_bytes = load_anchor(self.config)
        # 1. Spread the fleet's requests.
        if random_delay > 0:
            delay = random.uniform(0, random_delay)
            logger.info("waiting %.0f s (--random-delay)", delay)
            time.sleep(delay)
        # 2.-4. Fetch and verify the metadata.
        state, release = self._refresh_metadata(state)
        # 5. Decide.
        decision = self._decide(state, release, force)
        if decision is not None or check_only:
            return decision or Outcome("update-available",
                                       f"release {release.version} is available "
                                       f"(installed {state.installed_for(self.channel)})",
                                       release.version)
        # 6.-8. Download, extract, apply.
        return self._update(state, release, dry_run)

    def _stop_orphans(self, phase: str) -> list[str]:
        """Stop what a killed run left running in the sessions it recorded (the records of
        :mod:`sessions`; records from an earlier boot are dropped: nothing of them survived
        the reboot), then forget every record. Returns ``pid (command)`` of each stopped.

        With the journal idle (``phase``) the killed run's transaction was over, committed
        or rolled back, when it died (in ``post-update.d``, or on the network after a
        recovery): what its children left running is what a finished apply leaves, like a
        service the new (or, after a rollback, the old) postinst started, and is accepted
        as :meth:`_forget_sessions` accepts it at the end of a run that was not killed."""
        records = SessionRecords(self.store.sessions_dir)
        if not records.names():  # the daily no-op: one listdir
            return []
        current = boot_id()
        sessions = records.load()
        same_boot = [(s.sid, s.start) for s in sessions if current and s.boot_id == current]
        if len(same_boot) < len(sessions):
            logger.info("dropped %d session record(s) of an earlier boot: nothing of them "
                        "survived the reboot", len(sessions) - len(same_boot))
        stopped: list[str] = []
        if same_boot and phase == "idle":
            logger.info("forgetting %d session record(s) of a run killed after its "
                        "transaction ended: what it left running stays", len(same_boot))
        elif same_boot:
            from .procs import stop_sessions

            stopped = stop_sessions(same_boot)
        if stopped:
            logger.warning("stopped %d process(es) a killed run had left running: %s",
                           len(stopped), ", ".join(stopped))
        records.clear()
        return stopped

    def _forget_sessions(self) -> None:
        """At the end of a run whose transaction is over (journal idle), forget the
        sessions of its children: what they left running after a successful apply is
        accepted like a service a postinst starts. With the journal not idle (the run
        failed mid-apply) the records stay, and the next run stops those leftovers before
        it recovers."""
        records = SessionRecords(self.store.sessions_dir)
        if records.names() and self._peek_state().journal.phase == "idle":
            records.clear()

    def _fetch(self) -> Source:
        """The repository's source: the fetcher (``server_url``), or the ``--from``
        directory. Either only delivers bytes; everything below verifies them alike."""
        if self._fetcher is None:
            if self.from_dir is not None:
                from .localsource import LocalSource

                self._fetcher = LocalSource(self.from_dir, progress=self.progress)
            else:
                from .fetcher import Fetcher

                self._fetcher = Fetcher(self.config.server_url, self.config.timeouts,
                                        ca_bundle=self.config.ca_bundle,
                                        progress=self.progress)
        return self._fetcher

    def _location(self, relpath: str) -> str:
        """Where ``relpath`` is read from, for messages and the validators' key."""
        if self.from_dir is not None:
            return os.path.join(self.from_dir, relpath)
        return self.config.url(relpath)

    def _trusted_set(self, state: State) -> tuple[TrustedSet, State]:
        """The trust core, loaded with what the box stored for its channel."""
        stored = self.store.stored_roots()
        anchor_version = self.anchor.version
        above = [v for v in stored if v > anchor_version]
        try:
            start = trust.starting_root(
                self.anchor_bytes, _read(stored.get(anchor_version)),
                _read(stored[max(above)]) if above else None)
        except RepositoryError as exc:
            raise ConfigError(f"trust anchor {self.config.trust_root} is invalid: "
                              f"{exc}") from None
        if start.store_anchor:
            # Roots stored from an older anchor's chain are superseded by this anchor, and so
            # is the release verified under them: no 304 may bring it back, in this run or,
            # should it stop before verifying anything, the next (then the new anchor is
            # stored and this branch is not taken again). So the validators go first.
            state = state._replace(etag=None, last_modified=None, metadata_url=None)
            self.store.save(state)
            for version, path in stored.items():
                if version >= anchor_version:
                    path.unlink()
            self.store.save_root(anchor_version, self.anchor_bytes)
        ch = state.channel(self.channel)
        return TrustedSet(start.root, channel=self.channel,
                          floors=Floors(ch.floor_version, _time(ch.floor_issued)),
                          floors_keys=ch.floor_keys, time_floor=_time(state.time_floor),
                          time_floor_keys=state.time_floor_keys,
                          installed_version=state.installed_for(self.channel)), state

    def _refresh_metadata(self, state: State) -> tuple[State, Release]:
        """Steps 2-4: conditional GET, root walk, verification; the trust core decides, this
        fetches and then persists only what it accepted."""
        trusted, state = self._trusted_set(state)
        clock = self.clock()
        if trusted.clock_behind(clock):
            logger.warning("system clock %s is behind the newest release seen (%s); using "
                           "that as the time", metadata.format_time(clock), state.time_floor)
        url = self._location(self.config.version_file)
        cached = self.store.load_release() if state.metadata_url == url else None
        use_validators = cached is not None
        response = self._fetch().fetch_metadata(
            self.config.version_file,
            etag=state.etag if use_validators else None,
            last_modified=state.last_modified if use_validators else None)
        if response.status == 304 and cached is not None:
            release = trusted.check_cached(cached, clock)
            logger.info("version file unchanged (304): release %d", release.version)
            return state, release
        if response.body is None:
            raise DownloadError(f"{url}: server answered 304 to an unconditional request")
        body = response.body
        try:
            to_fetch = trusted.roots_to_fetch(body)
        except FormatError as exc:  # say which document: "not valid JSON" alone is no help
            raise FormatError(f"{url}: {exc}") from None
        for version in to_fetch:
            trusted.update_root(self._fetch_root(version, to_fetch.stop - 1))
            logger.info("accepted root v%d", version)
        accepted = trusted.update_release(body, clock)
        if accepted.floors_reset:
            logger.warning("root v%d changed the release keys: release floor falls back to the "
                           "installed version %d and trusted time to the system clock",
                           accepted.root.version, trusted.installed_version)
        # Verified: now, and only now, remember roots, floors, time and validators.
        for version, data in accepted.new_roots:
            self.store.save_root(version, data)
        release = accepted.release
        ch = state.channel(self.channel)._replace(floor_version=accepted.floors.version,
                                                  floor_issued=release.issued_str,
                                                  floor_keys=accepted.keys_id)
        state = state.with_channel(self.channel, ch)._replace(
            time_floor=metadata.format_time(accepted.time_floor),
            time_floor_keys=accepted.keys_id, etag=response.etag,
            last_modified=response.last_modified, metadata_url=url)
        self.store.save_release(body)
        self.store.save(state)
        logger.info("verified release %d (root v%d, issued %s, expires %s)", release.version,
                    accepted.root.version, release.issued_str,
                    metadata.format_time(release.expires))
        return state, release

    def _fetch_root(self, version: int, target: int) -> bytes:
        path = f"root/{version}.root.json"
        try:
            response = self._fetch().fetch_metadata(path)
        except MissingFileError:
            raise BadVersionError(f"release names root v{target}, but {self.from_dir} has "
                                  f"no {path}") from None
        except DownloadHTTPError as exc:
            if exc.status_code == 404:
                raise BadVersionError(f"release names root v{target}, but the server has "
                                      f"no {path}") from None
            raise
        if response.body is None:
            raise DownloadError(f"{path}: unexpected 304")
        return response.body

    def _decide(self, state: State, release: Release, force: bool) -> Outcome | None:
        """Step 5; ``None`` means: update now."""
        version = release.version
        installed = state.installed_for(self.channel)
        if installed >= version:
            return Outcome("up-to-date", f"up to date (release {installed})", version)
        if version in state.channel(self.channel).failed_versions and not force:
            return Outcome("skipped-failed", f"release {version} failed before; skipped "
                           "(use 'run --force' to retry it)", version)
        if not metadata.in_rollout(self.config.box_id, version, release.rollout_percent):
            return Outcome("outside-rollout", f"release {version} is rolled out to "
                           f"{release.rollout_percent}% of boxes; not this one yet", version)
        if release.package.length > self.config.max_package_bytes:
            # Refused before downloading (check says the same), but not marked failed: the
            # limit is the box's own, and raising it must be enough to take the release.
            raise LengthOrHashMismatchError(
                f"release {version}'s package is {release.package.length} bytes, over "
                f"max_package_bytes ({self.config.max_package_bytes}); raise it in "
                f"{self.config.path} to take this release")
        return None

    # --- download, extract, apply --------------------------------------------------------

    def _update(self, state: State, release: Release, dry_run: bool) -> Outcome:
        ref = release.package
        download_dir = self.config.download_dir_path
        with local_storage(f"cannot use {download_dir} (download_dir_path)",
                           "fix it and run again"):
            download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # A dry run downloads into a scratch directory it removes: it changes nothing.
            dest = Path(tempfile.mkdtemp(prefix="dry-run-", dir=download_dir)) if dry_run \
                else download_dir
        if not dry_run:
            state = self.tx.journal(state, Journal(
                phase="downloading", target_version=release.version,
                previous_version=state.installed_for(self.channel),
                package_sha256=ref.sha256, channel=self.channel))
        fault_point("download")
        try:
            with local_storage(f"cannot download release {release.version} into "
                               f"{download_dir} (download_dir_path)",
                               "free some space there; the next run resumes the download"):
                zip_path = self._fetch().fetch_package(ref.path, dest, ref.sha256, ref.length)
            return self._unpack_and_apply(state, release, zip_path, dry_run)
        except UpdaterError:
            if not dry_run and self.store.load().journal.phase == "downloading":
                self.tx.journal(self.store.load(), Journal())
            raise
        finally:
            if dry_run:
                shutil.rmtree(dest, ignore_errors=True)

    def _unpack_and_apply(self, state: State, release: Release, zip_path: Path,
                          dry_run: bool) -> Outcome:
        from . import package
        from .installer import Installer, UpdatePlan

        ref = release.package
        download_dir = self.config.download_dir_path
        fault_point("extract")
        try:
            with local_storage(f"cannot extract release {release.version} into "
                               f"{download_dir} (download_dir_path)",
                               "free some space there; the next run extracts it again"):
                workdir = package.extract_package(
                    zip_path, download_dir, max_unpacked_bytes=self.config.max_unpacked_bytes)
            try:
                manifest = package.load_manifest(workdir, release.version)
                archs = package.dpkg_architectures(self.config.dpkg_root) if manifest.debs \
                    else frozenset()
                debs = package.inspect_debs(workdir, manifest, archs)
                package.prepare_scripts(workdir, manifest)
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
        except UnsafePackageError:
            if not dry_run:
                self.tx.mark_failed(self.store.load(), self.channel, release.version)
            raise
        plan = UpdatePlan(version=release.version,
                          previous_version=state.installed_for(self.channel),
                          workdir=workdir, manifest=manifest, debs=debs)
        installer = Installer(self.config, offline=self.from_dir is not None)
        if dry_run:
            lines = [f"would download {ref.path} ({ref.length} bytes)",
                     *package.describe(manifest, debs), *installer.describe(plan)]
            shutil.rmtree(workdir, ignore_errors=True)
            return Outcome("dry-run", "\n".join(lines), release.version)
        try:
            applied = self.tx.apply(state, self.channel, plan, installer, ref.sha256)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            clean_downloads(self.config.download_dir_path, keep=ref.sha256)
        return Outcome(applied.result, applied.message, release.version)


def clean_downloads(download_dir: Path, keep: str) -> None:
    """Remove packages and partial downloads other than the current release's, and the
    extraction directories of runs that died (under the lock none is in use)."""
    for path in download_dir.iterdir():
        if path.is_dir() and not path.is_symlink() and \
                path.name.startswith(("extract-", "dry-run-")):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if path.name.startswith(keep) or not path.is_file():
            continue
        if path.suffix in (".zip", ".part"):
            path.unlink(missing_ok=True)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def _time(value: str | None) -> datetime | None:
    return metadata.parse_time(value) if value else None


@contextlib.contextmanager
def local_storage(what: str, advice: str) -> Iterator[None]:
    """Turn an :class:`OSError` of the box's own files (disk full, read-only, I/O error)
    into a one-line :class:`StateError` (exit 1): a local fault, neither the server's (4)
    nor a refusal (3), so the release is not marked failed and what was downloaded stays."""
    try:
        yield
    except OSError as exc:
        raise StateError(f"{what}: {exc.strerror or exc}; {advice}") from None
