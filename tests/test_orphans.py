"""Children of an updater that was itself SIGKILLed (issue 12 item 2, follow-up).

Every child that can change the box has its session recorded (``<state_dir>/sessions``,
:mod:`opq_box_updater.sessions`) before it may run; the next run stops what is left of
those sessions, after taking the lock and before crash recovery, and a recorded pid that now
belongs to another process is never signalled. Real processes throughout: the kernel's
``/proc`` is not mocked. The end-to-end tests SIGKILL a real ``opq-box-updater run`` while
its run script (or a hook after it) runs, with dpkg in a temporary root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PY
from test_apply_e2e import APPLY_FAILED, OK, World, install_v1, publish_v2, world
from test_runner import _alive, _wait_gone, as_subreaper, pids

from opq_box_updater import procs, runner
from opq_box_updater.errors import SubprocessError
from opq_box_updater.sessions import SESSIONS_DIRNAME, SessionRecords, boot_id

__all__ = ["pids", "world"]  # fixtures, shared with test_runner and test_apply_e2e

UPDATE_AVAILABLE = 100
OLD = {"alpha": "1.0"}
NEW = {"alpha": "2.0", "beta": "1.0"}


class Recorder:
    """A recorder that notes what the runner asks, and what the child was at that moment."""

    def __init__(self, fail: bool = False, fail_remove: bool = False) -> None:
        self.added: dict[int, int] = {}
        self.removed: list[int] = []
        self.cmdline_at_add: dict[int, bytes] = {}
        self.fail = fail
        self.fail_remove = fail_remove

    def add(self, sid: int, start: int) -> None:
        with contextlib.suppress(OSError):  # a leader that is gone has none
            self.cmdline_at_add[sid] = Path(f"/proc/{sid}/cmdline").read_bytes()
        if self.fail:
            raise OSError(28, "No space left on device")
        self.added[sid] = start

    def remove(self, sid: int) -> None:
        if self.fail_remove:
            raise OSError(30, "Read-only file system")
        self.removed.append(sid)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    runner.record_sessions(rec)
    try:
        yield rec
    finally:
        runner.record_sessions(None)


def _start(pid: int) -> int:
    proc = procs.read_stat(pid)
    assert proc is not None
    return proc.start


def _read_pid(path: Path, seconds: float = 30) -> int:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    return int(path.read_text().split()[0])


# --- the record is written before the child runs, and goes when its session is done ------


def test_the_session_is_recorded_before_the_program_runs_and_forgotten_after(
        recorder: Recorder) -> None:
    """When the record is written the child is still the gate (``sh`` waiting), not the
    program: a SIGKILL of the updater at any instant leaves no unrecorded child."""
    result = runner.run([sys.executable, "-c", "import os; print(os.getsid(0))"])
    sid = int(result.output)
    assert recorder.cmdline_at_add[sid].split(b"\0")[:2] == [b"/bin/sh", b"-c"]
    assert recorder.added[sid] > 0 and recorder.removed == [sid]


def test_a_session_with_leftovers_stays_recorded(recorder: Recorder, pids: list[int]) -> None:
    """``sleep 30 &`` outlives the step: its session stays recorded until the run ends."""
    result = runner.run(["sh", "-c", "sleep 30 & echo $!"])
    pids.append(int(result.output))
    assert list(recorder.added) != [] and recorder.removed == []


@pytest.fixture
def reaper() -> Iterator[None]:
    """The test process is a child subreaper, as ``opq-box-updater`` makes itself."""
    yield from as_subreaper()


def test_the_sessions_a_leftover_made_are_recorded_too(
        recorder: Recorder, pids: list[int], tmp_path: Path, reaper: None) -> None:
    """``setsid sleep 30 &`` leaves the step's session: its own session is recorded with
    its leader's start time (the subreaper's view; the runner reports it as a leftover)."""
    pidfile = tmp_path / "pid"
    runner.run(["sh", "-c", f"setsid sleep 30 & echo $! > {pidfile}; "
                "until [ \"$(cat /proc/$!/comm)\" = sleep ]; do sleep 0.01; done"])
    pid = _read_pid(pidfile)
    pids.append(pid)
    assert recorder.added.get(pid) == _start(pid)


def test_a_leftover_session_whose_leader_is_gone_is_recorded_with_its_oldest_member(
        recorder: Recorder, pids: list[int], tmp_path: Path, reaper: None) -> None:
    """The leader of the session a leftover made has exited: the record carries the start
    time of the oldest process still in it, which any later holder of the pid postdates."""
    pidfile = tmp_path / "pid"
    runner.run(["sh", "-c", f"setsid sh -c 'sleep 30 & echo $! > {pidfile}'; "
                f"until [ -s {pidfile} ]; do sleep 0.01; done"])
    member = _read_pid(pidfile)
    pids.append(member)
    sid = os.getsid(member)
    assert not _alive(sid)
    assert recorder.added.get(sid) == _start(member)


def test_the_gate_runs_nothing_when_the_updater_died_before_recording(tmp_path: Path) -> None:
    """End of file on the gate (the updater was killed before the record was written):
    the program is never run."""
    proc = subprocess.run([*runner._GATE, "touch", str(tmp_path / "ran")],
                          stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.returncode == runner.GATE_NOT_OPENED
    assert not (tmp_path / "ran").exists()


def test_a_file_without_shebang_still_fails_to_execute(recorder: Recorder,
                                                       tmp_path: Path) -> None:
    """``sh``'s exec would run it as a shell script; it is started directly instead, and
    fails as it always did."""
    script = tmp_path / "no-shebang"
    script.write_text(f"touch {tmp_path / 'ran'}\n")
    script.chmod(0o755)
    with pytest.raises(SubprocessError, match="Exec format error"):
        runner.run([script])
    assert not (tmp_path / "ran").exists()


def test_a_fifo_named_as_the_program_fails_without_hanging(recorder: Recorder,
                                                           tmp_path: Path) -> None:
    """Deciding whether to gate reads the program's first bytes: never from a FIFO, which
    would block the updater until someone writes to it."""
    fifo = tmp_path / "program"
    os.mkfifo(fifo, 0o755)
    raised: list[BaseException] = []

    def start() -> None:
        try:
            runner.run([fifo])
        except SubprocessError as exc:
            raised.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive()
    assert raised and "cannot run" in str(raised[0])


def test_a_child_that_cannot_start_leaks_no_gate(recorder: Recorder, tmp_path: Path) -> None:
    """Popen fails (here: a missing working directory) after the gate's pipe was made:
    both ends are closed, so a long-lived updater does not run out of descriptors."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(SubprocessError, match="cannot run true"):
            runner.run(["true"], cwd=tmp_path / "missing")
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_record_that_cannot_be_written_or_removed_lets_the_child_run(
        caplog: pytest.LogCaptureFixture) -> None:
    """A full or read-only disk costs the record, with a warning; the step still runs."""
    runner.record_sessions(Recorder(fail=True, fail_remove=True))
    try:
        assert runner.run(["echo", "ran"]).output == "ran\n"
    finally:
        runner.record_sessions(None)
    assert "cannot record the session of echo" in caplog.text
    assert "cannot remove the record of session" in caplog.text


def test_a_step_that_timed_out_is_forgotten_once_its_session_is_stopped(
        recorder: Recorder) -> None:
    with pytest.raises(SubprocessError, match="timed out"):
        runner.run(["sh", "-c", "sleep 30 & exec sleep 30"], timeout=0.5, grace=2)
    [sid] = recorder.added
    assert recorder.removed == [sid] and procs.session_members(sid) == []


def test_without_a_boot_id_or_a_directory_nothing_is_trusted_or_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No boot id from the kernel: "" (the updater acts on no record then); no records
    directory: no records (the daily no-op's one listdir)."""
    from opq_box_updater import sessions

    monkeypatch.setattr(sessions, "BOOT_ID_PATH", tmp_path / "no-boot-id")
    assert boot_id() == ""
    assert SessionRecords(tmp_path / "missing").load() == []


def test_records_are_atomic_files_and_survive_a_reload(tmp_path: Path) -> None:
    records = SessionRecords(tmp_path / SESSIONS_DIRNAME)
    records.add(4321, 99)
    path = tmp_path / SESSIONS_DIRNAME / "4321.json"
    assert json.loads(path.read_bytes()) == {"sid": 4321, "start": 99, "boot_id": boot_id()}
    assert path.stat().st_mode & 0o777 == 0o600
    assert records.load() == [(4321, 99, boot_id())]
    records.remove(4321)
    records.remove(4321)  # gone already: fine
    assert records.load() == []


# --- damaged records ----------------------------------------------------------------------

DAMAGED = {
    "not-json": b"{\"sid\": 12",
    "not-an-object": b"[12, 1, \"x\"]",
    "missing-field": b'{"sid": 12, "start": 1}',
    "extra-field": b'{"sid": 12, "start": 1, "boot_id": "x", "pid": 3}',
    "other-sid": b'{"sid": 13, "start": 1, "boot_id": "x"}',
    "sid-as-bool": b'{"sid": true, "start": 1, "boot_id": "x"}',
    "start-as-float": b'{"sid": 12, "start": 1.0, "boot_id": "x"}',
    "negative-start": b'{"sid": 12, "start": -1, "boot_id": "x"}',
    "boot-id-number": b'{"sid": 12, "start": 1, "boot_id": 7}',
    "not-utf8": b'{"sid": 12, "start": 1, "boot_id": "\xff"}',
    "deep": b"[" * 1500 + b"]" * 1500,
    "too-long": b'{"sid": 12, "start": 1, "boot_id": "' + b"x" * 5000 + b'"}',
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_record_is_moved_aside_like_a_damaged_state_file(
        tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    records = SessionRecords(tmp_path)
    records.add(77, 5)
    (tmp_path / "12.json").write_bytes(content)
    assert records.load() == [(77, 5, boot_id())]
    assert records.load() == [(77, 5, boot_id())]  # the moved-aside one is not read again
    assert not (tmp_path / "12.json").exists()
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("12.json.corrupt-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == content
    assert "session record" in caplog.text and "is damaged" in caplog.text
    records.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == aside  # kept for the admin


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "sid-one"])
def test_a_record_that_is_no_regular_file_is_not_followed(tmp_path: Path, kind: str) -> None:
    """A link (to a record elsewhere, or /dev/zero), a FIFO (would block) or a directory
    is damaged, not read; sid 1 (init) is never a recorded session."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"sid": 12, "start": 1, "boot_id": "x"}')
    records = SessionRecords(tmp_path / "sessions")
    records.dir.mkdir()
    path = records.dir / ("1.json" if kind == "sid-one" else "12.json")
    if kind == "symlink":
        path.symlink_to(elsewhere)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text('{"sid": 1, "start": 1, "boot_id": "x"}')
    assert records.load() == []
    assert not os.path.lexists(path)


# --- stopping what a killed run left: only its own sessions -----------------------------

#: A session of three: the leader (sh), a member (sleep), and the leader's child that made a
#: session of its own (setsid sleep; ignoring SIGTERM when argv[2] says so); pids written to
#: argv[1] as "leader member detached".
SESSION = """
sleep 60 & member=$!
if [ "$2" = stubborn ]; then setsid sh -c 'trap "" TERM; exec sleep 60' & detached=$!
else setsid sleep 60 & detached=$!; fi
echo "$$ $member $detached" > "$1"
exec sleep 60
"""


def _session(tmp_path: Path, pids: list[int], how: str = "") -> list[int]:
    """Start :data:`SESSION` in a new session; its pids, leader first."""
    out = tmp_path / "session.pids"
    subprocess.Popen(["sh", "-c", SESSION, "sh", str(out), how], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (out.exists() and len(out.read_text().split()) == 3):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    found = [int(p) for p in out.read_text().split()]
    pids.extend(found)
    # each has become sleep (and the detached one has left the session): no race with exec
    while not all(Path(f"/proc/{pid}/comm").read_text() == "sleep\n" for pid in found):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return found


@pytest.mark.parametrize("how", ["", "stubborn"])
def test_a_recorded_session_is_stopped_with_what_it_detached(
        tmp_path: Path, pids: list[int], caplog: pytest.LogCaptureFixture, how: str) -> None:
    """Also when the detached process ignores SIGTERM: its parent (the leader) is gone by
    the time SIGKILL comes, so only its session, learnt in the first round, still finds
    it."""
    leader, member, detached = _session(tmp_path, pids, how)
    stopped = procs.stop_sessions([(leader, _start(leader))], grace=1)
    assert all(_wait_gone(pid) for pid in (leader, member, detached))
    assert sorted(stopped) == sorted(f"{pid} (sleep)" for pid in (leader, member, detached))
    for pid in (leader, member, detached):  # one line per process: pid, command name
        assert f"stopping pid {pid} (sleep), left running by a run that was killed" \
            in caplog.text


def test_a_session_whose_leader_is_gone_is_stopped(tmp_path: Path, pids: list[int]) -> None:
    """The leader exited; a pid stays reserved while it names a session, so what is left in
    it is the recorded session's."""
    out = tmp_path / "member.pid"
    leader = subprocess.Popen(["sh", "-c", f"sleep 60 & echo $! > {out}"],
                              start_new_session=True)
    leader.wait()
    member = _read_pid(out)
    pids.append(member)
    assert os.getsid(member) == leader.pid
    procs.stop_sessions([(leader.pid, 12345)], grace=5)
    assert _wait_gone(member)


def test_a_recorded_pid_reused_by_another_process_is_not_touched(
        tmp_path: Path, pids: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """The recorded leader's pid now belongs to a process with another start time (pid
    reuse): that process, and the session it leads with its member, are a stranger's."""
    caplog.set_level(logging.INFO, logger="opq_box_updater.procs")
    leader, member, detached = _session(tmp_path, pids)
    assert procs.stop_sessions([(leader, _start(leader) - 1)], grace=1) == []
    time.sleep(0.2)
    assert all(_alive(pid) for pid in (leader, member, detached))
    assert f"session {leader} is not the recorded one" in caplog.text


def test_the_updater_never_stops_its_own_session(tmp_path: Path) -> None:
    """A record naming the updater's own session (a forged record) stops nothing of it,
    neither the updater nor another process in its session: run in a session of its own,
    which would otherwise kill its ``sleep``."""
    code = ("import os, subprocess; from opq_box_updater import procs; "
            "other = subprocess.Popen(['sleep', '60']); "
            "sid = os.getsid(0); start = procs.read_stat(sid).start; "
            "print(procs.stop_sessions([(sid, start)], grace=1)); "
            "print(other.poll()); other.kill()")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert proc.stdout.splitlines() == ["[]", "None"], proc.stderr


# --- end to end: a real updater SIGKILLed mid-apply, then the next run ------------------

#: Appends a line to argv-less file MARK every 0.1 s, in the background, output detached;
#: its pid goes to MARK.pid so the test can clean up whatever happens.
MARKER = ("sh -c 'echo $$ > {mark}.pid; while :; do echo x >> {mark}; sleep 0.1; done' "
          ">/dev/null 2>&1 &")


def _grows(path: Path, seconds: float = 30) -> bool:
    """True once ``path`` grows within ``seconds``."""
    size = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.15)
        if path.exists() and path.stat().st_size > size:
            return True
    return False


def _kill_updater_when(w: World, ready: Path) -> None:
    """Start ``opq-box-updater run``; SIGKILL it (as the OOM killer would) once ``ready``
    exists."""
    first = subprocess.Popen(
        [PY, "-m", "opq_box_updater.cli", "--config", str(w.box.config_path), "run"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None, "the updater ended before it was killed"
            assert time.monotonic() < deadline, "the updater never got there"
            time.sleep(0.05)
    finally:
        first.kill()
        first.wait()


@pytest.fixture
def marker(world: World) -> Iterator[Path]:
    """The marker file; its writer is SIGKILLed afterwards should a test fail."""
    mark = world.tmp / "mark"
    yield mark
    pidfile = Path(f"{mark}.pid")
    if pidfile.exists() and _alive(int(pidfile.read_text())):
        os.killpg(os.getsid(int(pidfile.read_text())), signal.SIGKILL)


def _assert_stopped(mark: Path, w: World) -> None:
    """The marker's writer is gone (the file stopped growing) and the log names it."""
    assert not _alive(int(Path(f"{mark}.pid").read_text()))
    assert not _grows(mark, seconds=0.5)
    log = w.box.log_file.read_text()
    assert "left running by a run that was killed" in log
    assert "stopped" in log and "process(es) a killed run had left running" in log
    assert list((w.box.state_dir / SESSIONS_DIRNAME).glob("*.json")) == []


def test_a_killed_updater_s_run_script_child_is_stopped_before_the_rollback(
        world: World, marker: Path) -> None:
    """The brief's case: ``kill -9`` of the updater while its run script runs and has a
    child writing in the background. Without the records both keep working on the box
    while the next run's recovery rolls it back."""
    w, mark = world, marker
    install_v1(w)
    ready = w.tmp / "ready"
    publish_v2(w, run=f"{MARKER.format(mark=mark)}\ntouch {ready}\nexec sleep 300")
    _kill_updater_when(w, ready)
    assert _grows(mark), "the orphaned child should still be writing"
    proc = w.run("run", expect=APPLY_FAILED)
    assert "interruption 1 of 3" in proc.stderr, proc.stderr
    w.assert_clean(OLD)
    _assert_stopped(mark, w)
    status = w.box.status()
    assert any(line.endswith(" (sleep)") for line in status["leftovers_killed"]), status
    writer = int(Path(f"{mark}.pid").read_text())
    assert f"{writer} (sh)" in status["leftovers_killed"]
    text = w.run("status", expect=OK).stdout
    assert "leftovers killed:" in text and f"{writer} (sh)" in text


def test_a_run_script_daemon_recorded_by_the_guard_is_stopped_after_the_guard_ended(
        world: World, marker: Path) -> None:
    """The run script started the writer and exited 0; the guard ended; the updater is
    killed while a post-invoke.d hook runs. The writer is no longer below dpkg's session
    (it was re-parented to the killed updater, then to init): only the guard's record of
    the run script's session, kept because of it, finds it. The recovery then commits."""
    w, mark = world, marker
    install_v1(w)
    ready = w.tmp / "ready"
    w.hook("post-invoke.d", "50-slow",
           f"if [ ! -e {ready} ] && [ -s {mark} ]; then touch {ready}; exec sleep 300; fi")
    publish_v2(w, run=MARKER.format(mark=mark))
    _kill_updater_when(w, ready)
    assert _grows(mark), "the orphaned child should still be writing"
    w.run("run", expect=OK)
    w.assert_clean(NEW)
    _assert_stopped(mark, w)


# --- end to end: records the next run must not act on ------------------------------------


def _plant(w: World, name: str, doc: dict[str, object] | bytes) -> Path:
    directory = w.box.state_dir / SESSIONS_DIRNAME
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return path


def test_a_record_of_another_boot_is_dropped_and_a_damaged_one_moved_aside(
        world: World, pids: list[int]) -> None:
    """A live session recorded with the right start time but another boot id is not
    touched (after a reboot the pid is someone else's, whatever its start time); a damaged
    record is moved aside; the run goes on (exit 100: an update is available)."""
    w = world
    w.publish(1)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pids.append(stranger.pid)
    other_boot = _plant(w, f"{stranger.pid}.json", {"sid": stranger.pid,
                                                    "start": _start(stranger.pid),
                                                    "boot_id": "0" * 8 + "-other-boot"})
    damaged = _plant(w, "99999.json", b"\0garbage")
    proc = w.run("check", expect=UPDATE_AVAILABLE)
    assert _alive(stranger.pid)
    assert not other_boot.exists() and not damaged.exists()
    assert len(list(damaged.parent.glob("99999.json.corrupt-*"))) == 1
    log = w.box.log_file.read_text()
    assert "dropped 1 session record(s) of an earlier boot" in log
    assert "session record" in log and "is damaged" in log
    assert "Traceback" not in proc.stderr and w.box.status()["leftovers_killed"] == []


# --- when records are forgotten -----------------------------------------------------------


def test_a_daemon_a_successful_run_left_is_not_stopped_by_the_next_run(
        world: World, pids: list[int]) -> None:
    """A run that ends with its transaction over forgets its records: a daemon its run
    script started (the same policy as a postinst's service) keeps running."""
    w = world
    pidfile = w.tmp / "daemon.pid"
    w.publish(1, [w.deb("alpha", "1.0")], run=f"sleep 60 >/dev/null 2>&1 & echo $! > {pidfile}")
    w.run("run", expect=OK)
    daemon = _read_pid(pidfile)
    pids.append(daemon)
    assert list((w.box.state_dir / SESSIONS_DIRNAME).glob("*.json")) == []
    w.run("run", expect=OK)
    assert _alive(daemon)


@pytest.mark.parametrize("phase", ["applying", "rolling-back", "idle"])
def test_records_outlive_a_run_that_ended_mid_transaction(tmp_path: Path, phase: str) -> None:
    """A run that raised with the journal not idle keeps its records: the next run stops
    those leftovers before its recovery."""
    from opq_box_updater.config import Config
    from opq_box_updater.state import Journal, State, Store
    from opq_box_updater.updater import Updater

    config = Config(server_url="http://127.0.0.1:9/", state_dir=tmp_path / "state",
                    download_dir_path=tmp_path / "downloads", dpkg_root=tmp_path / "root")
    store = Store(config.state_dir)
    store.ensure_dirs()
    store.save(State(journal=Journal(phase=phase, target_version=2)))
    SessionRecords(store.sessions_dir).add(4321, 7)
    Updater(config)._forget_sessions()
    assert (store.sessions_dir / "4321.json").exists() == (phase != "idle")


def test_the_guard_records_the_run_scripts_session_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reaper: None) -> None:
    """The guard (in process) with ``OPQ_BOX_UPDATER_SESSIONS`` set: while the run script
    runs, its session (its own pid) is recorded there; once it ended, nothing is left."""
    from opq_box_updater import guard

    sessions = tmp_path / SESSIONS_DIRNAME
    out = tmp_path / "seen"
    script = tmp_path / "update.sh"
    script.write_text(f"#!/bin/sh\necho $$ > {out}; ls {sessions} >> {out}\n")
    script.chmod(0o700)
    monkeypatch.setenv("OPQ_BOX_UPDATER_SESSIONS", str(sessions))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert guard.main(["--status-file", str(tmp_path / "status"), "--workdir",
                           str(tmp_path), "--", str(script)]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
        runner.record_sessions(None)
    pid, *listed = out.read_text().split()
    assert listed == [f"{pid}.json"]
    assert list(sessions.iterdir()) == []
