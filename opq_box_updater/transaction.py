"""One journaled apply: record, apply, commit or roll back, and recover after a power cut.

Before anything changes the run records the phase (``applying``, ``rolling-back``) with the
target version and the packages' previous versions in ``state.json`` (DESIGN 3.4). A run that
finds such a journal left by a dead run finishes or undoes that apply here, before any
network request. This module returns its own :class:`Applied` (and raises typed errors); the
updater turns it into an ``Outcome``, so it never imports ``updater`` back.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from .config import Config
from .errors import (
    ApplyError,
    DpkgBusyError,
    FormatError,
    PostponedError,
    SubprocessError,
    UnsafePackageError,
)
from .faults import fault_point
from .state import DEFAULT_CHANNEL, Journal, State, Store

if TYPE_CHECKING:  # imported lazily at run time: the no-op path never loads them
    from .installer import Installer, UpdatePlan

logger = logging.getLogger(__name__)

#: An apply interrupted this many times (power cuts, kills) counts as failed: a flaky-power
#: box retries a good release, but a release that reliably kills the box is given up on.
MAX_INTERRUPTIONS = 3


class Applied(NamedTuple):
    """How an apply that raised nothing ended: ``updated`` or ``postponed``."""

    result: str
    message: str


class Transaction:
    """Applies one update plan under the journal, against the box's state store."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    # --- bookkeeping -------------------------------------------------------------------

    def journal(self, state: State, journal: Journal) -> State:
        state = state._replace(journal=journal)
        self.store.save(state)
        return state

    def mark_failed(self, state: State, channel: str, version: int) -> State:
        """Remember ``version`` of ``channel`` as failed (retried only with ``--force`` or
        when a newer version appears); also ends any journal."""
        state = _with_failed(state, channel, version)._replace(journal=Journal())
        self.store.save(state)
        return state

    # --- apply, commit, roll back ------------------------------------------------------

    def apply(self, state: State, channel: str, plan: UpdatePlan, installer: Installer,
              package_sha256: str) -> Applied:
        """Apply ``plan`` (DESIGN 3.2); on failure roll back, mark the version failed and
        raise :class:`ApplyError`."""
        version = plan.version
        previous = installer.snapshot(plan)
        before = installer.snapshot_all()
        try:
            scope = installer.prepare_rollback(plan, before)  # can we go back? (else postpone)
            installer.pre_update(plan)
        except PostponedError as exc:
            self.journal(state, Journal())
            return Applied("postponed", f"release {version} postponed: {exc}")
        targets = plan.targets
        journal = Journal(phase="applying", target_version=version,
                          previous_version=plan.previous_version, previous=previous,
                          targets=targets, workdir=str(plan.workdir),
                          package_sha256=package_sha256, channel=channel, before=before,
                          scope=scope)
        state = self.journal(state, journal)
        fault_point("apply")
        try:
            installer.apply(plan)
        except DpkgBusyError as exc:  # raised before dpkg started: nothing to undo
            self.journal(state, Journal())
            return Applied("postponed", f"release {version} postponed: {exc}")
        except Exception as exc:  # anything failing once dpkg may have run is rolled back
            logger.warning("applying release %d failed: %s; rolling back", version, exc)
            self.roll_back(state, journal, plan, installer, str(exc), failed=True)
        fault_point("commit")
        self.commit(state, journal, plan, installer)
        logger.info("release %d installed", version)
        installer.post_update(plan)
        return Applied("updated", f"updated to release {version}")

    def commit(self, state: State, journal: Journal, plan: UpdatePlan,
               installer: Installer) -> State:
        """Record the journal's target as installed (after a run, or a recovery, that
        applied it) and keep its debs for rolling back the next update."""
        installer.cache_debs(plan)
        channel = journal.channel or DEFAULT_CHANNEL
        version = journal.target_version
        ch = state.channel(channel)
        ch = ch._replace(installed_version=version,
                         failed_versions=tuple(v for v in ch.failed_versions if v != version),
                         interrupted_version=0, interruptions=0)
        state = state.with_channel(channel, ch)._replace(
            installed_channel=channel,
            applied_packages=dict(journal.targets) or state.applied_packages,
            unrestored=(), journal=Journal())
        self.store.save(state)
        return state

    def roll_back(self, state: State, journal: Journal, plan: UpdatePlan,
                  installer: Installer, why: str, *, failed: bool) -> NoReturn:
        """Undo an apply and raise :class:`ApplyError`. A ``failed`` release (it failed by
        itself, or was interrupted too often) is marked failed before the rollback starts,
        so a power cut during the rollback cannot forget it."""
        channel = journal.channel or DEFAULT_CHANNEL
        version = journal.target_version
        if failed:
            state = _with_failed(state, channel, version)
        state = self.journal(state, journal._replace(phase="rolling-back"))
        fault_point("rollback")
        unrestored = tuple(installer.rollback(plan, journal.previous, journal.before,
                                              journal.scope or None))
        self.store.save(state._replace(unrestored=unrestored, journal=Journal()))
        if unrestored:
            logger.error("release %d: rollback incomplete, could not restore: %s", version,
                         ", ".join(unrestored))
            raise ApplyError(f"release {version} failed, rollback incomplete ({why}); could "
                             f"not restore: {', '.join(unrestored)}", unrestored)
        raise ApplyError(f"release {version} failed and was rolled back ({why})", unrestored)

    # --- crash recovery ----------------------------------------------------------------

    def recover(self, state: State) -> State:
        """Finish or undo the apply of a run that died (DESIGN 3.4), without the network:
        commit only an update that is fully installed and healthy, else roll back.

        Every recovery counts as one interruption of the journal's release, recorded before
        anything runs: a release whose apply (or recovery) kills the box every time is
        rolled back without another try at the :data:`MAX_INTERRUPTIONS`-th. An interrupted
        apply says nothing about the release, so below that it is retried; one that failed
        by itself (run script finished non-zero, health check of a complete install) is
        marked failed at once.
        """
        from .installer import FAILED, HEALTHY, Installer

        journal = state.journal
        channel = journal.channel or DEFAULT_CHANNEL
        version = journal.target_version
        ch = state.channel(channel)
        count = ch.interruptions + 1 if ch.interrupted_version == version else 1
        state = state.with_channel(channel, ch._replace(interrupted_version=version,
                                                        interruptions=count))
        self.store.save(state)
        logger.warning("a previous run died while %s release %d (interruption %d of %d); "
                       "recovering", journal.phase, version, count, MAX_INTERRUPTIONS)
        installer = Installer(self.config)
        plan, readable = self._recovery_plan(journal)
        try:
            if count >= MAX_INTERRUPTIONS:
                self.roll_back(state, journal, plan, installer,
                               f"interrupted {count} times, it now counts as failed; use "
                               "'run --force' to retry it", failed=True)
            verdict = installer.recover(plan, journal.previous) \
                if journal.phase == "applying" and readable else None
            if verdict == HEALTHY:
                state = self.commit(state, journal, plan, installer)
                logger.info("recovered: release %d is installed and healthy", version)
                installer.post_update(plan)
                return state
            if verdict == FAILED:
                self.roll_back(state, journal, plan, installer,
                               "its run script or health check failed after an interruption",
                               failed=True)
            self.roll_back(state, journal, plan, installer,
                           f"interrupted while {journal.phase}; it is retried on the next run "
                           f"(interruption {count} of {MAX_INTERRUPTIONS})", failed=False)
        finally:
            shutil.rmtree(plan.workdir, ignore_errors=True)

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


def _with_failed(state: State, channel: str, version: int) -> State:
    ch = state.channel(channel)
    return state.with_channel(channel, ch._replace(
        failed_versions=tuple(sorted({*ch.failed_versions, version}))))
