"""The one subprocess wrapper: every dpkg, run-parts, hook and script call goes through here.

Like pip's ``call_subprocess``: the command is logged, output captured (stderr folded into
stdout so the tail shows what happened in order), a timeout enforced, and a failure raised as
:class:`SubprocessError` carrying the command, exit code and the tail of the output.

What it guarantees beyond that (issue 12, items 2 and 3):

* **Children are a group.** Every child starts in its own session (``setsid``), so it and
  everything it forks that stays in that session (maintainer scripts, hooks, a run script's
  helpers) can be signalled together. On a timeout, or when this process is interrupted while
  waiting (the guard's SIGTERM handler, Ctrl-C), the session gets SIGTERM, then after a grace
  period SIGKILL; what was still alive is logged by pid and command line.
* **Completion is the child's exit.** Output goes to an unnamed temporary file, not a pipe:
  a daemon started in the background (``sleep 40 &``) keeps its copy of the descriptor but
  cannot hold the step open. Processes the child left running in its session are logged
  and returned in :attr:`Result.leftovers`; they do not fail the step.
* **Detached descendants are still ours.** The updater and the guard make themselves child
  subreapers (:func:`~opq_box_updater.procs.become_subreaper`, Linux
  ``PR_SET_CHILD_SUBREAPER``): a descendant that leaves the session (``setsid -f``, a
  double-fork daemon) is re-parented to them, not to init. After a step, new children of
  this process other than the step's own child are such detached processes: they are
  reported like the other leftovers (marked ``left its session``) and their zombies reaped;
  on a timeout they are stopped with the session (SIGTERM, grace, SIGKILL), with the
  sessions they made. Every leftover is remembered, so
  :func:`~opq_box_updater.procs.stop_leftovers` can stop them all before a rollback.
* **A minimal environment.** :func:`child_env` is the whole environment of a child: a fixed
  system PATH, a UTF-8 C locale, and what the caller adds (``OPQ_*``, ``DPKG_ROOT``,
  ``DEBIAN_FRONTEND``, ``APT_CONFIG``). Nothing of the caller's environment is inherited
  (``BASH_ENV``, ``PYTHONPATH``, ``LD_PRELOAD``, the fault-injection variable) except
  variables named ``OPQ_TEST_*``: the test-only channel through which the power-cut tests
  reach maintainer scripts and the run script. The product never sets them.
* **Sessions are recorded before the child runs.** With a :class:`Recorder` set
  (:func:`record_sessions`: the installer and the guard set one), a child is started behind
  a gate (``sh`` waiting for one line on its stdin, then ``exec``): its session is recorded
  durably first, and only then is the gate opened, so an updater SIGKILLed at any instant
  leaves no unrecorded child that can change the box. The record goes when the session is
  done; a session that still has leftovers stays recorded. The next run stops what is left
  of recorded sessions with :func:`~opq_box_updater.procs.stop_sessions`, before its crash
  recovery.

Reading ``/proc`` and stopping processes is :mod:`opq_box_updater.procs`'s; this module
starts children and accounts for them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from .errors import SubprocessError
from .procs import (
    GRACE_SECONDS,
    Proc,
    collect_leftovers,
    describe_proc,
    ensure_subreaper,
    processes,
    read_stat,
    reap,
    stop_session,
)

logger = logging.getLogger(__name__)

#: The one PATH children get: dpkg needs ldconfig and start-stop-daemon from the sbin
#: directories (cron's default PATH lacks them); the caller's PATH is never used.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCALE = "C.UTF-8"
#: Variables with this prefix are passed on to children: a test-only channel (see above).
TEST_PREFIX = "OPQ_TEST_"

TAIL_LINES = 20
#: At most this much of a command's output is read back (its end): enough for dpkg's and
#: dpkg-query's answers, bounded against a child that writes without end.
MAX_OUTPUT_BYTES = 1024 * 1024
#: The gate: waits for one line on stdin (the session is recorded), then becomes the command
#: with stdin /dev/null, open for reading and writing like Popen's DEVNULL. At end of file
#: (the updater died before recording) it exits 125 without running anything. ``sh``
#: exports a ``PWD`` of its own: unset, so the child sees the environment it was given.
_GATE = ("/bin/sh", "-c", 'IFS= read -r _ || exit 125; unset PWD; exec "$0" "$@" <>/dev/null')
GATE_NOT_OPENED = 125
#: Variables ``sh`` sets, rewrites or refuses (``OPTIND=x`` stops it): an environment naming
#: one is started directly, so that the child sees exactly what it was given.
_SHELL_VARS = frozenset({"PWD", "IFS", "PPID", "OPTIND", "_"})
#: Nested ``#!`` interpreters the kernel follows (``fs/exec.c``; 5 since Linux 5.x, 4 before).
_MAX_INTERPRETERS = 4
#: The kernel reads this much of a file to recognise it (``BINPRM_BUF_SIZE``).
_HEAD_BYTES = 256


class Recorder(Protocol):
    """Where sessions are recorded (:class:`opq_box_updater.sessions.SessionRecords`)."""

    def add(self, sid: int, start: int) -> None: ...

    def remove(self, sid: int) -> None: ...


_recorder: Recorder | None = None


def record_sessions(recorder: Recorder | None) -> None:
    """Record the session of every child :func:`run` starts from now on (None: stop)."""
    global _recorder
    _recorder = recorder


@dataclass(frozen=True)
class Result:
    """What a finished command returned; ``leftovers`` describes processes it left running
    in its session (``pid command``)."""

    cmd: tuple[str, ...]
    returncode: int
    output: str
    leftovers: tuple[str, ...] = ()


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The complete environment of a child: system PATH, locale, ``OPQ_TEST_*`` (tests
    only), then ``extra``."""
    env = {"PATH": SYSTEM_PATH, "LANG": LOCALE, "LC_ALL": LOCALE}
    env.update({k: v for k, v in os.environ.items() if k.startswith(TEST_PREFIX)})
    if extra:
        env.update(extra)
    return env


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 3600,
    check: bool = True,
    grace: float = GRACE_SECONDS,
    record: bool = True,
) -> Result:
    """Run ``cmd`` in its own session until it exits; raise :class:`SubprocessError` on
    timeout (after stopping its whole session), on a missing program, or, with ``check``, on
    a non-zero exit. ``env`` is the complete child environment (default: :func:`child_env`).
    ``record`` False: a read-only query whose session is not worth recording.
    """
    argv = tuple(os.fspath(c) for c in cmd)
    printable = shlex.join(argv)
    logger.debug("running: %s", printable)
    ensure_subreaper()
    reap()
    known = frozenset(p.pid for p in processes() if p.ppid == os.getpid())
    child_environment = dict(env) if env is not None else child_env()
    recorder = _recorder if record else None
    gate = os.pipe() if recorder and _gateable(argv[0], child_environment, cwd) \
        else None
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen((*_GATE, *argv) if gate else argv, env=child_environment,
                                    cwd=cwd, stdin=gate[0] if gate else subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            if gate:
                os.close(gate[1])
            raise SubprocessError(f"cannot run {argv[0]}: {exc.strerror}", argv, None,
                                  "") from None
        finally:
            if gate:
                os.close(gate[0])
        try:
            if recorder:
                _record(recorder, proc.pid, argv[0], gate[1] if gate else None)
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            alive = stop_session(proc, grace, known)
            _forget(recorder, proc.pid)
            still = f"; still alive after SIGTERM and killed: {'; '.join(alive)}" if alive \
                else ""
            raise SubprocessError(f"{argv[0]} timed out after {timeout:.0f}s{still}", argv,
                                  None, tail(_read_tail(out))) from None
        except BaseException:  # interrupted while waiting: the children go with us
            stop_session(proc, grace, known)
            _forget(recorder, proc.pid)
            raise
        output = _read_tail(out)
    left = collect_leftovers(proc.pid, known)
    if recorder:
        _record_leftovers(recorder, proc.pid, left)
    leftovers = tuple(describe_proc(p, proc.pid) for p in left)
    if leftovers:
        logger.warning("%s exited but left processes running: %s", argv[0],
                       "; ".join(leftovers))
    for line in tail(output).splitlines():
        logger.debug("  | %s", line)
    if check and returncode != 0:
        raise SubprocessError(f"{printable} exited with status {returncode}", argv,
                              returncode, tail(output))
    return Result(argv, returncode, output, leftovers)


def _gateable(program: str, env: Mapping[str, str], cwd: Path | None = None) -> bool:
    """True when ``program`` can be started behind the gate with the same result as
    directly: found and executable, and a file the kernel itself executes (an ELF binary
    for this machine, or ``#!`` naming such an interpreter), in an environment ``sh``
    leaves alone. Anything else is started directly (and Popen's error, or binfmt_misc,
    does what it always did): ``sh``'s ``exec`` retries a file the kernel refuses with
    ENOEXEC (no shebang, ``#!`` without interpreter, another machine's ELF) as a shell
    script."""
    if program.startswith("-") or _SHELL_VARS & set(env):
        return False
    if "/" in program:
        path: str | None = os.path.join(cwd, program) if cwd is not None else program
    else:
        path = shutil.which(program, path=env.get("PATH"))
    return path is not None and _kernel_executes(path, 0)


def _kernel_executes(path: str, depth: int) -> bool:
    """True when execve(``path``) is sure not to fail with ENOEXEC: executable, and an
    ELF file of this machine's class, byte order and architecture, or a ``#!`` line that
    ends within the kernel's buffer and names an absolute interpreter passing this test
    (a script saved with CRLF line ends names ``/bin/sh`` plus a carriage return: none)."""
    if depth > _MAX_INTERPRETERS or not os.access(path, os.X_OK):
        return False
    head = _head(path)
    if head.startswith(b"\x7fELF"):
        own = _own_elf()
        return len(head) >= 20 and head[4:6] == own[4:6] and head[18:20] == own[18:20]
    line, newline, _ = head[2:].partition(b"\n")
    if not head.startswith(b"#!") or not newline:
        return False
    interpreter = line.strip(b" \t").split(b" ")[0].split(b"\t")[0]
    return interpreter.startswith(b"/") and _kernel_executes(os.fsdecode(interpreter),
                                                             depth + 1)


def _head(path: str) -> bytes:
    """The first bytes of ``path`` (b"" when unreadable). Non-blocking: a FIFO there must
    not hang the updater (it reads as empty)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return os.read(fd, _HEAD_BYTES)
        finally:
            os.close(fd)
    except OSError:
        return b""


@functools.cache
def _own_elf() -> bytes:
    """The ELF header of this Python: the machine the kernel runs binaries for."""
    return _head(os.path.realpath(sys.executable))[:20]


def _record(recorder: Recorder, sid: int, name: str, gate: int | None) -> None:
    """Record session ``sid``, then open the gate (if any). A record that cannot be
    written is a warning, not a failure: the child then runs as it did before records.
    Interrupted while recording (the guard's SIGTERM, Ctrl-C), the gate is closed unopened:
    the child exits 125 without running, and the caller stops its session."""
    try:
        try:
            proc = read_stat(sid)
            recorder.add(sid, proc.start if proc else 0)
        except OSError as exc:
            logger.warning("cannot record the session of %s (%s): if this run is killed, "
                           "the next one cannot stop what it leaves running", name, exc)
        if gate is not None:
            with contextlib.suppress(OSError):  # the gate may be gone (killed meanwhile)
                os.write(gate, b"\n")
    finally:
        if gate is not None:
            os.close(gate)


def _forget(recorder: Recorder | None, sid: int) -> None:
    """Remove the record of session ``sid``, which is done."""
    if recorder:
        try:
            recorder.remove(sid)
        except OSError as exc:
            logger.warning("cannot remove the record of session %d: %s", sid, exc)


def _record_leftovers(recorder: Recorder, sid: int, left: list[Proc]) -> None:
    """After a step: forget its session when nothing is left of it; otherwise keep it and
    record every other session a leftover runs in (it left the step's session), so that a
    killed updater's next run finds them too. A session whose leader is gone is recorded
    with its oldest member's start time: any later holder of that pid started later."""
    sessions: dict[int, int] = {}
    for proc in left:
        if proc.sid != sid and proc.sid != os.getsid(0):
            leader = read_stat(proc.sid)
            start = leader.start if leader else proc.start
            sessions[proc.sid] = min(sessions.get(proc.sid, start), start)
    if not left:
        _forget(recorder, sid)
    for other, start in sessions.items():
        with contextlib.suppress(OSError):
            recorder.add(other, start)


def _read_tail(handle: IO[bytes]) -> str:
    """The last :data:`MAX_OUTPUT_BYTES` written to the output file, decoded leniently."""
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    start = max(0, size - MAX_OUTPUT_BYTES)
    data = os.pread(fd, size - start, start)
    return data.decode("utf-8", errors="replace")
