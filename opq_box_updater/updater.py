"""One run of the box updater: the steps of DESIGN 3.1, in order, top to bottom.

This module does the I/O around the verification core (``metadata``): it reads and writes
state, talks to the fetcher, extracts and applies. It raises typed errors and returns an
:class:`Outcome`; the CLI alone turns either into an exit code.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import metadata
from .config import Config
from .errors import (
    ApplyError,
    BadVersionError,
    ConfigError,
    DownloadError,
    DownloadHTTPError,
    DpkgBusyError,
    FormatError,
    LengthOrHashMismatchError,
    LockError,
    PostponedError,
    RepositoryError,
    StateError,
    SubprocessError,
    UnsafePackageError,
    UpdaterError,
)
from .faults import fault_point
from .fetcher import Fetcher
from .fsutil import utcnow
from .metadata import Floors, Release, Root
from .state import Journal, Lock, State, Store

if TYPE_CHECKING:  # imported lazily at run time: the no-op path never loads them
    from .installer import Installer, UpdatePlan

logger = logging.getLogger(__name__)

#: A system clock this far behind the newest release seen is worth a warning (no RTC).
CLOCK_SKEW_WARNING = timedelta(days=1)


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
    """Runs ``check`` and ``run`` against one configuration."""

    def __init__(self, config: Config, *, clock: Callable[[], datetime] = utcnow,
                 progress: bool | None = None) -> None:
        self.config = config
        self.clock = clock
        self.progress = progress
        self.store = Store(config.state_dir)
        # The pinned anchor is read at the start of each run (after crash recovery, before
        # any request), so a missing or broken one is recorded in last_run like any error.
        self.anchor: Root
        self.anchor_bytes: bytes
        self._fetcher: Fetcher | None = None

    # --- entry points ------------------------------------------------------------------

    def run(self, *, check_only: bool = False, force: bool = False, dry_run: bool = False,
            random_delay: float = 0) -> Outcome:
        """One whole run (DESIGN 3.1); records ``last_run`` and raises typed errors."""
        started = time.monotonic()
        self.store.ensure_dirs()
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
        self.store.save_last_run(info)
        if self.config.report_url:
            from . import __version__
            from .fetcher import post_report

            stored = self.store.stored_roots()
            report = {**info, "box_id": self.config.box_id, "release_version": release_version,
                      "failed_versions": list(state.failed_versions),
                      "root_version": max(stored) if stored else None,
                      "updater_version": __version__, "error": message if failed else None}
            post_report(self.config.report_url, report, self.config.timeouts,
                        ca_bundle=self.config.ca_bundle)

    def _peek_state(self) -> State:
        try:
            return self.store.load()
        except UpdaterError:
            return State()

    # --- the steps ---------------------------------------------------------------------

    def _locked_run(self, check_only: bool, force: bool, dry_run: bool,
                    random_delay: float) -> Outcome:
        state = self.store.load()
        # 0. A dead run's apply is finished or undone before any network request.
        if state.journal.phase in ("applying", "rolling-back"):
            state = self._recover(state)
        elif state.journal.phase == "downloading":
            # It died before anything was applied: only its extraction is garbage (a partial
            # download is kept for resuming). Reset now, so the journal is idle even when the
            # server cannot be reached.
            logger.info("a previous run died while downloading release %d; nothing was "
                        "applied", state.journal.target_version)
            if self.config.download_dir_path.is_dir():
                self._clean_downloads(keep=state.journal.package_sha256 or "")
            state = self._journal(state, Journal())
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
                                       f"(installed {state.installed_version})",
                                       release.version)
        # 6.-8. Download, extract, apply.
        return self._update(state, release, dry_run)

    def _fetch(self) -> Fetcher:
        if self._fetcher is None:
            self._fetcher = Fetcher(self.config.server_url, self.config.timeouts,
                                    ca_bundle=self.config.ca_bundle, progress=self.progress)
        return self._fetcher

    def _trusted_root(self) -> tuple[Root, int]:
        """The newest stored root (never below the anchor); the anchor is verified and stored
        on first use, so later no-op runs need no signature check."""
        stored = self.store.stored_roots()
        anchor_version = self.anchor.version
        anchor_copy = stored.get(anchor_version)
        if anchor_copy is None or anchor_copy.read_bytes() != self.anchor_bytes:
            try:
                metadata.verify_trust_anchor(self.anchor_bytes)
            except RepositoryError as exc:
                raise ConfigError(f"trust anchor {self.config.trust_root} is invalid: "
                                  f"{exc}") from None
            # Roots stored from an older anchor's chain are superseded by this anchor.
            for version, path in stored.items():
                if version >= anchor_version:
                    path.unlink()
            self.store.save_root(anchor_version, self.anchor_bytes)
            return self.anchor, anchor_version
        newest = max(v for v in stored if v >= anchor_version)
        if newest == anchor_version:
            return self.anchor, newest
        return metadata.parse_root(stored[newest].read_bytes()), newest

    def _now(self, state: State) -> datetime:
        clock = self.clock()
        floor = metadata.parse_time(state.time_floor) if state.time_floor else None
        if floor is not None and clock < floor - CLOCK_SKEW_WARNING:
            logger.warning("system clock %s is behind the newest release seen (%s); using "
                           "that as the time", metadata.format_time(clock), state.time_floor)
        return metadata.trusted_now(clock, floor)

    def _refresh_metadata(self, state: State) -> tuple[State, Release]:
        """Steps 2-4: conditional GET, root walk, verification; persists only verified data."""
        root, _ = self._trusted_root()
        now = self._now(state)
        url = self.config.url(self.config.version_file)
        cached = self.store.load_release() if state.metadata_url == url else None
        use_validators = cached is not None
        response = self._fetch().fetch_metadata(
            self.config.version_file,
            etag=state.etag if use_validators else None,
            last_modified=state.last_modified if use_validators else None)
        if response.status == 304 and cached is not None:
            # Verified when stored; only the clock can have made it unacceptable since.
            metadata.check_root_fresh(root, now)
            release = metadata.parse_release(metadata.parse_envelope(cached))
            if release.expires <= now:
                raise metadata_expired(release, now)
            logger.info("version file unchanged (304): release %d", release.version)
            return state, release
        if response.body is None:
            raise DownloadError(f"{url}: server answered 304 to an unconditional request")
        body = response.body
        try:
            named = metadata.parse_release(metadata.parse_envelope(body)).root_version
        except FormatError as exc:  # say which document: "not valid JSON" alone is no help
            raise FormatError(f"{url}: {exc}") from None
        new_roots: list[tuple[Root, bytes]] = []
        if named > root.version:
            new_roots = self._walk_roots(root, named)
        newest = new_roots[-1][0] if new_roots else root
        floors = Floors(state.floor_version,
                        metadata.parse_time(state.floor_issued) if state.floor_issued else None)
        if new_roots and metadata.release_keys_changed(root, newest):
            logger.warning("root v%d changed the release keys: release floor falls back to the "
                           "installed version %d and trusted time to the system clock",
                           newest.version, state.installed_version)
            floors = Floors(state.installed_version, None)
            state = state._replace(floor_version=state.installed_version, floor_issued=None,
                                   time_floor=None)
            now = self._now(state)
        # The newest trusted root, after any walk, must not have expired: checking before the
        # walk would leave a box whose stored root expired unable to reach the new one.
        metadata.check_root_fresh(newest, now)
        release = metadata.verify_release(newest, body, now, floors)
        # Verified: now, and only now, remember roots, floors, time and validators.
        for new_root, data in new_roots:
            self.store.save_root(new_root.version, data)
        time_floor = state.time_floor
        if time_floor is None or release.issued > metadata.parse_time(time_floor):
            time_floor = release.issued_str
        if release.version > state.floor_version or state.floor_issued is None or \
                release.issued > metadata.parse_time(state.floor_issued):
            state = state._replace(floor_version=release.version,
                                   floor_issued=release.issued_str)
        state = state._replace(time_floor=time_floor, etag=response.etag,
                               last_modified=response.last_modified, metadata_url=url)
        self.store.save_release(body)
        self.store.save(state)
        logger.info("verified release %d (root v%d, issued %s, expires %s)", release.version,
                    newest.version, release.issued_str, metadata.format_time(release.expires))
        return state, release

    def _walk_roots(self, root: Root, target: int) -> list[tuple[Root, bytes]]:
        """Verify roots N+1..target; nothing is stored until the release verifies too."""
        if target - root.version > metadata.MAX_ROOT_STEPS:
            raise BadVersionError(f"release names root v{target}, more than "
                                  f"{metadata.MAX_ROOT_STEPS} steps past v{root.version}")
        chain: list[tuple[Root, bytes]] = []
        current = root
        for version in range(root.version + 1, target + 1):
            path = f"root/{version}.root.json"
            try:
                response = self._fetch().fetch_metadata(path)
            except DownloadHTTPError as exc:
                if exc.status_code == 404:
                    raise BadVersionError(f"release names root v{target}, but the server has "
                                          f"no {path}") from None
                raise
            if response.body is None:
                raise DownloadError(f"{path}: unexpected 304")
            current = metadata.verify_next_root(current, response.body)
            logger.info("accepted root v%d", current.version)
            chain.append((current, response.body))
        return chain

    def _decide(self, state: State, release: Release, force: bool) -> Outcome | None:
        """Step 5; ``None`` means: update now."""
        version = release.version
        if state.installed_version >= version:
            return Outcome("up-to-date", f"up to date (release {state.installed_version})",
                           version)
        if version in state.failed_versions and not force:
            return Outcome("skipped-failed", f"release {version} failed before; skipped "
                           "(use 'run --force' to retry it)", version)
        if not metadata.in_rollout(self.config.box_id, version, release.rollout_percent):
            return Outcome("outside-rollout", f"release {version} is rolled out to "
                           f"{release.rollout_percent}% of boxes; not this one yet", version)
        return None

    # --- download, extract, apply --------------------------------------------------------

    def _update(self, state: State, release: Release, dry_run: bool) -> Outcome:
        ref = release.package
        if ref.length > self.config.max_package_bytes:
            if not dry_run:
                self._mark_failed(state, release.version)
            raise LengthOrHashMismatchError(
                f"release {release.version}'s package is {ref.length} bytes, over "
                f"max_package_bytes ({self.config.max_package_bytes})")
        download_dir = self.config.download_dir_path
        with local_storage(f"cannot use {download_dir} (download_dir_path)",
                           "fix it and run again"):
            download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # A dry run downloads into a scratch directory it removes: it changes nothing.
            dest = Path(tempfile.mkdtemp(prefix="dry-run-", dir=download_dir)) if dry_run \
                else download_dir
        if not dry_run:
            state = self._journal(state, Journal(phase="downloading",
                                                 target_version=release.version,
                                                 previous_version=state.installed_version,
                                                 package_sha256=ref.sha256))
        fault_point("download")
        try:
            with local_storage(f"cannot download release {release.version} into "
                               f"{download_dir} (download_dir_path)",
                               "free some space there; the next run resumes the download"):
                zip_path = self._fetch().fetch_package(ref.path, dest, ref.sha256, ref.length)
            return self._unpack_and_apply(state, release, zip_path, dry_run)
        except UpdaterError:
            if not dry_run and self.store.load().journal.phase == "downloading":
                self._journal(self.store.load(), Journal())
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
                self._mark_failed(self.store.load(), release.version)
            raise
        plan = UpdatePlan(version=release.version, previous_version=state.installed_version,
                          workdir=workdir, manifest=manifest, debs=debs)
        installer = Installer(self.config)
        if dry_run:
            lines = [f"would download {ref.path} ({ref.length} bytes)",
                     *package.describe(manifest, debs), *installer.describe(plan)]
            shutil.rmtree(workdir, ignore_errors=True)
            return Outcome("dry-run", "\n".join(lines), release.version)
        try:
            return self._apply(state, release, plan, installer)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._clean_downloads(keep=ref.sha256)

    def _apply(self, state: State, release: Release, plan: UpdatePlan,
               installer: Installer) -> Outcome:
        previous = installer.snapshot(plan)
        try:
            installer.pre_update(plan)
        except PostponedError as exc:
            self._journal(state, Journal())
            return Outcome("postponed", f"release {release.version} postponed: {exc}",
                           release.version)
        targets = {d.package: d.version for d in plan.debs}
        journal = Journal(phase="applying", target_version=release.version,
                          previous_version=state.installed_version, previous=previous,
                          targets=targets, workdir=str(plan.workdir),
                          package_sha256=release.package.sha256)
        state = self._journal(state, journal)
        fault_point("apply")
        try:
            installer.apply(plan)
        except DpkgBusyError as exc:  # raised before dpkg started: nothing to undo
            self._journal(state, Journal())
            return Outcome("postponed", f"release {release.version} postponed: {exc}",
                           release.version)
        except Exception as exc:  # anything failing once dpkg may have run is rolled back
            logger.warning("applying release %d failed: %s; rolling back", release.version,
                           exc)
            self._roll_back(state, journal, plan, installer, str(exc))
        fault_point("commit")
        self._commit(state, release.version, targets, plan, installer)
        logger.info("release %d installed", release.version)
        installer.post_update(plan)
        return Outcome("updated", f"updated to release {release.version}", release.version)

    def _commit(self, state: State, version: int, targets: dict[str, str], plan: UpdatePlan,
                installer: Installer) -> State:
        """Record ``version`` as installed (after a run, or a recovery, that applied it) and
        keep its debs for rolling back the next update."""
        installer.cache_debs(plan)
        failed = tuple(v for v in state.failed_versions if v != version)
        state = state._replace(installed_version=version,
                               applied_packages=targets or state.applied_packages,
                               failed_versions=failed, unrestored=(), journal=Journal())
        self.store.save(state)
        return state

    def _roll_back(self, state: State, journal: Journal, plan: UpdatePlan, installer: Installer,
                   why: str) -> None:
        """Undo a failed or interrupted apply, mark the version failed, raise ApplyError."""
        state = self._journal(state, journal._replace(phase="rolling-back"))
        fault_point("rollback")
        unrestored = tuple(installer.rollback(plan, journal.previous))
        failed = tuple(sorted({*state.failed_versions, journal.target_version}))
        self.store.save(state._replace(failed_versions=failed, unrestored=unrestored,
                                       journal=Journal()))
        tail = f"; could not restore: {', '.join(unrestored)}" if unrestored else ""
        raise ApplyError(f"release {journal.target_version} failed and was rolled back "
                         f"({why}){tail}", unrestored)

    def _recover(self, state: State) -> State:
        """Finish or undo the apply of a run that died (DESIGN 3.4), without the network."""
        from .installer import Installer

        journal = state.journal
        logger.warning("a previous run died while %s release %d; recovering",
                       journal.phase, journal.target_version)
        installer = Installer(self.config)
        plan, readable = self._recovery_plan(journal)
        if journal.phase == "applying" and readable and \
                installer.recover(plan, journal.previous):
            state = self._commit(state, journal.target_version, dict(journal.targets), plan,
                                 installer)
            logger.info("recovered: release %d is installed and healthy",
                        journal.target_version)
            installer.post_update(plan)
            shutil.rmtree(plan.workdir, ignore_errors=True)
            return state
        try:
            self._roll_back(state, journal, plan, installer,
                            f"interrupted while {journal.phase}")
        finally:
            shutil.rmtree(plan.workdir, ignore_errors=True)
        raise AssertionError("unreachable")  # _roll_back always raises

    def _recovery_plan(self, journal: Journal) -> tuple[UpdatePlan, bool]:
        """The interrupted update's plan, and whether its files could be read back whole.
        Only a readable plan may be committed: its run script and health check decide; an
        unreadable one (gone, or torn by the power cut) can only be rolled back."""
        from . import package
        from .installer import UpdatePlan

        workdir = Path(journal.workdir or "/nonexistent")
        manifest = package.Manifest(format=package.MANIFEST_FORMAT,
                                    version=journal.target_version, debs=(), run=None,
                                    healthcheck=None)
        debs: tuple[package.DebInfo, ...] = tuple(
            package.DebInfo("", name, version, "") for name, version in journal.targets.items())
        readable = False
        if workdir.is_dir():
            try:
                read_manifest = package.load_manifest(workdir, journal.target_version)
                archs = package.dpkg_architectures(self.config.dpkg_root)
                debs = package.inspect_debs(workdir, read_manifest, archs)
                manifest, readable = read_manifest, True
            except (UnsafePackageError, FormatError, SubprocessError, OSError) as exc:
                logger.warning("cannot re-read the interrupted update in %s: %s", workdir, exc)
        plan = UpdatePlan(version=journal.target_version,
                          previous_version=journal.previous_version, workdir=workdir,
                          manifest=manifest, debs=debs)
        return plan, readable

    # --- bookkeeping -------------------------------------------------------------------

    def _journal(self, state: State, journal: Journal) -> State:
        state = state._replace(journal=journal)
        self.store.save(state)
        return state

    def _mark_failed(self, state: State, version: int) -> None:
        failed = tuple(sorted({*state.failed_versions, version}))
        self.store.save(state._replace(failed_versions=failed, journal=Journal()))

    def _clean_downloads(self, keep: str) -> None:
        """Remove packages and partial downloads other than the current release's, and the
        extraction directories of runs that died (under the lock none is in use)."""
        for path in self.config.download_dir_path.iterdir():
            if path.is_dir() and not path.is_symlink() and \
                    path.name.startswith(("extract-", "dry-run-")):
                shutil.rmtree(path, ignore_errors=True)
                continue
            if path.name.startswith(keep) or not path.is_file():
                continue
            if path.suffix in (".zip", ".part"):
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def local_storage(what: str, advice: str) -> Iterator[None]:
    """Turn an :class:`OSError` of the box's own files (disk full, read-only, I/O error)
    into a one-line :class:`StateError` (exit 1): a local fault, neither the server's (4)
    nor a refusal (3), so the release is not marked failed and what was downloaded stays."""
    try:
        yield
    except OSError as exc:
        raise StateError(f"{what}: {exc.strerror or exc}; {advice}") from None


def metadata_expired(release: Release, now: datetime) -> RepositoryError:
    from .errors import ExpiredMetadataError

    return ExpiredMetadataError(
        f"release v{release.version} expired at {metadata.format_time(release.expires)} and "
        "the server still serves it (304): the operators must run opq-box-publish refresh")
