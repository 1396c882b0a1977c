"""Applying an update through dpkg (or apt) with the box's hooks, the guarded run script and
the health check; rollback; recovery after a crash (DESIGN 3.2 and 3.4).

What this module guarantees:

* Every command goes through :func:`opq_box_updater.runner.run`, with ``/usr/sbin`` and
  ``/sbin`` on PATH and ``OPQ_UPDATE_VERSION``, ``OPQ_PREVIOUS_VERSION``, ``OPQ_UPDATE_DIR``
  and ``DPKG_ROOT`` (dpkg's convention: empty for ``/``) in the environment.
* When ``config.dpkg_root`` is not ``/``, every dpkg and dpkg-query call is confined to it
  (``--root=R --force-script-chrootless --log=R/var/log/dpkg.log``; apt gets an
  ``APT_CONFIG`` pointing into R): the host's package database is never touched.
* dpkg is only started while this process holds dpkg's frontend lock (waited for, within
  ``lock_timeout``), the protocol apt uses (``DPKG_FRONTEND_LOCKED``).
* What to run (command lines, environments) and how to read dpkg's answers is planned in
  :mod:`opq_box_updater.applyplan`, without running anything; this module runs it.
* :meth:`Installer.apply` raises :class:`ApplyError` for any failure from the dpkg call on and
  never rolls back itself; :meth:`Installer.rollback` never raises for a failed restore: it
  verifies the result with dpkg-query and returns what it could not restore.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .applyplan import (
    APT_ARCHIVES,
    APT_CONFIG_FILE,
    CACHE_DIR,
    CONFFILE_OPTIONS,
    RUN_STATUS_FILE,
    Commands,
    RollbackSteps,
    UpdatePlan,
    cache_name,
    decode_states,
    encode_states,
    error_summary,
    exit_text,
    installed_version,
    label,
    rollback_steps,
    script_failure,
)
from .config import Config
from .errors import ApplyError, DpkgBusyError, PostponedError, SubprocessError, UpdaterError
from .faults import fault_point
from .guard import _QUERY_FORMAT as QUERY_FORMAT
from .guard import (
    PackageState,
    RunStatus,
    not_installed,
    parse_query,
    query_packages,
    read_status,
    root_options,
    run_recorded,
)
from .procs import stop_leftovers
from .rollbackcache import RollbackCache
from .runner import Result, record_sessions, run, tail
from .sessions import SESSIONS_DIRNAME, SessionRecords

__all__ = ["APT_CONFIG_FILE", "RUN_STATUS_FILE", "Installer", "UpdatePlan", "cache_name",
           "dpkg_locks"]

logger = logging.getLogger(__name__)



def _lock_holder(path: Path) -> int | None:
    """The pid holding a POSIX lock on ``path``, from /proc/locks (None when unknown)."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: POSIX  ADVISORY  WRITE 7603 08:01:1234 0 EOF"; a waiter has "->" after "1:".
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(f":{inode}") and fields[4].isdigit():
            return int(fields[4])
    return None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


@contextmanager
def dpkg_locks(root: Path, timeout: float, poll: float = 0.5,
               hold_frontend: bool = True) -> Iterator[None]:
    """Wait, at most ``timeout`` seconds, until dpkg's frontend lock and database lock in
    ``root`` are free; with ``hold_frontend`` keep the frontend lock until the block ends
    (the caller then sets ``DPKG_FRONTEND_LOCKED=1`` for dpkg). Raises :class:`ApplyError`
    naming the holder when the time is up."""
    admindir = root / "var/lib/dpkg"
    if not admindir.is_dir():
        raise ApplyError(f"there is no dpkg database in {admindir}")
    deadline = time.monotonic() + timeout
    fds: list[int] = []
    try:
        for name in ("lock-frontend", "lock"):
            path = admindir / name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            fds.append(fd)
            waited = False
            while not _try_lock(fd):
                holder = _lock_holder(path)
                if time.monotonic() >= deadline:
                    raise DpkgBusyError(
                        f"dpkg is busy: {path} is held by "
                        f"{f'pid {holder}' if holder else 'another process'} for more than "
                        f"{timeout:.0f}s (apt or another dpkg is running); try again later")
                if not waited:
                    logger.info("waiting up to %.0fs for %s (held by pid %s)", timeout, path,
                                holder or "?")
                    waited = True
                time.sleep(poll)
            if name == "lock" or not hold_frontend:
                # dpkg takes the database lock itself; we only waited for it to be free.
                fcntl.lockf(fd, fcntl.LOCK_UN)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing drops the lock


#: Verdicts of :meth:`Installer.recover`.
HEALTHY, INTERRUPTED, FAILED = "healthy", "interrupted", "failed"


class Installer:
    """Applies, rolls back and recovers updates on the box described by ``config``."""

    def __init__(self, config: Config, *, lock_timeout: float | None = None,
                 lock_poll: float = 0.5, timeout: float = 3600.0,
                 script_timeout: float = 1800.0, offline: bool = False) -> None:
        """``offline``: a ``run --from`` run, in which apt downloads nothing."""
        self.config = config
        self.root = config.dpkg_root
        self.lock_timeout = config.timeouts.dpkg_lock if lock_timeout is None else lock_timeout
        self.lock_poll = lock_poll
        self.timeout = timeout  # one dpkg/apt call
        self.script_timeout = script_timeout  # the run script, health check, each hook dir
        self.commands = Commands(config, lock_timeout=self.lock_timeout,
                                 script_timeout=script_timeout, offline=offline)
        self.cache = RollbackCache(config, self.commands, timeout=timeout)
        # Every child from here on is recorded before it runs: if this process is killed,
        # the next run stops what it left before recovering (procs.stop_sessions).
        record_sessions(SessionRecords(config.state_dir / SESSIONS_DIRNAME))

    # --- the public steps, in the order the orchestrator calls them -----------------------

    def describe(self, plan: UpdatePlan) -> list[str]:
        """The commands :meth:`pre_update`, :meth:`apply` and :meth:`post_update` would run,
        in order, one shell line each (comments for skipped hooks); runs nothing."""
        return self.commands.describe(plan)

    def snapshot(self, plan: UpdatePlan) -> dict[str, str | None]:
        """The installed version of each package of the update, None when it is not installed
        (a package with only its conffiles left counts as not installed)."""
        states = query_packages(self.root, plan.targets)
        return {name: installed_version(states.get(name)) for name in plan.targets}

    def snapshot_all(self) -> dict[str, str]:
        """Every package dpkg knows with its state and version (``encode_states``): what a
        rollback restores, beyond the update's own packages (packages its ``Conflicts``
        removed, what apt added, packages that had only their conffiles)."""
        return encode_states(self._query_all())

    def prepare_rollback(self, plan: UpdatePlan, before: Mapping[str, str]) -> tuple[str, ...]:
        """Postpone (:class:`PostponedError`) unless a rollback could be done
        (:meth:`RollbackCache.prepare`)."""
        return self.cache.prepare(plan, before)

    def pre_update(self, plan: UpdatePlan) -> None:
        """Run ``pre-update.d``; a non-zero exit raises :class:`PostponedError` (nothing was
        changed; the update is retried next run). So does a hook directory or hook that is
        not root's (:meth:`Commands.hook_problem`): no hook runs then."""
        why = self.commands.unsafe_hooks()
        if why is not None:
            raise PostponedError(f"not running hooks another user could change: {why} "
                                 "(hooks run as root: chown them to root, chmod go-w)")
        cmd = self.commands.hook("pre-update.d")
        if cmd is None:
            return
        try:
            run(cmd, env=self.commands.env(plan), timeout=self.script_timeout)
        except SubprocessError as exc:
            raise PostponedError(f"a pre-update.d hook vetoed release {plan.version}: "
                                 f"{_last_line(exc)}") from None

    def apply(self, plan: UpdatePlan) -> None:
        """Install the debs with one dpkg (or apt) call carrying the hooks and the guarded run
        script (or run the script directly when there are no debs), then run the health
        check and ``health.d``. On return every package of the update is installed and
        configured at its new version and the run script exited 0; anything else raises
        :class:`ApplyError` and leaves the rollback to the caller."""
        plan.status_file.unlink(missing_ok=True)  # a stale status must not vouch for this run
        fault_point("before-dpkg")
        try:
            if plan.debs:
                self._install(plan)
            elif plan.run_script:
                status = self._run_script(plan)
                if not status.succeeded:
                    raise ApplyError(script_failure(plan, status))
            fault_point("after-dpkg")
            fault_point("before-health")
            self._health(plan)
        except (SubprocessError, OSError) as exc:  # a timeout, a full disk: still an apply error
            raise ApplyError(str(exc)) from None

    def rollback(self, plan: UpdatePlan, previous: Mapping[str, str | None],
                 before: Mapping[str, str] | None = None,
                 scope: Iterable[str] | None = None) -> tuple[str, ...]:
        """Return the packages of ``scope`` (what :meth:`prepare_rollback` said the update may
        change; all of them when None) to ``before``, the installed set :meth:`snapshot_all`
        recorded (see :func:`~opq_box_updater.applyplan.rollback_steps`): purge what is new, return
        packages that had only conffiles to ``config-files`` (``dpkg --remove``), reinstall
        the previous version of what changed or was removed, from ``<state_dir>/debs/`` or
        apt's archive cache. Without ``before`` (an older journal) only ``previous``
        (package -> version, None: not installed) is restored. The box's pre-/post-invoke
        hooks run; the run script does not. First, what the update's steps left running
        (:func:`~opq_box_updater.procs.stop_leftovers`) is stopped. Returns a label for
        each package dpkg-query does not show restored afterwards (each is logged by name);
        never raises for a failed restore."""
        # Only ``previous``, ``before`` and the plan's version numbers matter: after a crash
        # the plan may be rebuilt from the journal without its files.
        stop_leftovers()  # nothing the failed release started keeps running on the old one
        env = self.commands.env(plan)
        baseline = decode_states(before) if before else None
        scope = tuple(scope) if scope is not None else None
        try:
            steps = self._steps(previous, baseline, scope)
            self._restore(steps, env, with_hooks=True)
            steps = self._steps(previous, baseline, scope)
            if steps.labels() and self.commands.has_invoke_hooks():
                # The box's own hooks must not keep it half-updated: try once without them.
                logger.warning("rollback incomplete with the pre-/post-invoke hooks; "
                               "retrying without them")
                self._restore(steps, env, with_hooks=False)
                steps = self._steps(previous, baseline, scope)
            unrestored = steps.labels()
        except DpkgBusyError:
            raise  # the journal stays "rolling-back": the next run finishes the rollback
        except UpdaterError as exc:  # dpkg-query failed: nothing can be verified
            logger.error("rollback failed: %s", exc)
            unrestored = tuple(label(n, v) for n, v in sorted(previous.items()))
        for name in unrestored:
            logger.error("rollback: could not restore %s", name)
        return unrestored

    def cache_debs(self, plan: UpdatePlan) -> None:
        """Keep the applied debs for rolling back the next update (:meth:`RollbackCache.keep`)."""
        self.cache.keep(plan)

    def post_update(self, plan: UpdatePlan) -> None:
        """Run every ``post-update.d`` hook; a failure is logged and changes nothing."""
        cmd = self.commands.hook("post-update.d", exit_on_error=False)
        if cmd is None:
            return
        try:
            run(cmd, env=self.commands.env(plan), timeout=self.script_timeout)
        except SubprocessError as exc:
            logger.error("a post-update.d hook failed (ignored): %s", _last_line(exc))

    def recover(self, plan: UpdatePlan, previous: Mapping[str, str | None]) -> str:
        """Finish an apply a dead run left behind (DESIGN 3.4): ``dpkg --configure -a``, then
        :data:`HEALTHY` only when every package of the update is installed and configured at
        its new version, ``dpkg --audit`` is silent, the run script has completed with status
        0 (it is run now if it never started) and the health check passes.

        Otherwise the caller rolls back, and the verdict says why: :data:`FAILED` when the
        release failed by itself (the run script finished non-zero, or the health check of a
        fully installed update failed), :data:`INTERRUPTED` when the cut left the update
        unfinished (packages not configured, a run script cut off midway): that says nothing
        about the release, which is retried."""
        del previous  # what to roll back to is the caller's business
        try:
            if plan.debs:
                env = self.commands.env(plan)
                configure = [*self.commands.dpkg(), *CONFFILE_OPTIONS,
                             *self.commands.invoke_options(None), "--configure", "-a"]
                result = self._run_dpkg(configure, env)
                if result.returncode != 0:
                    logger.warning("dpkg --configure -a failed: %s", tail(result.output, 3))
                problems = not_installed(plan.targets, query_packages(self.root, plan.targets))
                if problems:
                    logger.warning("recovery: %s", "; ".join(problems))
                    return INTERRUPTED
                audit = run([*self.commands.dpkg(), "--audit"], env=env, check=False)
                if audit.output.strip():
                    logger.warning("recovery: dpkg --audit reports:\n%s", tail(audit.output))
                    return INTERRUPTED
            if plan.run_script:
                status = read_status(plan.status_file)
                if status is None or status.state == "skipped":
                    logger.info("recovery: the run script never ran; running it now")
                    status = self._run_script(plan)
                if not status.succeeded:
                    logger.warning("recovery: %s", script_failure(plan, status))
                    return FAILED if status.state == "finished" else INTERRUPTED
        except DpkgBusyError:
            raise  # neither committed nor rolled back: the next run recovers
        except UpdaterError as exc:
            logger.warning("recovery of release %d failed: %s", plan.version, exc)
            return INTERRUPTED
        try:
            self._health(plan)
        except UpdaterError as exc:
            logger.warning("recovery of release %d: %s", plan.version, exc)
            return FAILED
        return HEALTHY

    # --- running -------------------------------------------------------------------------

    def _run_dpkg(self, cmd: list[str], env: dict[str, str]) -> Result:
        """Run a dpkg command while holding the frontend lock; returns its runner.Result."""
        with dpkg_locks(self.root, self.lock_timeout, self.lock_poll):
            return run(cmd, env={**env, "DPKG_FRONTEND_LOCKED": "1"}, timeout=self.timeout,
                       check=False)

    def _run_script(self, plan: UpdatePlan) -> RunStatus:
        """Run the run script outside dpkg (no debs; recovery), recording its status."""
        assert plan.run_script is not None
        return run_recorded(plan.run_script, workdir=plan.workdir, dpkg_root=self.root,
                            status_file=plan.status_file, timeout=self.script_timeout,
                            extra_env=self.commands.opq_env(plan))

    def _install(self, plan: UpdatePlan) -> None:
        cmd, extra = self.commands.install_command(plan)
        env = self.commands.env(plan, extra)
        if self.config.installer == "apt":
            self.cache.write_apt_files(plan)
            # apt takes the frontend lock itself (and waits, DPkg::Lock::Timeout); waiting
            # here first gives the same clear error as the dpkg path.
            with dpkg_locks(self.root, self.lock_timeout, self.lock_poll, hold_frontend=False):
                pass
            result = run(cmd, env=env, timeout=self.timeout, check=False)
        else:
            result = self._run_dpkg(cmd, env)
        tool = cmd[0]
        status = read_status(plan.status_file) if plan.run_script else None
        if status is not None and status.state == "finished" and not status.succeeded:
            raise ApplyError(script_failure(plan, status))
        if result.returncode != 0:
            raise ApplyError(f"{tool} failed ({exit_text(result.returncode)}): "
                             f"{error_summary(result.output, tool)}")
        if plan.run_script and (status is None or not status.succeeded):
            raise ApplyError(script_failure(plan, status))
        problems = not_installed(plan.targets, query_packages(self.root, plan.targets))
        if problems:
            raise ApplyError(f"{tool} succeeded but " + "; ".join(problems))

    def _health(self, plan: UpdatePlan) -> None:
        """Run the package's health check, then ``health.d``; :class:`ApplyError` if either
        fails."""
        env = self.commands.env(plan)
        if plan.manifest.healthcheck:
            script = plan.workdir / plan.manifest.healthcheck
            try:
                run([script], env=env, cwd=plan.workdir, timeout=self.script_timeout)
            except SubprocessError as exc:
                raise ApplyError(f"health check {plan.manifest.healthcheck} failed: "
                                 f"{_last_line(exc)}") from None
        cmd = self.commands.hook("health.d")
        if cmd is not None:
            try:
                run(cmd, env=env, timeout=self.script_timeout)
            except SubprocessError as exc:
                raise ApplyError(f"a health.d hook failed: {_last_line(exc)}") from None

    # --- rollback ------------------------------------------------------------------------

    def _query_all(self) -> dict[str, PackageState]:
        """dpkg's record of every package it knows in the root."""
        cmd = ["dpkg-query", *root_options(self.root), "--showformat", QUERY_FORMAT, "--show"]
        return parse_query(run(cmd, timeout=120).output)

    def _steps(self, previous: Mapping[str, str | None],
               baseline: Mapping[str, PackageState] | None,
               scope: Iterable[str] | None) -> RollbackSteps:
        now = self._query_all() if baseline is not None else query_packages(self.root, previous)
        return rollback_steps(previous, baseline, now, scope)

    def _restore(self, steps: RollbackSteps, env: dict[str, str], *,
                 with_hooks: bool) -> None:
        """One rollback pass: purge what was new, remove back to ``config-files`` what had
        only its conffiles, then reinstall previous versions (a ``Multi-Arch: same``
        package's of the architecture its key names)."""
        purge = list(steps.purge)
        hooks = self.commands.invoke_options(None) if with_hooks else []
        # Purge first: a new package may conflict with or break an old version. The set we
        # return to was consistent before the update, so dependencies broken on the way
        # are forced; reinstreq lets dpkg remove a package killed in its preinst.
        if purge:
            result = self._run_dpkg([*self.commands.dpkg(), *hooks, "--force-depends",
                                     "--force-remove-reinstreq", "--purge", *purge], env)
            _log_failure("dpkg --purge", result)
        if steps.remove:  # never --purge: the admin's conffiles are what was there
            result = self._run_dpkg([*self.commands.dpkg(), *hooks, "--force-depends",
                                     "--force-remove-reinstreq", "--remove",
                                     *steps.remove], env)
            _log_failure("dpkg --remove", result)
        fault_point("rollback-after-purge")
        debs = []
        for name, version in steps.reinstall:
            deb = self.cache.find(name, version)
            if deb is None:
                logger.error("rollback: no %s %s deb in %s or %s", name, version,
                             self.config.state_dir / CACHE_DIR, self.root / APT_ARCHIVES)
            else:
                debs.append(str(deb))
        if debs:
            result = self._run_dpkg([*self.commands.dpkg(), *hooks, "--force-depends",
                                     *CONFFILE_OPTIONS, "-i", *debs], env)
            _log_failure("dpkg -i", result)

# --- small helpers ----------------------------------------------------------------------


def _last_line(exc: SubprocessError) -> str:
    last = tail(exc.output_tail, 1)
    return f"{exc} ({last})" if last else str(exc)


def _log_failure(what: str, result: Result) -> None:
    if result.returncode:
        logger.warning("rollback: %s failed (%s):\n%s", what,
                       exit_text(result.returncode), tail(result.output))
