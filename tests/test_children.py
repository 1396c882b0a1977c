"""What the installer starts, against real debs and dpkg in a temporary root (issue 12,
items 2 and 3): children are stopped as a group, a background daemon does not fail a step,
hooks must be root's, every child gets a minimal environment, the guard's status is durable.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from debs import init_dpkg_root, require_tool
from test_installer import HOOK_DIRS, Sandbox, _v2
from test_runner import DOUBLE_FORK, HOSTILE, _alive, _exists, _wait_gone, as_subreaper

from opq_box_updater import guard
from opq_box_updater.config import Config
from opq_box_updater.errors import ApplyError, PostponedError
from opq_box_updater.guard import RunStatus
from opq_box_updater.runner import SYSTEM_PATH


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    """The box of ``test_installer``: a dpkg root, hooks, state, in ``tmp_path``."""
    for tool in ("dpkg", "dpkg-deb", "dpkg-query", "run-parts"):
        require_tool(tool)
    config = Config(server_url="http://127.0.0.1:9/", dpkg_root=init_dpkg_root(tmp_path / "root"),
                    hooks_dir=tmp_path / "hooks", state_dir=tmp_path / "state",
                    download_dir_path=tmp_path / "downloads")
    config.hooks_dir.mkdir()
    return Sandbox(tmp_path, config)


@pytest.fixture
def reaper() -> Iterator[None]:
    """The test process is a child subreaper, as ``opq-box-updater`` makes itself."""
    yield from as_subreaper()


def _pid_from(path: Path) -> int:
    deadline = time.monotonic() + 60
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return int(path.read_text())


# --- process groups -------------------------------------------------------------------


def test_a_run_script_outliving_the_dpkg_timeout_is_stopped(sandbox: Sandbox) -> None:
    """dpkg times out while the guard waits for the run script: the script must not keep
    working on a box that is then rolled back."""
    pidfile = sandbox.base / "run.pid"
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0")],
                        run=f"echo $$ > {pidfile}; exec sleep 300")
    with pytest.raises(ApplyError, match="dpkg timed out after 3s"):
        sandbox.installer(timeout=3).apply(plan)
    assert _wait_gone(_pid_from(pidfile))


def test_a_hung_health_hook_is_stopped_with_its_children(sandbox: Sandbox) -> None:
    pidfile = sandbox.base / "health.pid"
    sandbox.hook("health.d", "10-hang", f"sleep 300 & echo $! > {pidfile}; wait")
    plan = sandbox.plan(2, [], run="true")
    with pytest.raises(ApplyError, match=r"a health\.d hook failed: run-parts timed out"):
        sandbox.installer(script_timeout=2).apply(plan)
    assert _wait_gone(_pid_from(pidfile))


@pytest.mark.parametrize("where", ["postinst", "run"])
def test_a_daemon_started_in_the_background_does_not_fail_the_step(
        sandbox: Sandbox, where: str, caplog: pytest.LogCaptureFixture) -> None:
    """``sleep 60 &`` keeps dpkg's (or the script's) output open for a minute; the step ends
    when the script exits, well within its 20 s timeout, and the daemon is reported."""
    pidfile = sandbox.base / "daemon.pid"
    daemon = f"sleep 60 & echo $! > {pidfile}\n"
    deb = sandbox.deb("a", "2.0", **({"postinst": daemon} if where == "postinst" else {}))
    plan = sandbox.plan(2, [deb], run=daemon if where == "run" else "true")
    try:
        sandbox.installer(timeout=20, script_timeout=20).apply(plan)
        pid = _pid_from(pidfile)
        assert sandbox.installed() == {"a": "2.0"}
        assert _alive(pid)
        if where == "postinst":
            assert f"left processes running: {pid} " in caplog.text  # sh or sleep: a race
        else:  # the guard reports it in dpkg's output
            status = guard.read_status(plan.status_file)
            assert status is not None and status.succeeded
            assert f"left running: {pid} " in status.detail
    finally:
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


# --- what leaves the session (the updater and the guard are child subreapers) ------------


def test_a_run_script_daemon_that_left_its_session_is_reported(
        sandbox: Sandbox, reaper: None, caplog: pytest.LogCaptureFixture) -> None:
    """``setsid sleep 60 &`` in the run script: the guard reports it with the script's
    output; when the guard exits it is re-parented to the updater, which reports it after
    dpkg. The step succeeds and the daemon keeps running (the same policy as in-session)."""
    pidfile = sandbox.base / "daemon.pid"
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0")],
                        run=f"setsid sleep 60 & echo $! > {pidfile}")
    sandbox.installer(timeout=20, script_timeout=20).apply(plan)
    pid = _pid_from(pidfile)
    try:
        assert sandbox.installed() == {"a": "2.0"}
        assert _alive(pid)
        status = guard.read_status(plan.status_file)
        assert status is not None and status.succeeded
        assert f"left running: {pid} " in status.detail
        assert f"left processes running: {pid} " in caplog.text  # the updater, after dpkg
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_detached_process_of_a_hook_that_times_out_is_stopped(
        sandbox: Sandbox, reaper: None) -> None:
    pidfile = sandbox.base / "detached.pid"
    sandbox.hook("health.d", "10-hang",
                 f"setsid -f sh -c 'echo $$ > {pidfile}; exec sleep 300'; sleep 300")
    plan = sandbox.plan(2, [], run="true")
    with pytest.raises(ApplyError, match=r"a health\.d hook failed: run-parts timed out"):
        sandbox.installer(script_timeout=2).apply(plan)
    pid = _pid_from(pidfile)
    assert _wait_gone(pid)
    assert not _exists(pid)  # and reaped: no zombie


def test_a_double_fork_daemon_of_the_run_script_goes_with_the_dpkg_timeout(
        sandbox: Sandbox, reaper: None) -> None:
    """The guard (SIGTERMed by the updater's timeout) stops the script's session and what
    the script detached; nothing of it survives on the box that is then rolled back."""
    pidfile = sandbox.base / "daemon.pid"
    run = f"{sys.executable} -c '{DOUBLE_FORK}' {pidfile} polite; exec sleep 300"
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0")], run=run)
    with pytest.raises(ApplyError, match="dpkg timed out after 3s"):
        sandbox.installer(timeout=3).apply(plan)
    pid = _pid_from(pidfile)
    assert _wait_gone(pid)
    assert not _exists(pid)


def test_a_daemon_the_failed_release_started_does_not_survive_the_rollback(
        sandbox: Sandbox, reaper: None) -> None:
    """dpkg succeeded, so the postinst's detached daemon was only reported; the health
    check then fails and the rollback stops it before restoring release 1."""
    sandbox.install_v1()
    pidfile = sandbox.base / "daemon.pid"
    daemon = f"setsid -f sh -c 'echo $$ > {pidfile}; exec sleep 300'\n"
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0", postinst=daemon)], run="true",
                        healthcheck="exit 1")
    installer = sandbox.installer()
    previous = installer.snapshot(plan)
    with pytest.raises(ApplyError, match=r"health check healthcheck\.sh failed"):
        installer.apply(plan)
    pid = _pid_from(pidfile)
    assert _alive(pid)  # a successful step's daemon is reported, not killed
    assert installer.rollback(plan, previous) == ()
    assert sandbox.installed() == {"a": "1.0"}
    assert _wait_gone(pid)
    assert not _exists(pid)


# --- hooks are root's -------------------------------------------------------------------


def _nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


def _hook_owned_by_nobody(s: Sandbox) -> None:
    os.chown(s.config.hooks_dir / "health.d" / "10-hook", _nobody(), -1)


def _hook_world_writable(s: Sandbox) -> None:
    (s.config.hooks_dir / "health.d" / "10-hook").chmod(0o777)


def _hook_group_writable(s: Sandbox) -> None:
    (s.config.hooks_dir / "health.d" / "10-hook").chmod(0o775)


def _directory_world_writable(s: Sandbox) -> None:
    (s.config.hooks_dir / "health.d").chmod(0o777)


def _directory_owned_by_nobody(s: Sandbox) -> None:
    os.chown(s.config.hooks_dir / "health.d", _nobody(), -1)


def _hooks_dir_world_writable(s: Sandbox) -> None:
    s.config.hooks_dir.chmod(0o777)


def _link_pointing_out(s: Sandbox) -> None:
    outside = s.base / "elsewhere"
    outside.write_text("#!/bin/sh\necho hook >> " + str(s.log) + "\n")
    outside.chmod(0o755)
    (s.config.hooks_dir / "health.d" / "20-link").symlink_to(outside)


def _link_to_a_writable_file_inside(s: Sandbox) -> None:
    target = s.config.hooks_dir / "shared"
    target.mkdir()
    (target / "hook").write_text("#!/bin/sh\n")
    (target / "hook").chmod(0o777)
    (s.config.hooks_dir / "health.d" / "20-link").symlink_to(target / "hook")


def _missing_directory_in_a_writable_hooks_dir(s: Sandbox) -> None:
    for name in HOOK_DIRS:
        for path in (s.config.hooks_dir / name).glob("*"):
            path.unlink()
        (s.config.hooks_dir / name).rmdir()
    s.config.hooks_dir.chmod(0o777)  # anyone could create pre-update.d


@pytest.mark.parametrize("make_unsafe", [
    _hook_owned_by_nobody, _hook_world_writable, _hook_group_writable,
    _directory_world_writable, _directory_owned_by_nobody, _hooks_dir_world_writable,
    _link_pointing_out, _link_to_a_writable_file_inside,
    _missing_directory_in_a_writable_hooks_dir,
], ids=lambda f: f.__name__.strip("_"))
def test_hooks_another_user_could_change_postpone_and_nothing_runs(
        sandbox: Sandbox, make_unsafe: object) -> None:
    sandbox.install_v1()
    sandbox.logging_hooks()
    for directory in HOOK_DIRS:
        sandbox.hook(directory, "10-hook", f"echo {directory} >> {sandbox.log}")
    assert callable(make_unsafe)
    make_unsafe(sandbox)
    plan = _v2(sandbox)
    with pytest.raises(PostponedError, match="not running hooks another user could change"):
        sandbox.installer().pre_update(plan)
    assert sandbox.lines() == []  # no hook ran, not even the safe pre-update.d one
    assert sandbox.installed() == {"a": "1.0"}


def test_safe_hooks_and_a_link_inside_hooks_dir_run(sandbox: Sandbox) -> None:
    sandbox.hook("pre-update.d", "10-log", f"echo pre-update >> {sandbox.log}")
    (sandbox.config.hooks_dir / "pre-update.d" / "20-link").symlink_to("10-log")
    notes = sandbox.config.hooks_dir / "pre-update.d" / "README.txt"  # run-parts ignores it
    notes.write_text("notes")
    os.chown(notes, _nobody(), -1)
    plan = sandbox.plan(2, [], run="true")
    sandbox.installer().pre_update(plan)
    assert sandbox.lines() == ["pre-update", "pre-update"]


# --- the environment --------------------------------------------------------------------


def test_every_child_gets_the_minimal_environment(sandbox: Sandbox,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of the updater's own environment reaches a maintainer script, hook, the run
    script or the health check; the updater's DEBIAN_FRONTEND wins. (dpkg's invoke hooks do
    see the updater's own ``DPKG_FRONTEND_LOCKED=1``: it holds that lock while dpkg runs.)"""
    for name, value in HOSTILE.items():
        monkeypatch.setenv(name, value)
    dump = sandbox.base / "env"
    dump.mkdir()
    record = f'env > {dump}/$(basename "$0")-$$\n'
    for directory in HOOK_DIRS:
        sandbox.hook(directory, directory[:-2], record)
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0", postinst=record)], run=record,
                        healthcheck=record, previous_version=1)
    installer = sandbox.installer()
    installer.pre_update(plan)
    installer.apply(plan)
    installer.post_update(plan)
    seen = {}
    for path in dump.iterdir():
        seen[path.name.rsplit("-", 1)[0]] = dict(
            line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    assert sorted(seen) == sorted(["a.postinst", "update.sh", "healthcheck.sh",
                                   *(d[:-2] for d in HOOK_DIRS)])
    for who, env in seen.items():
        leaked = {k for k in HOSTILE if k in env and env[k] == HOSTILE[k]}
        assert leaked == set(), (who, leaked)
        assert env["PATH"] == SYSTEM_PATH, who
        assert env["LC_ALL"] == "C.UTF-8", who
        assert (env["OPQ_UPDATE_VERSION"], env["OPQ_PREVIOUS_VERSION"], env["OPQ_UPDATE_DIR"],
                env["DPKG_ROOT"]) == ("2", "1", str(plan.workdir), str(sandbox.root)), who
        assert "PYTHONPATH" not in env and "BASH_ENV" not in env and "LD_PRELOAD" not in env
        assert "OPQ_BOX_UPDATER_FAULT" not in env, who
    assert seen["update.sh"].get("DEBIAN_FRONTEND") is None  # the guard passes on only OPQ_*
    assert seen["a.postinst"]["DEBIAN_FRONTEND"] == "noninteractive"
    assert seen["health"]["DEBIAN_FRONTEND"] == "noninteractive"


def test_the_guard_runs_isolated_from_python_variables(sandbox: Sandbox) -> None:
    plan = _v2(sandbox)
    line = sandbox.installer().commands.guard_command(plan)
    assert line.split()[1:4] == ["-I", "-m", "opq_box_updater.guard"]


# --- the guard's status file is durable --------------------------------------------------


def test_the_guard_status_survives_a_power_cut(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """After the rename, the directory is fsynced: without it a power cut may forget that
    the run script started, and recovery would run it a second time."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    guard.write_status(tmp_path / "status", RunStatus("started"))
    assert events == ["fsync-file", "rename", "fsync-dir"]
    assert guard.read_status(tmp_path / "status") == RunStatus("started")
