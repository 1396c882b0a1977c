"""A killed updater's session records after its transaction was over (follow-up to
``tests/test_orphans.py``): the next run must not stop what a committed (or rolled back)
apply started on purpose. A real ``opq-box-updater run`` is SIGKILLed, with dpkg in a
temporary root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from test_apply_e2e import OK, World, install_v1, publish_v2
from test_orphans import (
    MARKER,
    SESSIONS_DIRNAME,
    _grows,
    _kill_updater_when,
    _read_pid,
    marker,
    pids,
    world,
)
from test_runner import _alive

from opq_box_updater import procs
from opq_box_updater.sessions import boot_id

__all__ = ["marker", "pids", "world"]  # fixtures


def test_a_daemon_of_a_committed_release_survives_an_updater_killed_after_the_commit(
        world: World, marker: Path, pids: list[int]) -> None:
    """The run script starts a daemon and the release commits; the updater is SIGKILLed
    while a ``post-update.d`` hook hangs (a supervisor's timeout), before it could forget
    its records. The next run found them and stopped the committed release's daemon."""
    w, mark = world, marker
    install_v1(w)
    ready, hook_pid = w.tmp / "ready", w.tmp / "hook.pid"
    w.hook("post-update.d", "50-hang", f"echo $$ > {hook_pid}; touch {ready}; exec sleep 300")
    publish_v2(w, run=MARKER.format(mark=mark))
    _kill_updater_when(w, ready)
    pids.append(_read_pid(hook_pid))
    assert w.box.status()["installed_version"] == 2
    assert list((w.box.state_dir / SESSIONS_DIRNAME).glob("*.json")) != []
    w.run("run", expect=OK)
    assert _alive(int(Path(f"{mark}.pid").read_text())) and _grows(mark)
    log = w.box.log_file.read_text()
    assert "run killed after its transaction ended: what it left running stays" in log
    assert "left running by a run that was killed" not in log
    assert w.box.status()["leftovers_killed"] == []
    assert list((w.box.state_dir / SESSIONS_DIRNAME).glob("*.json")) == []


def test_an_updater_killed_in_a_postinst_has_the_postinst_and_its_daemon_stopped(
        world: World, marker: Path, pids: list[int]) -> None:
    """SIGKILL while beta's postinst hangs after starting a background writer: the next
    run stops both before its recovery (``dpkg --configure -a`` then runs the postinst
    again, which now returns) and commits."""
    w, mark = world, marker
    install_v1(w)
    ready, postinst_pid = w.tmp / "ready", w.tmp / "postinst.pid"
    hang = (f"if [ ! -e {ready} ]; then {MARKER.format(mark=mark)}\n"
            f"echo $$ > {postinst_pid}; touch {ready}; sleep 300; fi\n")
    publish_v2(w, beta={"postinst": hang})
    _kill_updater_when(w, ready)
    postinst = _read_pid(postinst_pid)
    pids.append(postinst)
    assert _alive(postinst) and _grows(mark)
    w.run("run", expect=OK)
    assert not _alive(postinst) and not _alive(int(Path(f"{mark}.pid").read_text()))
    assert not _grows(mark, seconds=0.5)
    w.assert_clean({"alpha": "2.0", "beta": "1.0"})
    assert "left running by a run that was killed" in w.box.log_file.read_text()


@pytest.mark.parametrize("kind", ["world-writable", "symlink"])
def test_a_sessions_directory_others_could_write_is_refused_and_nothing_stopped(
        tmp_path: Path, pids: list[int], kind: str) -> None:
    """Whoever can write ``<state_dir>/sessions`` could plant a record naming any live
    process with its true start time: the directory is checked like the rest of the state
    directory (exit 2, ConfigError), before any record is read."""
    from opq_box_updater.config import Config
    from opq_box_updater.errors import ConfigError
    from opq_box_updater.state import Store
    from opq_box_updater.updater import Updater

    config = Config(server_url="http://127.0.0.1:9/", state_dir=tmp_path / "state",
                    download_dir_path=tmp_path / "downloads", dpkg_root=tmp_path / "root")
    Store(config.state_dir).ensure_dirs()
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pids.append(victim.pid)
    sessions = config.state_dir / SESSIONS_DIRNAME
    if kind == "symlink":
        sessions.rmdir()
        (tmp_path / "elsewhere").mkdir()
        sessions.symlink_to(tmp_path / "elsewhere")
    else:
        sessions.chmod(0o777)
    start = procs.read_stat(victim.pid)
    assert start is not None
    record = sessions / f"{victim.pid}.json"
    record.write_text(json.dumps({"sid": victim.pid, "start": start.start,
                                  "boot_id": boot_id()}))
    with pytest.raises(ConfigError, match=r"state directory .*sessions"):
        Updater(config).run()
    assert victim.poll() is None and record.exists()


def test_a_pid_that_names_another_process_than_the_one_seen_is_not_signalled(
        pids: list[int]) -> None:
    """Between the pass over ``/proc`` and the signal, the process seen may end and its pid
    go to another: modelled by the start time seen differing from the live one. Neither
    the pid nor its process group is signalled; the process seen itself still is."""
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pids.append(victim.pid)
    seen = procs.read_stat(victim.pid)
    assert seen is not None
    procs._signal(dataclasses.replace(seen, start=seen.start - 1), signal.SIGKILL)
    with pytest.raises(subprocess.TimeoutExpired):
        victim.wait(timeout=1)
    procs._signal(seen, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL


def test_a_leftovers_hostile_command_name_reaches_the_log_and_status_escaped(
        tmp_path: Path, pids: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """A process names itself (its executable's file name becomes its ``comm``): one a
    release left behind must not drive the terminal of whoever reads the log or
    ``status``."""
    hostile = tmp_path / "\x1b]0;owned\x07\x1b[2J"
    hostile.symlink_to("/bin/sleep")
    victim = subprocess.Popen([str(hostile), "60"], start_new_session=True)
    pids.append(victim.pid)
    seen = procs.read_stat(victim.pid)
    assert seen is not None and seen.comm.startswith("\x1b]0;owned")  # the name took
    stopped = procs.stop_sessions([(victim.pid, seen.start)], grace=5)
    assert victim.wait(timeout=30) is not None
    assert stopped == [f"{victim.pid} (\\x1b]0;owned\\x07\\x1b[2J)"]
    assert "\\x1b]0;owned" in caplog.text and "\x1b" not in caplog.text
    assert "\x1b" not in procs.describe(os.getpid())
