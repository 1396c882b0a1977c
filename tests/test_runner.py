"""The one subprocess wrapper (issue 12, items 2 and 3): children run in their own session,
a timeout stops the whole session (SIGTERM, grace, SIGKILL), a background daemon cannot turn
a finished step into a timeout, and children get a minimal environment.

No assertion on wall-clock durations beyond "well before the background sleep would end".
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opq_box_updater import procs, runner
from opq_box_updater.errors import SubprocessError

#: What must never reach a child, set in the updater's own environment.
HOSTILE = {"BASH_ENV": "/tmp/evil", "PYTHONPATH": "/tmp/evil", "PYTHONSTARTUP": "/tmp/evil",
           "LD_PRELOAD": "/tmp/evil.so", "OPQ_BOX_UPDATER_FAULT": "apply",
           "DPKG_FRONTEND_LOCKED": "inherited", "DEBIAN_FRONTEND": "readline",
           "APT_CONFIG": "/tmp/evil.conf", "PATH": "/tmp/evil-bin:/usr/bin:/bin"}


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


def _wait_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def as_subreaper() -> Iterator[None]:
    """Make the test process a child subreaper, as the updater's CLI and the guard make
    themselves; afterwards stop what tests left running and drop the flag."""
    assert procs.become_subreaper() and procs.is_subreaper()
    try:
        yield
    finally:
        procs.stop_leftovers(grace=1)
        ctypes.CDLL(None).prctl(procs.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def subreaper() -> Iterator[None]:
    yield from as_subreaper()


def _pid_in(path: Path, seconds: float = 30) -> int:
    """The pid a child wrote to ``path``, once it is there."""
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return int(path.read_text().split()[0])


def _exists(pid: int) -> bool:
    """True while ``/proc/PID`` exists: alive, or a zombie nobody reaped."""
    return Path(f"/proc/{pid}").exists()


#: A double-fork daemon (fork, setsid, fork, the first child exits): writes its pid to
#: argv[1] and sleeps; with argv[2] == "stubborn" it ignores SIGTERM.
DOUBLE_FORK = """
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        if sys.argv[2] == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(300)
    os._exit(0)
os.wait()
"""


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids a test started indirectly; killed afterwards whatever happened."""
    started: list[int] = []
    yield started
    for pid in started:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_each_child_leads_its_own_session() -> None:
    out = runner.run([sys.executable, "-c",
                      "import os; print(os.getsid(0) == os.getpid() == os.getpgid(0))"])
    assert out.output.strip() == "True"


def test_a_background_daemon_does_not_turn_success_into_a_timeout(
        tmp_path: Path, pids: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """A postinst or run script that starts ``sleep 40 &`` keeps the output open; the step
    ends when the script exits, and the daemon is reported, not killed."""
    pidfile = tmp_path / "daemon.pid"
    caplog.set_level(logging.WARNING, logger="opq_box_updater.runner")
    started = time.monotonic()
    result = runner.run(["sh", "-c", f"echo before; sleep 40 & echo $! > {pidfile}; "
                                     "echo after"], timeout=30)
    pids.append(int(pidfile.read_text()))
    assert time.monotonic() - started < 30  # the sleep would hold a pipe for 40s
    assert result.returncode == 0
    assert result.output.splitlines() == ["before", "after"]
    assert _alive(pids[0])  # a daemon is allowed to keep running
    # the daemon by pid (its command line is sh's or sleep's: it may not have exec'd yet)
    assert [line.split()[0] for line in result.leftovers] == [str(pids[0])]
    assert f"left processes running: {pids[0]} " in caplog.text


def test_a_timeout_stops_the_whole_session(tmp_path: Path, pids: list[int]) -> None:
    """A hung hook and what it started are gone after the timeout, not re-parented to init."""
    pidfile = tmp_path / "child.pid"
    with pytest.raises(SubprocessError, match="sh timed out after 1s") as info:
        runner.run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; echo waiting; wait"],
                   timeout=1, grace=5)
    pids.append(int(pidfile.read_text()))
    assert _wait_gone(pids[0])
    assert info.value.returncode is None
    assert info.value.output_tail == "waiting"


def test_what_ignores_sigterm_is_killed_after_the_grace_period_and_logged(
        tmp_path: Path, pids: list[int], caplog: pytest.LogCaptureFixture) -> None:
    pidfile = tmp_path / "child.pid"
    script = (f"trap '' TERM; {sys.executable} -c 'import time; time.sleep(300)' & "
              f"echo $! > {pidfile}; wait")
    caplog.set_level(logging.WARNING, logger="opq_box_updater.runner")
    with pytest.raises(SubprocessError, match="still alive after SIGTERM and killed") as info:
        runner.run(["sh", "-c", script], timeout=1, grace=0.5)
    pids.append(int(pidfile.read_text()))
    assert _wait_gone(pids[0])
    assert f"{pids[0]} {sys.executable} -c import time" in str(info.value)
    assert "still alive 0s after SIGTERM, killing" in caplog.text


def test_an_interrupted_wait_takes_the_children_along(tmp_path: Path, pids: list[int]) -> None:
    """The guard turns SIGTERM from the updater's timeout into an exception while it waits
    for the run script: the run script's session must go too."""
    pidfile = tmp_path / "child.pid"
    code = ("import signal, sys\n"
            "from opq_box_updater import runner\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
            f"runner.run(['sh', '-c', 'sleep 300 & echo $! > {pidfile}; wait'], grace=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    pids.append(int(pidfile.read_text()))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert _wait_gone(pids[0])


def test_children_get_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in HOSTILE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPQ_TEST_POWERCUT", "/tmp/marker")
    out = runner.run(["env"]).output
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env == {"PATH": runner.SYSTEM_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "OPQ_TEST_POWERCUT": "/tmp/marker"}


def test_output_is_read_to_its_end_bounded() -> None:
    out = runner.run(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo end"])
    assert len(out.output) == runner.MAX_OUTPUT_BYTES
    assert out.output.endswith("x\nend\n")


def test_a_missing_program_is_a_subprocess_error(tmp_path: Path) -> None:
    with pytest.raises(SubprocessError, match="cannot run"):
        runner.run([tmp_path / "nope"])


# --- what leaves the session: the subreaper ----------------------------------------------


def test_a_process_that_left_the_session_is_reported_after_success(
        subreaper: None, tmp_path: Path, pids: list[int],
        caplog: pytest.LogCaptureFixture) -> None:
    """``setsid -f`` escapes the session; re-parented to us, it is reported like the other
    leftovers, and a successful step is not failed for it (a postinst may start a daemon)."""
    pidfile = tmp_path / "daemon.pid"
    caplog.set_level(logging.WARNING, logger="opq_box_updater.runner")
    result = runner.run(["sh", "-c", f"setsid -f sh -c 'echo $$ > {pidfile}; exec sleep 60'; "
                                     f"while [ ! -s {pidfile} ]; do sleep 0.05; done"],
                        timeout=30)
    pids.append(_pid_in(pidfile))
    assert result.returncode == 0
    assert _alive(pids[0])
    assert [line.split()[0] for line in result.leftovers] == [str(pids[0])]
    assert result.leftovers[0].endswith("(left its session)")
    assert f"left processes running: {pids[0]} " in caplog.text


@pytest.mark.parametrize("kind", ["polite", "stubborn"])
def test_a_double_fork_daemon_is_stopped_with_the_step_that_timed_out(
        subreaper: None, tmp_path: Path, pids: list[int], kind: str) -> None:
    """The daemon is in a session of its own and its parent is gone: still stopped, after
    SIGTERM or (ignoring it) SIGKILL after the grace period, and named; no zombie stays."""
    pidfile = tmp_path / "daemon.pid"
    with pytest.raises(SubprocessError, match="sh timed out after 2s") as info:
        runner.run(["sh", "-c", f"{sys.executable} -c '{DOUBLE_FORK}' {pidfile} {kind}; "
                                "echo detached; sleep 300"], timeout=2, grace=1)
    pids.append(_pid_in(pidfile))
    assert _wait_gone(pids[0])
    assert not _exists(pids[0])  # reaped by us, its new parent
    if kind == "stubborn":
        assert f"{pids[0]} {sys.executable} -c" in str(info.value)
        assert "(left its session)" in str(info.value)


def test_detached_processes_that_end_leave_no_zombies(subreaper: None, tmp_path: Path) -> None:
    """Short-lived detached helpers end as our zombies: the next step reaps them."""
    pidfile = tmp_path / "helpers"
    script = "".join(f"setsid -f sh -c 'echo $$ >> {pidfile}; sleep 0.3'; " for _ in range(3))
    runner.run(["sh", "-c", script + f"while [ $(wc -l < {pidfile}) -lt 3 ]; do sleep 0.05; "
                                     "done"], timeout=30)
    helpers = [int(line) for line in pidfile.read_text().split()]
    assert all(_wait_gone(pid) for pid in helpers)  # ended: zombies until someone reaps
    runner.run(["true"])
    assert [pid for pid in helpers if _exists(pid)] == []


def test_stop_leftovers_stops_what_steps_left_running(subreaper: None, tmp_path: Path,
                                                      pids: list[int]) -> None:
    """Before a rollback: what a successful step left (in its session or detached) goes."""
    inside, detached = tmp_path / "inside.pid", tmp_path / "detached.pid"
    runner.run(["sh", "-c", f"sleep 60 & echo $! > {inside}; "
                            f"setsid -f sh -c 'echo $$ > {detached}; exec sleep 60'; "
                            f"while [ ! -s {detached} ]; do sleep 0.05; done"])
    pids.extend([_pid_in(inside), _pid_in(detached)])
    assert all(_alive(pid) for pid in pids)
    assert procs.stop_leftovers(grace=5) == []
    assert [pid for pid in pids if _exists(pid)] == []


# --- the updater becomes a subreaper before its first child, and only then --------------

_FIRST_CHILD = """
import os, sys
from opq_box_updater import procs, runner
before = procs.is_subreaper()
out = runner.run(["sh", "-c", "setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $!"]).output
pid = int(out.split()[0])
for _ in range(200):
    with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    if ppid == os.getpid():
        break
    import time; time.sleep(0.05)
os.kill(pid, 9)
print(before, procs.is_subreaper(), ppid == os.getpid())
"""


def test_the_first_child_makes_the_process_a_subreaper() -> None:
    """A process that runs children through runner.run inherits what they detach, without
    having to ask (the CLI no longer does it at start-up)."""
    out = subprocess.run([sys.executable, "-c", _FIRST_CHILD], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    assert out == ["False", "True", "True"], out


def test_a_no_op_run_imports_no_subprocess_machinery() -> None:
    """The daily no-op (a check answered 304) starts no child: it must not pay for ctypes,
    subprocess or the runner (the bench's no-op CPU budget)."""
    code = ("import sys, opq_box_updater.cli, opq_box_updater.updater; "
            "print(sorted(m for m in ('ctypes', 'subprocess', 'opq_box_updater.runner') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]", out
