"""Process control from ``/proc``: sessions, adopted children, stopping what is left.

The runner (:mod:`opq_box_updater.runner`) starts every child in a session of its own and
uses this module to see what a step left running, to stop a session on a timeout, and to
stop leftovers before a rollback. The updater uses :func:`stop_sessions` at the start of a
run to stop what a killed run's recorded sessions (:mod:`opq_box_updater.sessions`) left.
Processes are read from ``/proc/PID/stat`` in one pass (pid, parent, group, session, start
time): a pid is only ever signalled together with the start time it was seen with, so a pid
reused by an unrelated process is never touched. The updater and the guard are child
subreapers (:func:`become_subreaper`): descendants that detach are re-parented to them, not
to init, and stay visible here.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL for a child's session.
GRACE_SECONDS = 10.0
#: Linux prctl options (``<linux/prctl.h>``).
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
#: What a process left running and that was not stopped since: pid -> start time (clock
#: ticks after boot), so that a pid reused by an unrelated process is never signalled.
_LEFT: dict[int, int] = {}
#: The sessions steps ran in or left processes in: a zombie child of this process in one of
#: them is an adopted leftover that ended, never a child someone else started.
_SESSIONS: set[int] = set()


@dataclass(frozen=True)
class Proc:
    """One line of ``/proc/PID/stat``: what process control needs."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    sid: int
    start: int  # clock ticks after boot: tells a process from a later one with its pid
    comm: str = ""  # the command name (``/proc/PID/comm``), for the log

    @property
    def zombie(self) -> bool:
        return self.state == "Z"


def processes() -> list[Proc]:
    """Every process, from one pass over ``/proc/*/stat`` (empty without /proc). One pass
    answers both "who is in this session" and "whose parent am I", and works on kernels
    built without ``/proc/PID/task/TID/children``."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            proc = read_stat(int(entry))
            if proc is not None:
                found.append(proc)
    return found


def read_stat(pid: int) -> Proc | None:
    """Process ``pid`` from ``/proc/PID/stat``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ... starttime(22nd)": comm may hold spaces and
    # parentheses, so split after its last ")".
    fields = text[text.rfind(")") + 2:].split()
    if len(fields) <= 19:
        return None
    return Proc(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]),
                int(fields[19]), text[text.find("(") + 1:text.rfind(")")])


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``."""
    return sorted(p.pid for p in processes() if p.sid == sid and not p.zombie)


def _prctl() -> Any:
    """libc's ``prctl`` (Linux only), or None where it cannot be had."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_subreaper_asked = False


def ensure_subreaper() -> None:
    """Become a child subreaper before the first child starts, once per process: children
    that detach (``setsid``, double fork) are then re-parented here, where :func:`run` can
    report and stop them. Doing it here rather than at start-up keeps runs that start no
    child (a no-op ``check`` or ``run``) free of ``ctypes`` and ``prctl``."""
    global _subreaper_asked
    if not _subreaper_asked:
        _subreaper_asked = True
        become_subreaper()


def become_subreaper() -> bool:
    """Make this process a child subreaper, so that descendants which detach (``setsid``,
    double fork) are re-parented to it instead of init and stay visible and stoppable.
    Linux only; elsewhere, or when the call fails, returns False and nothing changes."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def is_subreaper() -> bool:
    """True when this process is a child subreaper (always False off Linux)."""
    prctl = _prctl()
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    return bool(prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value)


def _shown(text: str) -> str:
    """``text`` (a command name or line, chosen by whoever started the process) for the log
    and ``status``: what a terminal would act on (ESC, other controls, bidi overrides) is
    escaped. ``repr`` without its quotes, as :func:`opq_box_updater.text.printable` does,
    which this level-0 module cannot import."""
    return repr(text)[1:-1]


def describe(pid: int) -> str:
    """``pid command line`` of a process, for the log."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"{pid} (gone)"
    args = [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]
    return f"{pid} {_shown(' '.join(args))}"


def describe_proc(proc: Proc, sid: int | None) -> str:
    """:func:`describe`, marking a process that is no longer in the step's session ``sid``."""
    text = describe(proc.pid)
    return text if proc.sid == sid else f"{text} (left its session)"


def _reap_zombies(procs: Iterable[Proc], known: frozenset[int], child: int | None) -> None:
    """Reap this process's zombie children that it adopted: not ``known`` before the step
    (those belong to whoever started them) unless remembered as leftovers, never ``child``
    (its Popen waits for it)."""
    me = os.getpid()
    for proc in procs:
        if proc.ppid == me and proc.zombie and proc.pid != child and (
                proc.pid not in known or proc.pid in _LEFT):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)
            _LEFT.pop(proc.pid, None)


def reap() -> None:
    """Reap the zombies of leftovers that ended since (a subreaper inherits them): the
    remembered ones and what they started in their sessions; no other child is touched."""
    me = os.getpid()
    for proc in processes():
        if proc.ppid == me and proc.zombie and (proc.pid in _LEFT or proc.sid in _SESSIONS):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)
            _LEFT.pop(proc.pid, None)


def _step_processes(procs: list[Proc], sid: int, known: frozenset[int]) -> list[Proc]:
    """The live processes a step (session ``sid``) accounts for: its session, the children
    this process adopted since (``known``: its children before the step) and the sessions
    those made. This process's own session is never one of them."""
    me, mine = os.getpid(), os.getsid(0)
    adopted = [p for p in procs if p.ppid == me and p.pid not in known and p.pid != sid]
    sessions = {sid} | {p.sid for p in adopted if p.sid != mine}
    found = {p.pid: p for p in procs if p.sid in sessions and not p.zombie}
    found.update((p.pid, p) for p in adopted if not p.zombie)
    return _with_descendants(procs, found)


def _with_descendants(procs: list[Proc], found: dict[int, Proc]) -> list[Proc]:
    """``found`` and every live descendant of it (by parent pid): one that made a session of
    its own while its parent still lives is not ours yet, but is the step's."""
    grown = True
    while grown:
        grown = False
        for proc in procs:
            if proc.ppid in found and proc.pid not in found and not proc.zombie:
                found[proc.pid] = proc
                grown = True
    return sorted(found.values(), key=lambda p: p.pid)


def collect_leftovers(sid: int, known: frozenset[int]) -> list[Proc]:
    """What the finished step ``sid`` left running (remembered for :func:`stop_leftovers`);
    reap the zombies it left."""
    procs = processes()
    _reap_zombies(procs, known, None)
    left = _step_processes(procs, sid, known)
    for proc in left:
        _LEFT[proc.pid] = proc.start
        if proc.sid != os.getsid(0):
            _SESSIONS.add(proc.sid)
    return left


def _signal(proc: Proc, sig: int) -> None:
    """Send ``sig`` to ``proc`` and to its process group, never to this process's own, and
    only while its pid still names the process that was seen (same start time): the check
    holds a pidfd, so a pid that ended and was handed out again between the pass over
    ``/proc`` and the signal is never hit. Without pidfds (Linux before 5.3) the pid is
    checked, then signalled."""
    if proc.pid == os.getpid():
        return
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):
        pidfd = None
    try:
        now = read_stat(proc.pid)
        if now is None or now.start != proc.start:
            return
        targets: list[Callable[[], None]] = [
            (lambda: signal.pidfd_send_signal(pidfd, sig)) if pidfd is not None
            else (lambda: os.kill(proc.pid, sig))]
        if proc.pgrp != os.getpgrp():
            targets.append(lambda: os.killpg(proc.pgrp, sig))
        for send in targets:
            try:
                send()
            except (ProcessLookupError, PermissionError):
                continue
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _stop(find: Callable[[list[Proc]], list[Proc]], done: Callable[[], bool],
          grace: float, sid: int | None) -> list[str]:
    """SIGTERM every process ``find`` names (again each round: killing a parent re-parents
    its detached children to us), wait up to ``grace`` seconds until none is left and
    ``done()``, then SIGKILL what is left the same way. Returns what outlived the grace."""
    deadline = time.monotonic() + grace
    termed: set[tuple[int, int]] = set()
    while True:
        live = find(processes())
        if not live and done():
            return []
        if time.monotonic() >= deadline:
            break
        for proc in live:
            if (proc.pid, proc.start) not in termed:
                termed.add((proc.pid, proc.start))
                _signal(proc, signal.SIGTERM)
        time.sleep(0.05)
    alive = [describe_proc(p, sid) for p in live]
    if alive:
        logger.warning("still alive %.0fs after SIGTERM, killing: %s", grace, "; ".join(alive))
    kill_deadline = time.monotonic() + max(grace, 5.0)
    while live and time.monotonic() < kill_deadline:
        for proc in live:
            _signal(proc, signal.SIGKILL)
        time.sleep(0.05)
        live = find(processes())
    return alive


def stop_session(proc: subprocess.Popen[bytes], grace: float,
                 known: frozenset[int] = frozenset()) -> list[str]:
    """SIGTERM the session of ``proc`` (its leader) and what it detached (children this
    process adopted that are not in ``known``), wait up to ``grace`` seconds for all of it
    to end, then SIGKILL what is left; reaps ``proc`` and the adopted zombies. Returns what
    was still alive when the grace period ended (logged)."""
    sid = proc.pid

    def find(procs: list[Proc]) -> list[Proc]:
        _reap_zombies(procs, known, sid)
        return _step_processes(procs, sid, known)

    alive = _stop(find, lambda: proc.poll() is not None, grace, sid)
    if proc.poll() is None:
        if not alive:
            alive = [describe(proc.pid)]
        proc.kill()
    proc.wait()
    _reap_zombies(processes(), known, None)
    return alive


def stop_leftovers(grace: float = GRACE_SECONDS) -> list[str]:
    """Stop everything earlier steps left running (the same-session and detached leftovers
    :func:`run` reported, the sessions they lead, and what they detach meanwhile): before a
    rollback, so nothing of the failed release keeps running on the restored box. Returns
    what outlived the grace period; afterwards no leftover is remembered."""
    known = frozenset(p.pid for p in processes() if p.ppid == os.getpid()) - set(_LEFT)
    me, mine = os.getpid(), os.getsid(0)

    def find(procs: list[Proc]) -> list[Proc]:
        _reap_zombies(procs, known, None)
        left = [p for p in procs if _LEFT.get(p.pid) == p.start and not p.zombie]
        sessions = {p.sid for p in left if p.sid != mine}
        found = {p.pid: p for p in procs if p.sid in sessions and not p.zombie}
        found.update((p.pid, p) for p in procs
                     if p.ppid == me and p.pid not in known and not p.zombie)
        found.update((p.pid, p) for p in left)
        return _with_descendants(procs, found)

    if _LEFT:
        logger.info("stopping what the update left running: %s",
                    "; ".join(describe(pid) for pid in sorted(_LEFT)))
    alive = _stop(find, lambda: True, grace, None)
    _reap_zombies(processes(), known, None)
    reap()
    _LEFT.clear()
    return alive


def stop_sessions(sessions: Iterable[tuple[int, int]], grace: float = GRACE_SECONDS,
                  ) -> list[str]:
    """Stop what a killed run left of its recorded sessions, ``(sid, leader start time)``:
    every process still in such a session, its descendants and the sessions they made get
    SIGTERM, ``grace`` seconds, then SIGKILL. One log line per process (pid, command name).

    A recorded session counts only while its leader pid is gone or still the recorded
    process (same start time). The kernel keeps a pid reserved while any process still has
    it as session id, so a leader pid held by a process with another start time means the
    recorded session ended whole and the pid was reused: that session, even one its new
    holder made with ``setsid``, is a stranger's and is not touched. This process and its
    own session are never signalled. Returns the ``pid (command)`` lines of what it
    stopped."""
    mine = os.getsid(0)
    by_pid = {p.pid: p for p in processes()}
    wanted: set[int] = set()
    for sid, start in sessions:
        leader = by_pid.get(sid)
        if sid <= 1:  # init's; never a recorded one (sessions.py refuses such records too)
            continue
        if leader is not None and leader.start != start:
            logger.info("session %d is not the recorded one: pid %d is now %s, started "
                        "later; not touched", sid, sid, _shown(leader.comm))
            continue
        wanted.add(sid)
    seen: dict[int, str] = {}

    def find(procs: list[Proc]) -> list[Proc]:
        ours = {p.pid: p for p in procs if p.sid in wanted and not p.zombie}
        found = [p for p in _with_descendants(procs, ours) if p.sid != mine]
        wanted.update(p.sid for p in found)  # sessions the leftovers made are theirs too
        for proc in found:
            if proc.pid not in seen:
                seen[proc.pid] = f"{proc.pid} ({_shown(proc.comm)})"
                logger.warning("stopping pid %s, left running by a run that was killed",
                               seen[proc.pid])
        return found

    if wanted:
        _stop(find, lambda: True, grace, None)
    return list(seen.values())
