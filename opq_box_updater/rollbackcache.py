"""The debs a rollback needs, kept and checked before anything changes (DESIGN 3.2).

:class:`RollbackCache` owns ``<state_dir>/debs/``: it keeps the debs each update applied (for
rolling back the next one), finds an intact deb of an exact version there or in apt's
archive cache, fetches one with ``apt-get download`` when ``installer: apt``, and answers,
before an update is applied, whether a rollback could be done. The installer runs dpkg; this
module only decides which debs are at hand (:mod:`debcache` checks each file).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

from . import debcache
from .applyplan import (
    APT_ARCHIVES,
    APT_CONFIG_FILE,
    CACHE_DIR,
    AptSimulation,
    Commands,
    UpdatePlan,
    apt_keys,
    cache_name,
    conflicting,
    decode_states,
    error_summary,
    label,
    parse_apt_simulation,
    rollback_needs,
)
from .config import Config
from .errors import ApplyError, PostponedError
from .guard import PackageState, package_key, root_options
from .runner import run, tail

logger = logging.getLogger(__name__)

#: Besides the version just applied, how many other versions of a package the cache keeps:
#: one is what the next update needs to roll back to.
KEEP_OTHER_VERSIONS = 1

#: The packages the updater runs from (debian/control). apt never removes them for a
#: release, whatever its ``apt_allow_remove`` says: a box without its updater takes no
#: further release, not even the one that would put it back (a guard against mistakes and
#: apt's dependency resolution; a release's run script runs as root anyway).
UPDATER_PACKAGES = frozenset({"opq-box-updater", "python3-opq-box-updater"})


#: Why a ``--from`` run leaves a deb apt would fetch where it is.
OFFLINE_WHY = "a --from run downloads nothing"


class RollbackCache:
    """``<state_dir>/debs/`` and the other places an intact deb may come from."""

    def __init__(self, config: Config, commands: Commands, *, timeout: float) -> None:
        self.config = config
        self.commands = commands
        self.root = config.dpkg_root
        self.dir = config.state_dir / CACHE_DIR
        self.timeout = timeout  # one apt-get call
        # run --from: apt downloads nothing; it sees no sources (Commands.offline), so a
        # release that needs a package only a repository has is postponed by the simulation
        self.offline = commands.offline

    def prepare(self, plan: UpdatePlan, before: Mapping[str, str]) -> tuple[str, ...]:
        """Before anything changes, make sure a rollback could be done, and return its scope:
        the packages the update may change (its own; with dpkg, the installed packages its
        debs' ``Conflicts`` or ``Replaces`` name, directly or through ``Provides``; with
        apt, what the simulated transaction installs, upgrades or removes). A rollback
        touches nothing else. Every deb it may need is in ``<state_dir>/debs/`` and intact,
        copied from apt's archive cache or, with ``installer: apt``, fetched with
        ``apt-get download``. Raises
        :class:`PostponedError` when one is missing, when apt would remove a package the
        manifest's ``apt_allow_remove`` does not list (one it lists is in scope: the rollback
        reinstalls it), or when a package in scope is on hold (the administrator's hold
        wins, as with apt)."""
        if not plan.debs:
            return ()
        providers, archs = self._installed()
        states = {key: dataclasses.replace(state, architecture=archs.get(key, ""))
                  for key, state in decode_states(before).items()}
        others: dict[str, str] = {}
        scope = set(plan.targets)
        if self.config.installer == "apt":
            simulation = self._simulate(plan)
            native = self._native_architecture()
            removes = {key: name for name in simulation.removes
                       for key in apt_keys(name, states, native) if key in states}
            itself = sorted({name for key, name in removes.items()
                             if key.partition(":")[0] in UPDATER_PACKAGES})
            if itself:
                raise PostponedError(
                    f"apt would remove {', '.join(itself)}, the updater itself, to apply "
                    f"release {plan.version}; a release may not do that (apt_allow_remove "
                    "notwithstanding)")
            refused = sorted({name for key, name in removes.items()
                              if not _allowed(key, states[key].architecture,
                                              plan.manifest.apt_allow_remove)})
            if refused:
                raise PostponedError(
                    f"apt would remove {', '.join(refused)} to apply release {plan.version}, "
                    "and the release does not allow it (opq-box-publish build "
                    "--apt-allow-remove)")
            # the rollback reinstalls what apt removes or upgrades: their debs must be at
            # hand before apt runs
            for name in [*simulation.removes, *simulation.upgrades]:
                others.update((key, states[key].version)
                              for key in apt_keys(name, states, native) if key in states)
            for name in simulation.new:
                scope.update(apt_keys(name, states, native))
        else:
            from .package import deb_control

            for deb in plan.debs:
                control = deb_control(plan.workdir / deb.filename, deb.filename)
                for field in ("Conflicts", "Replaces"):
                    if control.get(field):
                        others.update(conflicting(control[field], states, providers))
        scope.update(others)
        held = sorted(name for name in scope if (state := states.get(name)) and state.held)
        if held:
            raise PostponedError(f"release {plan.version} is not applied: it would change "
                                 f"{', '.join(held)}, on hold on this box (release the hold "
                                 "with 'echo NAME install | dpkg --set-selections')")
        missing = [label(key, version)
                   for key, version in rollback_needs(plan.targets, states, others)
                   if self.find(key, version, _arch(key, states)) is None
                   and self._download(plan, key, version, _arch(key, states)) is None]
        if missing:
            raise PostponedError(
                f"release {plan.version} is not applied: a rollback would need "
                f"{', '.join(missing)}, and no intact deb of it is in "
                f"{self.dir} or {self.root / APT_ARCHIVES}"
                + (f" ({OFFLINE_WHY}: put it there, or update over the network)"
                   if self.offline else "" if self.config.installer == "apt" else
                   " (put it there, or use installer: apt to download it)"))
        return tuple(sorted(scope))

    def _installed(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Virtual package name -> the installed packages that ``Provides`` it; and each
        package's architecture (the journal's record of the installed set has none)."""
        cmd = ["dpkg-query", *root_options(self.root), "--showformat",
               "${Package}\t${Architecture}\t${Multi-Arch}\t${Provides}\n", "--show"]
        providers: dict[str, list[str]] = {}
        archs: dict[str, str] = {}
        for line in run(cmd, timeout=120).output.splitlines():
            fields = line.split("\t")
            if len(fields) != 4:
                continue
            key = package_key(*fields[:3])
            archs[key] = fields[1]
            for item in fields[3].split(","):
                virtual = item.strip().split(" ")[0]
                if virtual:
                    providers.setdefault(virtual, []).append(key)
        return providers, archs

    def _native_architecture(self) -> str:
        return run(["dpkg", *root_options(self.root), "--print-architecture"],
                   timeout=120).output.strip()

    def keep(self, plan: UpdatePlan) -> None:
        """Keep the applied debs as ``pkg_version_arch.deb`` (copied atomically, with their
        sha256) so a later update can be rolled back to them; per package keep the version
        just applied and the most recently cached other one. Failures are logged, not
        raised: the update itself succeeded."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            debcache.clean_leftovers(self.dir)
            for deb in plan.debs:
                name = cache_name(deb.package, deb.version, deb.architecture)
                debcache.store(plan.workdir / deb.filename, self.dir / name)
                self._prune(deb.package, deb.architecture, keep=name)
        except OSError as exc:
            logger.error("cannot keep the applied debs in %s for rollbacks: %s", self.dir, exc)

    def find(self, key: str, version: str, arch: str = "") -> Path | None:
        """An intact deb of exactly ``key`` (a :func:`~opq_box_updater.guard.package_key`)
        ``version``, of architecture ``arch`` unless the key names it or it is empty (its
        own control fields checked, not just its name) from our cache, else from apt's
        archives (then copied into ours)."""
        name, _, qualifier = key.partition(":")
        return debcache.find(self.dir, [self.root / APT_ARCHIVES], name, version,
                             qualifier or arch)

    def apt_env(self, plan: UpdatePlan) -> dict[str, str]:
        """The environment of an apt-get call; the files it reads are made first."""
        self.write_apt_files(plan)
        if self.root == Path("/"):
            return self.commands.env(plan)
        return self.commands.env(plan, {"APT_CONFIG": str(plan.workdir / APT_CONFIG_FILE)})

    def write_apt_files(self, plan: UpdatePlan) -> None:
        """In a sandbox root, apt's directories and its ``APT_CONFIG``; offline, the empty
        sources apt reads instead of the box's."""
        if self.root != Path("/"):
            self.write_apt_sandbox(plan)
        if self.offline:
            no_list, no_dir = self.commands.no_sources(plan)
            no_list.write_bytes(b"")
            no_dir.mkdir(exist_ok=True)

    def write_apt_sandbox(self, plan: UpdatePlan) -> None:
        """Create apt's directories inside the dpkg root and its ``APT_CONFIG`` file."""
        try:
            text = self.commands.apt_config()
        except ValueError as exc:
            raise ApplyError(str(exc)) from None
        for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d",
                    "var/lib/apt/lists/partial", "var/cache/apt/archives/partial",
                    "var/log/apt"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (plan.workdir / APT_CONFIG_FILE).write_text(text)

    def _simulate(self, plan: UpdatePlan) -> AptSimulation:
        """``apt-get -s`` of the install command: what apt would remove, upgrade, add."""
        cmd, _ = self.commands.install_command(plan)
        result = run([cmd[0], "-s", *cmd[1:]], env=self.apt_env(plan), timeout=self.timeout,
                     check=False)
        if result.returncode != 0 and self.offline:
            raise PostponedError(f"apt cannot apply release {plan.version} with only its own "
                                 f"debs and what is installed, and {OFFLINE_WHY}: ship what "
                                 "it needs in the release or update over the network "
                                 f"({error_summary(result.output, 'apt-get')})")
        if result.returncode != 0:
            raise PostponedError(f"apt-get cannot plan release {plan.version}: "
                                 f"{error_summary(result.output, 'apt-get')}")
        return parse_apt_simulation(result.output)

    def _download(self, plan: UpdatePlan, key: str, version: str, arch: str) -> Path | None:
        """With ``installer: apt``, ``apt-get download name[:arch]=version`` into our cache."""
        if self.config.installer != "apt":
            return None
        if self.offline:
            logger.info("%s=%s not downloaded: %s", key, version, OFFLINE_WHY)
            return None
        name, _, qualifier = key.partition(":")
        arch = qualifier or arch
        wanted = f"{name}:{arch}={version}" if arch not in ("", "all") else f"{name}={version}"
        with tempfile.TemporaryDirectory(dir=self.config.state_dir) as tmp:
            result = run(["apt-get", "download", wanted],
                         env=self.apt_env(plan), cwd=Path(tmp), timeout=self.timeout,
                         check=False)
            if result.returncode != 0:
                logger.warning("apt-get download %s failed: %s", wanted,
                               tail(result.output, 1))
                return None
            return debcache.find(self.dir, [Path(tmp)], name, version, arch, root_owned=False)

    def _prune(self, package: str, arch: str, *, keep: str) -> None:
        """Per package and architecture (a Multi-Arch package's copies are kept apart)."""
        others = [p for p in self.dir.glob(f"{glob.escape(package)}_*_{glob.escape(arch)}.deb")
                  if p.name.split("_")[0] == package and p.name != keep]
        others.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in others[KEEP_OTHER_VERSIONS:]:
            logger.info("removing %s from the rollback cache", old.name)
            debcache.remove(old)


def _arch(key: str, states: Mapping[str, PackageState]) -> str:
    """The architecture of the installed instance ``key`` ("" when unknown)."""
    state = states.get(key)
    return state.architecture if state is not None else ""


def _allowed(key: str, arch: str, allow: tuple[str, ...]) -> bool:
    """True when the manifest's ``apt_allow_remove`` names the instance ``key`` (of
    architecture ``arch``): as ``name`` (any architecture) or ``name:arch``."""
    name = key.partition(":")[0]
    return name in allow or f"{name}:{arch}" in allow
