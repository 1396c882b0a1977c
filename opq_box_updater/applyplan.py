"""What applying an update will run, decided without running anything (DESIGN 3.2).

The seam of the apply path: this module plans — the :class:`UpdatePlan`, the exact dpkg or
apt-get command line with its hooks and the guarded run script, the environment every script
gets, the ``run --dry-run`` description — and reads dpkg's answers with pure functions (which
package is installed at which version, what an error says, which dependencies are missing).
:mod:`opq_box_updater.installer` runs these commands, holds dpkg's locks, rolls back and
recovers. Nothing here starts a process or writes a file, so all of it is tested on strings.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .fsutil import unsafe_dir_reason, unsafe_file_reason
from .guard import (
    PackageState,
    RunStatus,
    base_name,
    dpkg_root_env,
    not_installed,
    package_key,
    root_options,
)
from .package import (
    APT_CONFIG_FILE,
    NO_SOURCES_DIR,
    NO_SOURCES_LIST,
    RUN_STATUS_FILE,
    DebInfo,
    Manifest,
)
from .runner import child_env, tail
from .sessions import SESSIONS_DIRNAME, SESSIONS_ENV

logger = logging.getLogger(__name__)

CACHE_DIR = "debs"
HOOK_DIRS = ("pre-update.d", "pre-invoke.d", "post-invoke.d", "health.d", "post-update.d")
#: The names run-parts runs (Debian's default, no --lsbsysinit); others it ignores.
_RUN_PARTS_NAME = re.compile(r"[A-Za-z0-9_-]+")
APT_ARCHIVES = Path("var/cache/apt/archives")
# An unattended run has no terminal: keep the admin's conffiles instead of failing at the
# prompt (what unattended-upgrades does too).
CONFFILE_OPTIONS = ("--force-confdef", "--force-confold")


@dataclass(frozen=True)
class UpdatePlan:
    """One verified, extracted update, ready to apply."""

    version: int  # release version being applied
    previous_version: int  # installed release version (0 before the first update)
    workdir: Path  # extraction dir; scripts already chmod 0700 by package.prepare_scripts
    manifest: Manifest
    debs: tuple[DebInfo, ...]  # in manifest order, already inspected

    @property
    def targets(self) -> dict[str, str]:
        """Package key (:func:`~opq_box_updater.guard.package_key`: ``name``, or
        ``name:arch`` for ``Multi-Arch: same``) -> the version this update installs."""
        return {package_key(deb.package, deb.architecture, deb.multi_arch): deb.version
                for deb in self.debs}

    @property
    def run_script(self) -> Path | None:
        return self.workdir / self.manifest.run if self.manifest.run else None

    @property
    def status_file(self) -> Path:
        return self.workdir / RUN_STATUS_FILE


def cache_name(package: str, version: str, architecture: str) -> str:
    """File name of a cached deb, as apt names its archives (an epoch's ``:`` as ``%3a``)."""
    return f"{package}_{version.replace(':', '%3a')}_{architecture}.deb"


class Commands:
    """The command lines and environments of one box (``config``); builds, never runs."""

    def __init__(self, config: Config, *, lock_timeout: float, script_timeout: float,
                 offline: bool = False) -> None:
        self.config = config
        self.root = config.dpkg_root
        self.lock_timeout = lock_timeout
        self.script_timeout = script_timeout
        # run --from: apt sees no sources (empty files in the workdir instead of the box's),
        # so it installs from the release's debs and what is installed, and fetches nothing
        self.offline = offline

    @staticmethod
    def no_sources(plan: UpdatePlan) -> tuple[Path, Path]:
        """The empty sources list and sources directory apt reads in an offline run."""
        return plan.workdir / NO_SOURCES_LIST, plan.workdir / NO_SOURCES_DIR

    def dpkg(self) -> list[str]:
        """dpkg, confined to ``dpkg_root`` when that is not ``/``."""
        if self.root == Path("/"):
            return ["dpkg"]
        # As non-root (a developer's sandbox, the demo) dpkg may not chown: let it try anyway.
        not_root = ["--force-not-root"] if os.geteuid() != 0 else []
        return ["dpkg", *root_options(self.root), "--force-script-chrootless",
                f"--log={self.root / 'var/log/dpkg.log'}", *not_root]

    def hook(self, name: str, *, exit_on_error: bool = True) -> list[str] | None:
        """``run-parts`` for one hook directory, None when it does not exist (= empty) or
        is not root's (:meth:`unsafe_hooks`; logged, never run)."""
        directory = self.config.hooks_dir / name
        if not directory.is_dir():
            return None
        why = self.hook_problem(name)
        if why is not None:
            logger.error("not running the hooks in %s: %s", directory, why)
            return None
        return ["run-parts", *(["--exit-on-error"] if exit_on_error else []), str(directory)]

    def hook_problem(self, name: str) -> str | None:
        """Why the hook directory ``name`` could run code that is not root's, or None: the
        directory (and every directory above it) must be root's and writable by nobody
        else, and so must each file run-parts would run (lstat; a symlink only to such a
        file inside ``hooks_dir``). A hook another user may change runs as root."""
        directory = self.config.hooks_dir / name
        existing = directory  # a missing one counts as empty; nobody else may create it
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        why = unsafe_dir_reason(existing)
        if why is not None:
            return f"{existing} {why}"
        if existing != directory:
            return None
        for entry in sorted(os.listdir(directory)):
            path = directory / entry
            if not _RUN_PARTS_NAME.fullmatch(entry) or (path.is_dir() and not path.is_symlink()):
                continue  # run-parts ignores it
            why = unsafe_file_reason(path, self.config.hooks_dir)
            if why is not None:
                return f"hook {path} {why}"
        return None

    def unsafe_hooks(self) -> str | None:
        """The first reason any hook directory is not root's (see :meth:`hook_problem`)."""
        for name in HOOK_DIRS:
            why = self.hook_problem(name)
            if why is not None:
                return why
        return None

    def has_invoke_hooks(self) -> bool:
        return any(self.hook(n) for n in ("pre-invoke.d", "post-invoke.d"))

    def describe(self, plan: UpdatePlan) -> list[str]:
        """The commands the installer's ``pre_update``, ``apply`` and ``post_update`` would
        run, in order, one shell line each (comments for skipped hooks)."""
        lines = [self._describe_hook("pre-update.d")]
        if plan.debs:
            cmd, extra = self.install_command(plan)
            prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in extra.items())
            lines.append(prefix + shlex.join(cmd))
        elif plan.run_script:
            lines.append(f"cd {shlex.quote(str(plan.workdir))} && "
                         f"{shlex.quote(str(plan.run_script))}")
        if plan.manifest.healthcheck:
            lines.append(f"cd {shlex.quote(str(plan.workdir))} && "
                         f"{shlex.quote(str(plan.workdir / plan.manifest.healthcheck))}")
        lines.append(self._describe_hook("health.d"))
        lines.append(self._describe_hook("post-update.d", exit_on_error=False)
                     + "  # only after success")
        return lines

    def _describe_hook(self, name: str, *, exit_on_error: bool = True) -> str:
        cmd = self.hook(name, exit_on_error=exit_on_error)
        return shlex.join(cmd) if cmd else f"# {self.config.hooks_dir / name} is missing: skipped"

    def guard_command(self, plan: UpdatePlan) -> str:
        """The shell line dpkg runs as ``--post-invoke`` for the run script."""
        assert plan.run_script is not None
        expect = [arg for name, version in plan.targets.items()
                  for arg in ("--expect", f"{name}={version}")]
        # -I: isolated (no PYTHON* variables, no user site, never import from dpkg's cwd);
        # the module path is a contract (see guard.py).
        return shlex.join([sys.executable, "-I", "-m", "opq_box_updater.guard",
                           "--dpkg-root", str(self.root), "--status-file", str(plan.status_file),
                           "--workdir", str(plan.workdir), *expect,
                           "--timeout", str(self.script_timeout), "--", str(plan.run_script)])

    def invoke_hooks(self, plan: UpdatePlan | None) -> tuple[list[str], list[str]]:
        """Shell lines for dpkg's pre- and post-invoke hooks; ``plan`` None (rollback,
        recovery) leaves out the run script."""
        pre = self.hook("pre-invoke.d")
        post = self.hook("post-invoke.d")
        post_lines = [self.guard_command(plan)] if plan and plan.run_script else []
        if post:
            post_lines.append(shlex.join(post))
        return ([shlex.join(pre)] if pre else []), post_lines

    def invoke_options(self, plan: UpdatePlan | None) -> list[str]:
        pre, post = self.invoke_hooks(plan)
        return [*(f"--pre-invoke={line}" for line in pre),
                *(f"--post-invoke={line}" for line in post)]

    def install_command(self, plan: UpdatePlan) -> tuple[list[str], dict[str, str]]:
        """The one dpkg (or apt-get) call that applies the plan, and the environment it
        adds."""
        debs = [os.path.abspath(plan.workdir / deb.filename) for deb in plan.debs]
        if self.config.installer != "apt":
            return [*self.dpkg(), *CONFFILE_OPTIONS, *self.invoke_options(plan), "-i",
                    *debs], {}
        pre, post = self.invoke_hooks(plan)
        # Whatever the box's apt.conf.d says: what apt removes keeps its conffiles (the
        # administrator's edits) for the rollback, apt removes only what the release needs
        # (an autoremove would postpone every release that does not list it), and it
        # installs and upgrades every deb given (--only-upgrade/--no-upgrade skip some).
        options = [f"DPkg::Lock::Timeout={int(self.lock_timeout)}", "APT::Get::Purge=false",
                   "APT::Get::AutomaticRemove=false", "APT::Get::Upgrade=true",
                   "APT::Get::Only-Upgrade=false",
                   *(f"DPkg::Options::={opt}" for opt in CONFFILE_OPTIONS),
                   *(f"DPkg::Pre-Invoke::={line}" for line in pre),
                   *(f"DPkg::Post-Invoke::={line}" for line in post)]
        # --reinstall: like dpkg -i, apply a deb even at the installed version, so that dpkg
        # runs and with it the post-invoke hooks and the run script.
        # Recommends are left out: an unattended update installs only what it must.
        if self.offline:
            no_list, no_dir = self.no_sources(plan)
            options += [f"Dir::Etc::SourceList={no_list}", f"Dir::Etc::SourceParts={no_dir}",
                        "Dir::Cache::pkgcache=", "Dir::Cache::srcpkgcache="]  # keep apt's
        cmd = ["apt-get", "install", "--yes", "--no-install-recommends", "--reinstall",
               "--allow-downgrades",
               *(arg for opt in options for arg in ("-o", opt)), *debs]
        extra = {} if self.root == Path("/") else {
            "APT_CONFIG": str(plan.workdir / APT_CONFIG_FILE)}
        return cmd, extra

    def apt_config(self) -> str:
        """The ``APT_CONFIG`` file pointing apt at the dpkg root: its own (empty) config,
        sources, lists and caches; the host's /etc/apt is not read because APT_CONFIG is
        read first and moves ``Dir``. Raises ValueError for a root apt cannot quote."""
        root = str(self.root)
        if '"' in root:
            raise ValueError(f"dpkg_root {root!r} cannot be used with apt (contains a quote)")
        options = "".join(f' "{opt}";' for opt in self.dpkg()[1:])
        return (f'Dir "{root}/";\nDir::State::status "{root}/var/lib/dpkg/status";\n'
                f"DPkg::Options {{{options} }};\n"
                # the extraction dir is 0700: apt's _apt user could not read the debs anyway
                'APT::Sandbox::User "root";\n')

    def opq_env(self, plan: UpdatePlan) -> dict[str, str]:
        return {"OPQ_UPDATE_VERSION": str(plan.version),
                "OPQ_PREVIOUS_VERSION": str(plan.previous_version),
                "OPQ_UPDATE_DIR": str(plan.workdir),
                "DPKG_ROOT": dpkg_root_env(self.root)}

    def env(self, plan: UpdatePlan, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The whole environment of dpkg, apt and every hook and script of ``plan``: the
        runner's minimal one, the ``OPQ_*`` variables and ``DPKG_ROOT`` (DESIGN 3.2), and the
        updater's own ``DEBIAN_FRONTEND`` (and ``APT_CONFIG`` in ``extra`` for a sandboxed
        apt): an inherited value of either never wins."""
        return child_env({**self.opq_env(plan), "DEBIAN_FRONTEND": "noninteractive",
                          SESSIONS_ENV: str(self.config.state_dir / SESSIONS_DIRNAME),
                          **(extra or {})})


# --- reading dpkg's answers --------------------------------------------------------------


def installed_version(state: PackageState | None) -> str | None:
    """The installed version, None when not installed (only conffiles left counts as not
    installed)."""
    if state is None or not state.present or state.status.endswith(" config-files"):
        return None
    return state.version


def differs(name: str, version: str | None, states: Mapping[str, PackageState]) -> bool:
    """True when dpkg's record of ``name`` is not ``version`` (None: not installed, as in
    the installer's snapshot), fully installed and configured."""
    if version is None:
        return installed_version(states.get(name)) is not None
    return bool(not_installed({name: version}, states))


def label(name: str, version: str | None) -> str:
    return f"{name}={version if version is not None else '(not installed)'}"


# --- what a rollback must do, from the whole installed set ------------------------------

#: The label of a package that had only its conffiles on the box before the update.
CONFIG_FILES = "(config-files)"


def encode_states(states: Mapping[str, PackageState]) -> dict[str, str]:
    """The whole installed set as the journal keeps it, ``key -> "want flag status
    version"`` (keys as :func:`~opq_box_updater.guard.package_key` makes them); packages dpkg
    records as ``not-installed`` are left out. The architecture is left out on purpose: an
    older updater recovering from this journal (a self-downgrade cut by a power failure)
    reads the last word as the version."""
    return {key: f"{state.status} {state.version}" for key, state in states.items()
            if state.present}


def decode_states(encoded: Mapping[str, str]) -> dict[str, PackageState]:
    """The inverse of :func:`encode_states` (architectures unknown: empty)."""
    states = {}
    for key, text in encoded.items():
        status, _, version = text.rpartition(" ")
        states[key] = PackageState(version=version, status=status)
    return states


def _config_files_only(state: PackageState | None) -> bool:
    return state is not None and state.status.endswith(" config-files")


@dataclass(frozen=True)
class RollbackSteps:
    """What still separates the box from the set it had before the update."""

    purge: tuple[str, ...] = ()  # not on the box before: purged
    remove: tuple[str, ...] = ()  # only conffiles before: removed, never purged
    reinstall: tuple[tuple[str, str], ...] = ()  # (name, version); the update's own first
    lost: tuple[str, ...] = ()  # only conffiles before, purged since: cannot come back

    def labels(self) -> tuple[str, ...]:
        """``pkg=version`` of everything not restored, as ``status`` lists it."""
        items = [label(n, None) for n in self.purge]
        items += [f"{n}={CONFIG_FILES}" for n in (*self.remove, *self.lost)]
        items += [label(n, v) for n, v in self.reinstall]
        return tuple(sorted(items))


def rollback_steps(previous: Mapping[str, str | None],
                   before: Mapping[str, PackageState] | None,
                   now: Mapping[str, PackageState],
                   scope: Iterable[str] | None = None) -> RollbackSteps:
    """Compare the box (``now``) with the set it had before the update.

    ``before`` is the whole installed set recorded before applying; then every package that
    appeared since is purged, one that was only ``config-files`` is removed back to that
    state (the admin's conffiles stay), and every package whose version or state changed
    (an upgrade of the update, a package its ``Conflicts`` removed) is reinstalled — but
    only among ``scope``, the packages the update could change (its own, what its debs
    conflict with or replace, what apt's simulation installs or upgrades): an admin who
    installed or upgraded something else while the update ran (dpkg's lock is not held
    during the health check, nor across a power cut) keeps it. Without ``before`` (a journal
    written by an older updater) only the update's own packages, ``previous``, are compared,
    as that version did."""
    if before is None:
        return RollbackSteps(
            purge=tuple(sorted(n for n, v in previous.items()
                               if v is None and differs(n, v, now))),
            reinstall=tuple(sorted((n, v) for n, v in previous.items()
                                   if v is not None and differs(n, v, now))))
    purge: list[str] = []
    remove: list[str] = []
    lost: list[str] = []
    changed: list[tuple[str, str]] = []
    names = {*before, *now} if scope is None else {*scope, *previous}
    for name in sorted(names):
        old, new = before.get(name), now.get(name)
        if old is None or not old.present:
            if new is not None and new.present:
                purge.append(name)
        elif _config_files_only(old):
            if new is None or not new.present:
                lost.append(name)
            elif not _config_files_only(new):
                remove.append(name)
        elif new != old and differs(name, old.version, now):
            changed.append((name, old.version))
    changed.sort(key=lambda item: (item[0] not in previous, item[0]))
    return RollbackSteps(tuple(purge), tuple(remove), tuple(changed), tuple(lost))


def exit_text(returncode: int) -> str:
    return f"killed by signal {-returncode}" if returncode < 0 else \
        f"exit status {returncode}"


def script_failure(plan: UpdatePlan, status: RunStatus | None) -> str:
    """One line on why the run script did not succeed, from its recorded status."""
    name = plan.manifest.run
    if status is None or status.state == "skipped":
        why = status.detail if status else "no status recorded"
        return f"run script {name} did not run ({why})"
    if status.state == "started":
        return f"run script {name} was interrupted"
    last = tail(status.detail, 1)
    code = "could not be run" if status.returncode is None else exit_text(status.returncode)
    return f"run script {name} failed ({code}){': ' + last if last else ''}"


def error_summary(output: str, tool: str = "dpkg") -> str:
    """dpkg's or apt's last error with its indented continuation lines, else the last line,
    preceded by the missing dependencies when there are any: what an operator needs in the
    one-line message (the whole output is in the log)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(("dpkg: error", "E: "))]
    if not starts:
        summary = tail(output, 1)
    else:
        first = starts[-1]
        end = first + 1
        while end < len(lines) and lines[end].startswith(" "):
            end += 1
        summary = " ".join(line.strip() for line in lines[first:end])
    missing = missing_dependencies(output)
    if not missing:
        return summary
    advice = ("add them to the box's apt sources or ship them in the release" if tool == "apt-get"
              else "install them on the box, ship them in the release, or use installer: apt")
    return f"missing dependencies: {'; '.join(missing)} ({advice}) - {summary}"


# dpkg (checked with 1.21): " app depends on libfoo (>= 1.2); however:" followed by
# "  Package libfoo is not installed." or "  Version of libfoo on system is 1.0."; for a
# pre-dependency " app pre-depends on libpre" followed by "  libpre is not installed.".
_DPKG_NEEDS = re.compile(r" (\S+) (?:pre-)?depends on (.+?)(?:; however:|\.)?")
_DPKG_ABSENT = re.compile(r"  (?:Package )?(\S+) is (.+?)\.")
_DPKG_VERSION = re.compile(r"  Version of (\S+) on system is (\S+)\.")
# apt-get: " app : Depends: libfoo (>= 1.2) but it is not installable", then continuation
# lines "       Depends: libq but it is not going to be installed".
_APT_NEEDS = re.compile(r" (?:(\S+) +: +| +)(?:Pre-?)?Depends: (.+?)(?: but (.+))?")


@dataclass
class _Need:
    owner: str
    relation: str
    reasons: list[str]


def missing_dependencies(output: str) -> list[str]:
    """The unmet dependencies dpkg (or apt-get) reports in ``output``, one entry per package
    that needs them, e.g. ``app needs libfoo (>= 1.2) (not installed), libold (>= 2.0)
    (libold 1.0 is installed)``. Empty when the output reports none."""
    needs: list[_Need] = []
    current: _Need | None = None  # the dpkg relation whose reasons follow
    apt_owner: str | None = None  # the package of the apt lines that follow
    for line in output.splitlines():
        if match := _DPKG_NEEDS.fullmatch(line):
            current = _Need(match.group(1), match.group(2), [])
            needs.append(current)
            apt_owner = None
        elif current is not None and (match := _DPKG_VERSION.fullmatch(line)):
            current.reasons.append(f"{match.group(1)} {match.group(2)} is installed")
        elif current is not None and (match := _DPKG_ABSENT.fullmatch(line)):
            alternatives = "|" in current.relation
            current.reasons.append(f"{match.group(1)} {match.group(2)}" if alternatives
                                   else match.group(2))
        elif (match := _APT_NEEDS.fullmatch(line)) and (match.group(1) or apt_owner):
            apt_owner = match.group(1) or apt_owner
            assert apt_owner is not None
            reason = (match.group(3) or "").removeprefix("it is ")
            needs.append(_Need(apt_owner, match.group(2), [reason] if reason else []))
            current = None
        else:
            current = apt_owner = None
    by_owner: dict[str, list[str]] = {}
    for need in needs:
        text = need.relation + (f" ({', '.join(need.reasons)})" if need.reasons else "")
        by_owner.setdefault(need.owner, []).append(text)
    return [f"{owner} needs {', '.join(items)}" for owner, items in by_owner.items()]


# --- what a rollback will need, known before applying --------------------------------------


def conflicting(relations: str, states: Mapping[str, PackageState],
                providers: Mapping[str, Iterable[str]] | None = None
                ) -> list[tuple[str, str]]:
    """The installed packages (name, version) a deb's ``Conflicts`` or ``Replaces`` field
    names, version restrictions honoured, and the installed packages that ``Provides`` a
    virtual name it names (``providers``: virtual name -> packages): dpkg may remove these
    while applying, so a rollback would need their debs."""
    from debian.deb822 import PkgRelation
    from debian.debian_support import version_compare

    ops = {"<<": lambda c: c < 0, "<=": lambda c: c <= 0, "=": lambda c: c == 0,
           ">=": lambda c: c >= 0, ">>": lambda c: c > 0}
    found = []
    for group in PkgRelation.parse_relations(relations):
        for rel in group:
            # every installed instance: a Multi-Arch: same package may have several
            instances = [(key, version) for key, state in states.items()
                         if base_name(key) == rel["name"]
                         and (version := installed_version(state)) is not None]
            if not instances:
                for provider in (providers or {}).get(rel["name"], ()):
                    installed = installed_version(states.get(provider))
                    if installed is not None:
                        found.append((provider, installed))
                continue
            restriction = rel.get("version")
            found += [(key, version) for key, version in instances
                      if restriction is None
                      or ops[restriction[0]](version_compare(version, restriction[1]))]
    return found


def apt_keys(apt_name: str, states: Mapping[str, PackageState],
             native: str) -> list[str]:
    """The package keys (:func:`~opq_box_updater.guard.package_key`) apt's ``apt_name``
    may stand for on a box whose native architecture is ``native``: the installed instance
    when there is one, else both forms the new package may get (``name`` and
    ``name:arch``), so that a rollback's scope holds it either way."""
    name, _, arch = apt_name.partition(":")
    archs = {arch} if arch else {native, "all"}
    installed = [key for key, state in states.items() if base_name(key) == name
                 and state.present and state.architecture in archs]
    if installed:
        return installed
    return [name, *(f"{name}:{a}" for a in sorted(archs))]


def rollback_needs(targets: Mapping[str, str], states: Mapping[str, PackageState],
                   others: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(name, version) of every deb a rollback of this update may have to reinstall: the
    installed version of each package the update changes, and ``others`` (packages it may
    remove or apt may upgrade, name -> installed version). Packages not installed before need
    nothing: they are purged, or removed back to ``config-files``."""
    needs = {name: version for name, version in (others or {}).items()}
    for name, new in targets.items():
        old = installed_version(states.get(name))
        if old is not None and old != new:
            needs[name] = old
    return sorted(needs.items())


# "Inst name [old] (new suite [arch])", "Remv name [old]" (apt-get -s, checked with apt 2.6).
_APT_SIM = re.compile(r"(Inst|Remv|Purg) (\S+)(?: \[(\S+)\])?(?: \((\S+).*\))?.*")


@dataclass(frozen=True)
class AptSimulation:
    """What ``apt-get -s install`` says the transaction will do, packages named as apt
    names them (``name`` for the native architecture and ``all``, else ``name:arch``)."""

    removes: dict[str, str]  # name -> installed version
    upgrades: dict[str, str]  # name -> installed version (replaced by another)
    new: tuple[str, ...]  # packages not installed before


def parse_apt_simulation(output: str) -> AptSimulation:
    removes: dict[str, str] = {}
    upgrades: dict[str, str] = {}
    new: list[str] = []
    for line in output.splitlines():
        match = _APT_SIM.fullmatch(line)
        if not match:
            continue
        what, name, old, _new = match.groups()  # name as apt prints it: maybe name:arch
        if what in ("Remv", "Purg"):  # Purg: apt's purge setting; a removal all the same
            removes[name] = old or ""
        elif old:
            upgrades[name] = old
        else:
            new.append(name)
    return AptSimulation(removes, upgrades, tuple(new))

