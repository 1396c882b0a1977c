"""The runner's gate (``sh`` waiting for the session record, then ``exec``) changes nothing a
child sees or does compared with starting it directly: argv, environment, exit status,
signals, stdin, and the programs the kernel refuses. Each case runs the program both ways
(``record=False`` is the direct start) and compares; real processes, no mocks.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from test_orphans import Recorder, recorder

from opq_box_updater import procs, runner
from opq_box_updater.errors import SubprocessError

__all__ = ["recorder"]  # fixtures

ENV_PRINTER = [sys.executable, "-c",
               "import json, os; print(json.dumps(dict(os.environ), sort_keys=True))"]


def _outcome(cmd: list[str], **kwargs: object) -> tuple[object, ...]:
    """What ``runner.run`` made of ``cmd``: exit status and output, or the error."""
    try:
        result = runner.run(cmd, check=False, **kwargs)  # type: ignore[arg-type]
    except SubprocessError as exc:
        return ("error", str(exc), exc.returncode)
    return ("exit", result.returncode, result.output)


def _gated(recorder: Recorder) -> bool:
    """Whether the last recorded child was the gate when its session was recorded."""
    [cmdline] = recorder.cmdline_at_add.values()
    return cmdline.split(b"\0")[:2] == [b"/bin/sh", b"-c"]


def _same_both_ways(recorder: Recorder, cmd: list[str], **kwargs: object) -> tuple[object, ...]:
    direct = _outcome(cmd, record=False, **kwargs)
    assert recorder.added == {}
    gated = _outcome(cmd, **kwargs)
    assert gated == direct
    return direct


# --- what held: argv, exit statuses, signals, stdin ---------------------------------------


@pytest.mark.parametrize("cmd", [
    [sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b", "'\"", "-n", "$HOME",
     "line\nbreak", "", "*", "\\"],
    ["sh", "-c", "exit 125"], ["sh", "-c", "exit 126"], ["sh", "-c", "exit 127"],
    ["sh", "-c", "kill -KILL $$"], ["sh", "-c", "kill -TERM $$"],
    ["sh", "-c", "read x; echo \"read [$x] $?\""],
    ["sh", "-c", "cd /proc/$$/fd && echo * && readlink 0"],
], ids=["argv", "exit125", "exit126", "exit127", "sigkill", "sigterm", "stdin", "fds"])
def test_the_gate_keeps_argv_exit_status_signals_and_stdin(recorder: Recorder,
                                                           cmd: list[str]) -> None:
    outcome = _same_both_ways(recorder, cmd)
    assert _gated(recorder)
    if "kill -KILL" in cmd[-1]:
        assert outcome[:2] == ("exit", -signal.SIGKILL)


# --- what changed before: the environment -------------------------------------------------


def test_the_gated_child_sees_exactly_the_environment_it_was_given(recorder: Recorder,
                                                                   tmp_path: Path) -> None:
    """``sh`` exported a ``PWD`` of its own to every child."""
    env = runner.child_env({"OLDPWD": "/x", "SHLVL": "7", "HOME": "/root"})
    outcome = _same_both_ways(recorder, ENV_PRINTER, env=env, cwd=tmp_path)
    assert _gated(recorder)
    assert "PWD" not in str(outcome[2]).replace("OLDPWD", "")


@pytest.mark.parametrize("name,value", [("PWD", "/elsewhere"), ("OPTIND", "x"),
                                        ("IFS", ":"), ("PPID", "1"), ("_", "/usr/bin/x")])
def test_variables_sh_would_change_reach_the_child_unchanged(
        recorder: Recorder, tmp_path: Path, name: str, value: str) -> None:
    """``sh`` rewrote ``PWD``, ``IFS``, ``PPID`` and ``_`` and refused to start at all with
    ``OPTIND=x``: such an environment is started directly."""
    env = runner.child_env({name: value})
    outcome = _same_both_ways(recorder, ENV_PRINTER, env=env, cwd=tmp_path)
    assert f'"{name}": "{value}"' in str(outcome[2])


# --- what changed before: programs the kernel refuses -------------------------------------


def _foreign_elf(path: Path) -> Path:
    """``true`` for another architecture (its e_machine changed): the kernel says ENOEXEC."""
    data = bytearray(Path(shutil.which("true") or "/bin/true").read_bytes())
    data[18:20] = (b"\x28\x00" if data[18:20] != b"\x28\x00" else b"\x3e\x00")  # ARM/x86-64
    path.write_bytes(bytes(data))
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("kind", ["no-interpreter", "crlf", "interpreter-no-shebang",
                                  "foreign-elf"])
def test_a_program_the_kernel_refuses_is_never_run_as_a_shell_script(
        recorder: Recorder, tmp_path: Path, kind: str) -> None:
    """``sh``'s ``exec`` retries ENOEXEC as a shell script: ``#!`` without an interpreter
    ran its body with ``sh``, another machine's binary was fed to ``sh``, a CRLF shebang
    said "not found" with status 127. Each fails to start, as directly."""
    ran = tmp_path / "ran"
    program = tmp_path / "program"
    body = f"touch {ran}\n"
    if kind == "no-interpreter":
        program.write_text("#!\n" + body)
    elif kind == "crlf":
        program.write_text("#!/bin/sh\r\n" + body.replace("\n", "\r\n"))
    elif kind == "interpreter-no-shebang":
        interpreter = tmp_path / "interp"
        interpreter.write_text(body)
        interpreter.chmod(0o755)
        program.write_text(f"#!{interpreter}\n{body}")
    else:
        _foreign_elf(program)
    program.chmod(0o755)
    outcome = _same_both_ways(recorder, [str(program)])
    assert outcome[0] == "error" and "cannot run" in str(outcome[1])
    assert not ran.exists()


def test_a_program_relative_to_the_working_directory_is_gated(recorder: Recorder,
                                                              tmp_path: Path) -> None:
    """``./update.sh`` with ``cwd``: judged where it runs, not in the updater's own working
    directory (where it was not found, so it ran unrecorded)."""
    (tmp_path / "prog").write_text("#!/bin/sh\necho ran in \"$(pwd)\"\n")
    (tmp_path / "prog").chmod(0o755)
    _same_both_ways(recorder, ["./prog"], cwd=tmp_path)
    assert _gated(recorder)


# --- interrupted while recording ----------------------------------------------------------


class Interrupting(Recorder):
    """A recorder interrupted while it writes (the guard's SIGTERM, Ctrl-C)."""

    def add(self, sid: int, start: int) -> None:
        self.added[sid] = start
        raise KeyboardInterrupt


def test_an_interrupt_while_recording_runs_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    """The gate used to open in a ``finally``: the program ran, unrecorded, while the
    interrupt left the runner without stopping it."""
    rec = Interrupting()
    runner.record_sessions(rec)
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run(["sh", "-c", f"sleep 0.3; touch {tmp_path / 'ran'}; sleep 30"])
    finally:
        runner.record_sessions(None)
    [sid] = rec.added
    deadline = time.monotonic() + 30
    while procs.session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs.session_members(sid) == []
    time.sleep(0.5)  # a program that did start would have touched the file by now
    assert not (tmp_path / "ran").exists()


def test_the_child_s_stdin_is_dev_null_open_for_reading_and_writing(recorder: Recorder) -> None:
    """Popen's DEVNULL is opened read-write; the gate's ``</dev/null`` was read-only, so a
    child writing to its standard input (a prompt some tools write to fd 0) failed."""
    outcome = _same_both_ways(recorder, ["sh", "-c", "echo prompt >&0 && echo wrote"])
    assert _gated(recorder) and outcome == ("exit", 0, "wrote\n")
