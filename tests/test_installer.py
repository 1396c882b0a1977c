"""The installer against real .debs and dpkg in a temporary root (DESIGN 3.2, 3.4).

Every scenario ends with dpkg-query on the temporary root asserting exact versions. Hooks,
maintainer scripts and the run script append to one log file, so the order is asserted too.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from debs import dpkg_command, init_dpkg_root, make_deb, require_tool

from opq_box_updater.config import Config
from opq_box_updater.errors import ApplyError, DpkgBusyError, PostponedError
from opq_box_updater.faults import FAULT_ENV
from opq_box_updater.guard import RunStatus, read_status
from opq_box_updater.installer import (
    FAILED,
    HEALTHY,
    INTERRUPTED,
    Installer,
    UpdatePlan,
    cache_name,
)
from opq_box_updater.package import DebInfo, Manifest

HOOK_DIRS = ("pre-update.d", "pre-invoke.d", "post-invoke.d", "health.d", "post-update.d")


@dataclass
class Sandbox:
    """A box in a temporary directory: dpkg root, hooks, state, a place to build debs."""

    base: Path
    config: Config

    @property
    def root(self) -> Path:
        return self.config.dpkg_root

    @property
    def log(self) -> Path:
        return self.base / "order.log"

    @property
    def debs(self) -> Path:
        return self.base / "debs-built"

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def installer(self, **kwargs: Any) -> Installer:
        return Installer(self.config, **kwargs)

    def hook(self, directory: str, name: str, body: str) -> None:
        """Add an executable hook that logs ``name`` (its directory's name by default)."""
        path = self.config.hooks_dir / directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def logging_hooks(self) -> None:
        for directory in HOOK_DIRS:
            self.hook(directory, "10-log", f'echo "{directory[:-2]}" >> {self.log}')

    def deb(self, name: str, version: str, **scripts: str) -> Path:
        """A deb whose postinst logs ``postinst <name> <version>`` (plus ``scripts``)."""
        logged = {"postinst": f'echo "postinst {name} {version}" >> {self.log}\n'}
        for script, text in scripts.items():
            logged[script] = logged.get(script, "") + text
        return make_deb(self.debs, name, version,
                        files={f"usr/share/{name}/version": version}, scripts=logged)

    def plan(self, version: int, debs: list[Path], *, run: str | None = None,
             healthcheck: str | None = None, previous_version: int | None = None) -> UpdatePlan:
        """Lay out an extracted package the way package.py leaves it and describe it."""
        workdir = self.config.download_dir_path / f"v{version}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, mode=0o700)
        infos = []
        for deb in debs:
            shutil.copyfile(deb, workdir / deb.name)
            name, deb_version, arch = _fields(deb)
            infos.append(DebInfo(deb.name, name, deb_version, arch))
        for script, body in (("update.sh", run), ("healthcheck.sh", healthcheck)):
            if body is not None:
                (workdir / script).write_text(f"#!/bin/sh\n{body}\n")
                (workdir / script).chmod(0o700)
        manifest = Manifest(format=1, version=version, debs=tuple(d.name for d in debs),
                            run="update.sh" if run is not None else None,
                            healthcheck="healthcheck.sh" if healthcheck is not None else None)
        return UpdatePlan(version=version,
                          previous_version=version - 1 if previous_version is None
                          else previous_version,
                          workdir=workdir, manifest=manifest, debs=tuple(infos))

    def installed(self) -> dict[str, str]:
        """Every package dpkg-query shows in the root, with version and status abbreviation."""
        out = subprocess.run(
            [require_tool("dpkg-query"), f"--root={self.root}", "-W",
             "-f=${Package} ${Version} ${db:Status-Abbrev}\n"],
            capture_output=True, text=True, check=True).stdout
        result = {}
        for line in out.splitlines():
            name, version, abbrev = line.split(" ", 2)
            result[name] = version if abbrev.strip() == "ii" else f"{version} {abbrev.strip()}"
        return result

    def install_v1(self) -> UpdatePlan:
        """Release 1 with a 1.0, applied and cached like a successful run does."""
        plan = self.plan(1, [self.deb("a", "1.0")], previous_version=0)
        installer = self.installer()
        installer.apply(plan)
        installer.cache_debs(plan)
        assert self.installed() == {"a": "1.0"}
        self.log.unlink(missing_ok=True)
        return plan


def _fields(deb: Path) -> tuple[str, str, str]:
    out = subprocess.run([require_tool("dpkg-deb"), "--show",
                          "--showformat=${Package}\t${Version}\t${Architecture}", str(deb)],
                         capture_output=True, text=True, check=True).stdout
    name, version, arch = out.split("\t")
    return name, version, arch


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    for tool in ("dpkg", "dpkg-deb", "dpkg-query", "run-parts"):
        require_tool(tool)
    root = init_dpkg_root(tmp_path / "root")
    config = Config(server_url="http://127.0.0.1:9/", dpkg_root=root,
                    hooks_dir=tmp_path / "hooks", state_dir=tmp_path / "state",
                    download_dir_path=tmp_path / "downloads")
    config.hooks_dir.mkdir()
    yield Sandbox(tmp_path, config)


def _v2(sandbox: Sandbox, **overrides: str) -> UpdatePlan:
    """Release 2: a 2.0 (upgrade) and b 1.0 (new), a run script, a health check."""
    scripts_b = {"postinst": overrides["postinst_b"]} if "postinst_b" in overrides else {}
    return sandbox.plan(
        2, [sandbox.deb("a", "2.0"), sandbox.deb("b", "1.0", **scripts_b)],
        run=overrides.get("run", f'echo "run $OPQ_UPDATE_VERSION $(pwd)" >> {sandbox.log}'),
        healthcheck=overrides.get("healthcheck", f'echo healthcheck >> {sandbox.log}'))


# --- success ------------------------------------------------------------------------------


def test_two_debs_run_script_and_every_hook_in_order(sandbox: Sandbox) -> None:
    sandbox.install_v1()
    sandbox.logging_hooks()
    plan = _v2(sandbox)
    installer = sandbox.installer()
    assert installer.snapshot(plan) == {"a": "1.0", "b": None}

    installer.pre_update(plan)
    installer.apply(plan)
    installer.cache_debs(plan)
    installer.post_update(plan)

    assert sandbox.installed() == {"a": "2.0", "b": "1.0"}
    assert sandbox.lines() == [
        "pre-update", "pre-invoke", "postinst a 2.0", "postinst b 1.0",
        f"run 2 {plan.workdir}", "post-invoke", "healthcheck", "health", "post-update"]
    assert read_status(plan.status_file) == RunStatus("finished", 0, "")
    assert sorted(p.name for p in (sandbox.config.state_dir / "debs").glob("*.deb")) == [
        "a_1.0_all.deb", "a_2.0_all.deb", "b_1.0_all.deb"]


def test_scripts_and_hooks_get_the_documented_environment(sandbox: Sandbox) -> None:
    env_line = ('echo "$0 $OPQ_UPDATE_VERSION $OPQ_PREVIOUS_VERSION $OPQ_UPDATE_DIR '
                f'$DPKG_ROOT $PATH" >> {sandbox.log}')
    for directory in HOOK_DIRS:
        sandbox.hook(directory, "env", env_line)
    plan = sandbox.plan(7, [sandbox.deb("a", "1.0")], run=env_line, healthcheck=env_line,
                        previous_version=3)
    installer = sandbox.installer()
    installer.pre_update(plan)
    installer.apply(plan)
    installer.post_update(plan)
    lines = [line for line in sandbox.lines() if not line.startswith("postinst")]
    assert len(lines) == 7  # five hook dirs, the run script, the health check
    for line in lines:
        _script, version, previous, update_dir, dpkg_root, path = line.split(" ")
        assert (version, previous, update_dir, dpkg_root) == (
            "7", "3", str(plan.workdir), str(sandbox.root))
        assert {"/usr/sbin", "/sbin"} <= set(path.split(":"))


def test_package_without_debs_runs_its_script_directly(sandbox: Sandbox) -> None:
    sandbox.logging_hooks()
    plan = sandbox.plan(2, [], run=f'echo "run $(pwd)" >> {sandbox.log}',
                        healthcheck=f"echo healthcheck >> {sandbox.log}")
    installer = sandbox.installer()
    installer.pre_update(plan)
    installer.apply(plan)
    installer.post_update(plan)
    # No dpkg call, so no pre-/post-invoke hooks; pre-update, health, post-update still run.
    assert sandbox.lines() == ["pre-update", f"run {plan.workdir}", "healthcheck", "health",
                               "post-update"]
    assert sandbox.installed() == {}


def test_missing_hook_directories_count_as_empty(sandbox: Sandbox) -> None:
    shutil.rmtree(sandbox.config.hooks_dir)
    plan = sandbox.plan(1, [sandbox.deb("a", "1.0")], run="true", healthcheck="true")
    installer = sandbox.installer()
    installer.pre_update(plan)
    installer.apply(plan)
    installer.post_update(plan)
    assert sandbox.installed() == {"a": "1.0"}


def test_describe_lists_the_exact_commands(sandbox: Sandbox) -> None:
    sandbox.logging_hooks()
    plan = _v2(sandbox)
    hooks = sandbox.config.hooks_dir
    lines = sandbox.installer().describe(plan)
    assert lines[0] == f"run-parts --exit-on-error {hooks}/pre-update.d"
    dpkg = lines[1]
    assert dpkg.startswith(f"dpkg --root={sandbox.root} --force-script-chrootless "
                           f"--log={sandbox.root}/var/log/dpkg.log")
    assert f"'--pre-invoke=run-parts --exit-on-error {hooks}/pre-invoke.d'" in dpkg
    assert "opq_box_updater.guard" in dpkg and "--expect a=2.0 --expect b=1.0" in dpkg
    assert dpkg.index("opq_box_updater.guard") < dpkg.index(f"{hooks}/post-invoke.d")
    assert dpkg.endswith(f"-i {plan.workdir}/a_2.0_all.deb {plan.workdir}/b_1.0_all.deb")
    assert lines[2].endswith("healthcheck.sh")
    assert lines[3] == f"run-parts --exit-on-error {hooks}/health.d"
    assert lines[4].startswith(f"run-parts {hooks}/post-update.d")
    assert sandbox.installed() == {}  # describing runs nothing


# --- failures and rollback ----------------------------------------------------------------


def test_pre_update_veto_postpones_and_changes_nothing(sandbox: Sandbox) -> None:
    sandbox.install_v1()
    sandbox.logging_hooks()
    sandbox.hook("pre-update.d", "20-veto", "echo 'battery low'; exit 1")
    plan = _v2(sandbox)
    with pytest.raises(PostponedError, match=r"pre-update\.d"):
        sandbox.installer().pre_update(plan)
    assert sandbox.installed() == {"a": "1.0"}
    assert sandbox.lines() == ["pre-update"]


FAILURES = {
    # where it fails: (how to make it fail, what the error says, what ran before rollback;
    # RUN stands for the run script's line)
    "pre-invoke.d": ("hook", "pre-invoke", []),
    "dpkg": ("postinst_b", "dpkg failed", ["postinst a 2.0", "postinst b 1.0"]),
    "run script": ("run", "run script update.sh failed", ["postinst a 2.0", "postinst b 1.0",
                                                          "run failing"]),
    "post-invoke.d": ("hook", "post-invoke", ["postinst a 2.0", "postinst b 1.0", "RUN"]),
    "healthcheck": ("healthcheck", "health check", ["postinst a 2.0", "postinst b 1.0", "RUN",
                                                    "healthcheck failing"]),
    "health.d": ("hook", "health.d", ["postinst a 2.0", "postinst b 1.0", "RUN",
                                      "healthcheck"]),
}


@pytest.mark.parametrize("where", FAILURES)
def test_each_failure_point_rolls_back_to_the_exact_previous_versions(
        sandbox: Sandbox, where: str) -> None:
    sandbox.install_v1()
    how, message, ran = FAILURES[where]
    overrides: dict[str, str] = {}
    if how == "hook":
        sandbox.hook(where, "50-fail", f"echo '{where} says no'; exit 1")
    elif how == "postinst_b":
        overrides["postinst_b"] = "echo 'cannot configure b'; exit 1\n"
    else:
        overrides[how] = f'echo "{how} failing" >> {sandbox.log}; exit 3'
    plan = _v2(sandbox, **overrides)
    installer = sandbox.installer()
    previous = installer.snapshot(plan)

    with pytest.raises(ApplyError, match=re.escape(message)):
        installer.apply(plan)
    run_line = f"run 2 {plan.workdir}"
    assert sandbox.lines() == [run_line if line == "RUN" else line for line in ran]

    assert installer.rollback(plan, previous) == ()
    assert sandbox.installed() == {"a": "1.0"}  # a downgraded, b purged: exactly as before
    assert not (sandbox.root / "usr/share/b").exists()
    assert (sandbox.root / "usr/share/a/version").read_text() == "1.0"


def test_guard_does_not_run_the_script_when_dpkg_failed(sandbox: Sandbox) -> None:
    sandbox.install_v1()
    plan = _v2(sandbox, postinst_b="exit 1\n")
    with pytest.raises(ApplyError, match="dpkg failed"):
        sandbox.installer().apply(plan)
    assert not any(line.startswith("run") for line in sandbox.lines())
    status = read_status(plan.status_file)
    assert status is not None and status.state == "skipped"
    assert "b 1.0 is 'install ok half-configured'" in status.detail


def test_a_post_invoke_failure_makes_dpkg_exit_non_zero(sandbox: Sandbox) -> None:
    """What the guard relies on (dpkg 1.21): a failing --post-invoke hook fails dpkg."""
    deb = sandbox.deb("a", "1.0")
    proc = subprocess.run(dpkg_command(sandbox.root, "--post-invoke=exit 3", "-i", str(deb)),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "error executing hook" in proc.stderr


def test_rollback_reports_what_it_cannot_restore(sandbox: Sandbox,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    sandbox.install_v1()
    shutil.rmtree(sandbox.config.state_dir / "debs")  # the 1.0 deb is nowhere now
    plan = _v2(sandbox, healthcheck="exit 1")
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    with pytest.raises(ApplyError):
        installer.apply(plan)
    with caplog.at_level(logging.ERROR, logger="opq_box_updater.installer"):
        assert installer.rollback(plan, previous) == ("a=1.0",)
    assert "could not restore a=1.0" in caplog.text
    assert sandbox.installed() == {"a": "2.0"}  # b (new) was purged all the same


def test_rollback_falls_back_to_apts_archive_cache(sandbox: Sandbox) -> None:
    epoch_deb = make_deb(sandbox.debs, "c", "1:1.0", files={"usr/share/c/v": "1"})
    subprocess.run(dpkg_command(sandbox.root, "-i", str(epoch_deb)), check=True,
                   capture_output=True)
    archives = sandbox.root / "var/cache/apt/archives"
    archives.mkdir(parents=True)
    shutil.copyfile(epoch_deb, archives / "c_1%3a1.0_all.deb")  # apt's name for it
    plan = sandbox.plan(2, [make_deb(sandbox.debs, "c", "1:2.0")], healthcheck="exit 1")
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    assert previous == {"c": "1:1.0"}
    with pytest.raises(ApplyError):
        installer.apply(plan)
    assert installer.rollback(plan, previous) == ()
    assert sandbox.installed() == {"c": "1:1.0"}


def test_cache_keeps_the_applied_and_the_previous_version(sandbox: Sandbox) -> None:
    installer = sandbox.installer()
    for version in (1, 2, 3):
        plan = sandbox.plan(version, [sandbox.deb("a", f"{version}.0")])
        installer.apply(plan)
        installer.cache_debs(plan)
    cache = sandbox.config.state_dir / "debs"
    assert sorted(p.name for p in cache.iterdir()) == [  # each deb with its sha256
        "a_2.0_all.deb", "a_2.0_all.deb.sha256", "a_3.0_all.deb", "a_3.0_all.deb.sha256"]
    assert cache_name("a", "1:2.0", "all") == "a_1%3a2.0_all.deb"


# --- crashes and recovery -----------------------------------------------------------------


def test_recover_configures_unpacked_packages_and_runs_the_script(sandbox: Sandbox) -> None:
    sandbox.install_v1()
    plan = _v2(sandbox)
    previous = sandbox.installer().snapshot(plan)
    # A power cut between dpkg's unpack and configure phases, before the run script.
    subprocess.run(dpkg_command(sandbox.root, "--unpack", *(str(plan.workdir / d.filename)
                                                          for d in plan.debs)),
                   check=True, capture_output=True)
    assert sandbox.installed() == {"a": "2.0 iU", "b": "1.0 iU"}
    assert sandbox.installer().recover(plan, previous) == HEALTHY
    assert sandbox.installed() == {"a": "2.0", "b": "1.0"}
    assert f"run 2 {plan.workdir}" in sandbox.lines()


@pytest.mark.parametrize("killed", ["a", "b"])
def test_dpkg_killed_in_a_preinst_is_rolled_back_from_the_cache(sandbox: Sandbox,
                                                                 killed: str) -> None:
    sandbox.install_v1()
    kill = {"preinst": "kill -9 $PPID\n"}  # the maintainer script's parent is dpkg
    debs = [sandbox.deb("a", "2.0", **(kill if killed == "a" else {})),
            sandbox.deb("b", "1.0", **(kill if killed == "b" else {}))]
    plan = sandbox.plan(2, debs, run=f"echo run >> {sandbox.log}")
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    with pytest.raises(ApplyError, match=r"dpkg failed \(killed by signal 9\)"):
        installer.apply(plan)
    assert "iHR" in sandbox.installed()[killed]  # half-installed, reinstall required

    assert installer.recover(plan, previous) == INTERRUPTED  # --configure -a cannot fix it
    assert installer.rollback(plan, previous) == ()
    assert sandbox.installed() == {"a": "1.0"}
    assert "run" not in sandbox.lines()


_CHILD = """
import pickle, sys
from opq_box_updater.errors import ApplyError
from opq_box_updater.installer import Installer
config, plan, previous = pickle.loads(open(sys.argv[1], "rb").read())
installer = Installer(config)
try:
    installer.apply(plan)
except ApplyError:
    installer.rollback(plan, previous)
"""


def _crash(sandbox: Sandbox, plan: UpdatePlan, previous: Mapping[str, str | None],
           fault: str | None) -> subprocess.CompletedProcess[str]:
    """Apply ``plan`` (rolling back on failure) in a child killed at fault point ``fault``."""
    args = sandbox.base / "child.pickle"
    args.write_bytes(pickle.dumps((sandbox.config, plan, dict(previous))))
    env = {**os.environ, **({FAULT_ENV: fault} if fault else {})}
    return subprocess.run([sys.executable, "-c", _CHILD, str(args)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("fault", "committed"), [
    ("before-dpkg", INTERRUPTED), ("after-dpkg", HEALTHY), ("before-health", HEALTHY)])
def test_killed_at_a_fault_point_then_recover_converges(sandbox: Sandbox, fault: str,
                                                        committed: str) -> None:
    sandbox.install_v1()
    plan = _v2(sandbox)
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    proc = _crash(sandbox, plan, previous, fault)
    assert proc.returncode == -9, proc.stderr

    assert installer.recover(plan, previous) == committed
    if committed == HEALTHY:
        assert sandbox.installed() == {"a": "2.0", "b": "1.0"}
        assert sum(line.startswith("run") for line in sandbox.lines()) == 1  # not run twice
    else:
        assert installer.rollback(plan, previous) == ()
        assert sandbox.installed() == {"a": "1.0"}


def test_killed_in_the_middle_of_a_rollback_then_rollback_again(sandbox: Sandbox) -> None:
    sandbox.install_v1()
    plan = _v2(sandbox, healthcheck="exit 1")
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    proc = _crash(sandbox, plan, previous, "rollback-after-purge")
    assert proc.returncode == -9, proc.stderr
    assert sandbox.installed() == {"a": "2.0"}  # b purged, a not yet downgraded
    assert installer.rollback(plan, previous) == ()  # the next run rolls back again
    assert sandbox.installed() == {"a": "1.0"}


def test_updater_killed_by_a_postinst_then_recover_converges(sandbox: Sandbox) -> None:
    """The updater (dpkg's parent) dies mid-dpkg; dpkg may die of SIGPIPE or finish."""
    sandbox.install_v1()
    # Only once: were the postinst run again by recover(), its dpkg's parent would be pytest.
    marker = sandbox.base / "killed-once"
    kill_updater = (f"[ -e {marker} ] || {{ touch {marker}; "
                    "kill -9 $(awk '{print $4}' /proc/$PPID/stat); }\n")
    plan = _v2(sandbox, postinst_b=kill_updater)
    installer = sandbox.installer(lock_timeout=30, lock_poll=0.1)
    previous = installer.snapshot(plan)
    assert _crash(sandbox, plan, previous, None).returncode == -9
    if installer.recover(plan, previous) == HEALTHY:  # waits for an orphaned dpkg's lock
        assert sandbox.installed() == {"a": "2.0", "b": "1.0"}
    else:
        assert installer.rollback(plan, previous) == ()
        assert sandbox.installed() == {"a": "1.0"}


def test_recover_refuses_a_run_script_cut_off_midway(sandbox: Sandbox) -> None:
    sandbox.install_v1()
    plan = _v2(sandbox)
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    installer.apply(plan)
    plan.status_file.write_text('{"state": "started", "returncode": null, "detail": ""}')
    assert installer.recover(plan, previous) == INTERRUPTED


def test_recover_says_failed_when_the_release_failed_by_itself(sandbox: Sandbox) -> None:
    """A fully installed update whose run script finished non-zero, or whose health check
    fails, failed by itself: the power cut is not to blame and the release is not retried."""
    sandbox.install_v1()
    plan = _v2(sandbox)
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    installer.apply(plan)
    plan.status_file.write_text('{"state": "finished", "returncode": 1, "detail": ""}')
    assert installer.recover(plan, previous) == FAILED
    unhealthy = _v2(sandbox, healthcheck="exit 1")  # the same debs, now installed
    assert installer.recover(unhealthy, previous) == FAILED


# --- the dpkg frontend lock ---------------------------------------------------------------


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Hold dpkg's frontend lock (fcntl, as apt does) from another process."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX);"
            " print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_frontend_lock_is_waited_for(sandbox: Sandbox) -> None:
    holder = _hold_lock(sandbox.root / "var/lib/dpkg/lock-frontend", 1.5)
    plan = sandbox.plan(1, [sandbox.deb("a", "1.0")])
    started = time.monotonic()
    sandbox.installer(lock_timeout=30, lock_poll=0.1).apply(plan)
    assert time.monotonic() - started >= 1.0
    assert holder.wait(timeout=10) == 0
    assert sandbox.installed() == {"a": "1.0"}


def test_a_frontend_lock_held_too_long_is_a_clear_error(sandbox: Sandbox) -> None:
    holder = _hold_lock(sandbox.root / "var/lib/dpkg/lock-frontend", 30)
    try:
        plan = sandbox.plan(1, [sandbox.deb("a", "1.0")])
        with pytest.raises(DpkgBusyError, match=f"held by pid {holder.pid} for more than 1s"):
            sandbox.installer(lock_timeout=1, lock_poll=0.1).apply(plan)
    finally:
        holder.kill()
        holder.wait()
    assert sandbox.installed() == {}


# --- installer "apt" ----------------------------------------------------------------------


@pytest.fixture
def apt_sandbox(sandbox: Sandbox) -> Sandbox:
    require_tool("apt-get")
    sandbox.config = sandbox.config._replace(installer="apt")
    return sandbox


def test_apt_installs_in_the_sandbox_with_hooks_and_run_script(apt_sandbox: Sandbox) -> None:
    sandbox = apt_sandbox
    sandbox.install_v1()
    sandbox.logging_hooks()
    plan = _v2(sandbox)
    installer = sandbox.installer()
    cmd = installer.describe(plan)[1]
    assert cmd.startswith(f"APT_CONFIG={plan.workdir}/.opq-apt.conf apt-get install --yes")
    assert "-o 'DPkg::Pre-Invoke::=run-parts --exit-on-error" in cmd
    installer.pre_update(plan)
    installer.apply(plan)
    installer.post_update(plan)
    assert sandbox.installed() == {"a": "2.0", "b": "1.0"}
    assert sandbox.lines() == [
        "pre-update", "pre-invoke", "postinst a 2.0", "postinst b 1.0",
        f"run 2 {plan.workdir}", "post-invoke", "healthcheck", "health", "post-update"]


def test_apt_run_script_failure_is_rolled_back(apt_sandbox: Sandbox) -> None:
    sandbox = apt_sandbox
    sandbox.install_v1()
    plan = _v2(sandbox, run="exit 4")
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    with pytest.raises(ApplyError, match=r"run script update.sh failed \(exit status 4\)"):
        installer.apply(plan)
    assert installer.rollback(plan, previous) == ()
    assert sandbox.installed() == {"a": "1.0"}


def test_a_hook_that_blocks_the_rollback_is_bypassed(sandbox: Sandbox,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    sandbox.install_v1()
    plan = _v2(sandbox, healthcheck="exit 1")
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    with pytest.raises(ApplyError, match="health check"):
        installer.apply(plan)
    sandbox.hook("pre-invoke.d", "50-fail", "exit 1")  # say, a remount that now fails
    with caplog.at_level(logging.WARNING, logger="opq_box_updater.installer"):
        assert installer.rollback(plan, previous) == ()
    assert "retrying without them" in caplog.text
    assert sandbox.installed() == {"a": "1.0"}


# --- the guard on its own -----------------------------------------------------------------


def _guard(sandbox: Sandbox, workdir: Path, *expect: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-P", "-m", "opq_box_updater.guard", "--dpkg-root",
           str(sandbox.root), "--status-file", str(workdir / "status.json"), "--workdir",
           str(workdir), *(arg for e in expect for arg in ("--expect", e)),
           str(workdir / "update.sh")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("expect", "runs"), [
    (("a=1.0",), True), (("a=2.0",), False), (("a=1.0", "zz=1"), False), ((), True)])
def test_guard_runs_the_script_only_when_every_package_is_installed(
        sandbox: Sandbox, expect: tuple[str, ...], runs: bool) -> None:
    sandbox.install_v1()
    workdir = sandbox.base / "work"
    workdir.mkdir()
    (workdir / "update.sh").write_text(f"#!/bin/sh\npwd >> {sandbox.log}\nexit 7\n")
    (workdir / "update.sh").chmod(0o700)
    proc = _guard(sandbox, workdir, *expect)
    status = read_status(workdir / "status.json")
    assert status is not None
    if runs:
        assert proc.returncode == 7  # so that dpkg fails too
        assert sandbox.lines() == [str(workdir)]
        assert (status.state, status.returncode) == ("finished", 7)
    else:
        assert proc.returncode == 0
        assert sandbox.lines() == []
        assert status.state == "skipped" and "not running update.sh" in proc.stdout


def test_leftover_conffiles_of_a_removed_package_survive_a_rollback(sandbox: Sandbox) -> None:
    """A package removed but not purged (``rc``) counts as not installed, yet a rollback of
    an update that never touched it must not purge the admin's configuration."""
    sandbox.install_v1()
    old_b = make_deb(sandbox.debs, "b", "0.9", files={"etc/b.conf": "admin's\n"},
                     control_files={"conffiles": "/etc/b.conf\n"})
    subprocess.run(dpkg_command(sandbox.root, "-i", str(old_b)), check=True,
                   capture_output=True)
    subprocess.run(dpkg_command(sandbox.root, "--remove", "b"), check=True, capture_output=True)
    sandbox.hook("pre-invoke.d", "50-fail", "exit 1")
    plan = _v2(sandbox)
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    assert previous == {"a": "1.0", "b": None}
    with pytest.raises(ApplyError, match="pre-invoke"):
        installer.apply(plan)
    assert installer.rollback(plan, previous) == ()
    assert sandbox.installed() == {"a": "1.0", "b": "0.9 rc"}
    assert (sandbox.root / "etc/b.conf").read_text() == "admin's\n"
