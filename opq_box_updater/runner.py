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
import logging
import os
import shlex
import shutil
import subprocess
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
#: with stdin /dev/null. At end of file (the updater died before recording) it exits 125
#: without running anything.
_GATE = ("/bin/sh", "-c", 'IFS= read -r _ || exit 125; exec "$0" "$@" </dev/null')
GATE_NOT_OPENED = 125


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
    gate = os.pipe() if recorder and _gateable(argv[0], child_environment) else None
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
        if recorder:
            _record(recorder, proc.pid, argv[0], gate[1] if gate else None)
        try:
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


def _gateable(program: str, env: Mapping[str, str]) -> bool:
    """True when ``program`` can be started behind the gate with the same result as
    directly: found and executable, a script with a shebang or an ELF binary. Anything
    else is started directly (and Popen's error, or binfmt_misc, does what it always did):
    ``sh``'s ``exec`` would run a file without a shebang as a shell script."""
    if program.startswith("-"):
        return False
    path = program if "/" in program else shutil.which(program, path=env.get("PATH"))
    if path is None or not os.access(path, os.X_OK):
        return False
    try:  # non-blocking: a FIFO there must not hang the updater (it reads as empty)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            magic = os.read(fd, 4)
        finally:
            os.close(fd)
    except OSError:
        return False
    return magic.startswith(b"#!") or magic == b"\x7fELF"


def _record(recorder: Recorder, sid: int, name: str, gate: int | None) -> None:
    """Record session ``sid``, then open the gate (if any). A record that cannot be
    written is a warning, not a failure: the child then runs as it did before records."""
    try:
        proc = read_stat(sid)
        recorder.add(sid, proc.start if proc else 0)
    except OSError as exc:
        logger.warning("cannot record the session of %s (%s): if this run is killed, the "
                       "next one cannot stop what it leaves running", name, exc)
    finally:
        if gate is not None:
            with contextlib.suppress(OSError):  # the gate may be gone (killed meanwhile)
                os.write(gate, b"\n")
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
