"""An operator at a console, for tests: a command on a real pseudo-terminal.

debconf's readline and teletype frontends want a controlling terminal (readline opens
``/dev/tty``), so a pipe cannot stand in for the operator. ``Console`` starts the command as
the leader of a new session whose controlling terminal is a pty of a console's size, then
reads what it prints and types answers as a person would: only after the prompt is shown.
Every wait has a hard deadline, so a prompt that never comes or a question asked forever
fails the test with the transcript instead of hanging it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pty
import re
import select
import signal
import subprocess
import termios
import time
from types import TracebackType

#: Terminal control sequences (readline's ornaments: underline, bold, shift in/out).
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x0e\x0f]")


class ConsoleError(AssertionError):
    """The program did not do what the operator waited for in time (or at all)."""


def screen_text(raw: bytes) -> str:
    """What a person reads: decoded, control sequences dropped, CR LF as LF."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return _CONTROL.sub("", text)


class Console:
    """``cmd`` on a pty of ``rows`` x ``cols``, in a session (and process group) of its own."""

    def __init__(self, cmd: list[str], *, env: dict[str, str], rows: int = 24,
                 cols: int = 80) -> None:
        master, slave = pty.openpty()
        termios.tcsetwinsize(slave, (rows, cols))
        # setsid(1) makes the command a session leader and the pty its controlling terminal.
        # The child of Popen is no process group leader, so setsid does not fork: the
        # command's pid is its session and process group id.
        try:
            self._proc = subprocess.Popen(
                ["setsid", "--ctty", "--wait", *cmd], stdin=slave, stdout=slave,
                stderr=slave, env=env, close_fds=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._master: int | None = master
        self._raw = bytearray()
        self._consumed = 0  # characters of the screen text that expect() has matched
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        """The command's pid: also its session and process group id."""
        return self._proc.pid

    # --- reading -----------------------------------------------------------------------------

    @property
    def transcript(self) -> str:
        """Everything shown so far, as screen text."""
        return screen_text(bytes(self._raw))

    def _read(self, until: float) -> bool:
        """Read what arrives before ``until``; False once the terminal is closed (EOF)."""
        if self._master is None:
            return False
        ready, _, _ = select.select([self._master], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return True
        try:
            data = os.read(self._master, 65536)
        except OSError as exc:  # EIO: every process holding the pty's other side is gone
            if exc.errno != errno.EIO:
                raise
            data = b""
        self._raw += data
        return bool(data)

    def expect(self, pattern: str, *, timeout: float = 30) -> str:
        """Wait until the screen, after the last match, matches ``pattern`` (a regular
        expression, searched with MULTILINE); return the text from the last match to the
        end of this one. Raises :class:`ConsoleError` with the transcript otherwise."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        open_ = True
        while True:
            text = self.transcript
            found = regex.search(text, self._consumed)
            if found:
                shown = text[self._consumed:found.end()]
                self._consumed = found.end()
                return shown
            if not open_:
                raise ConsoleError(f"the program ended before {pattern!r}; the screen after "
                                   f"the last match:\n{text[self._consumed:][-4000:]}")
            if time.monotonic() >= deadline:
                raise ConsoleError(f"no {pattern!r} within {timeout} s; the screen after the "
                                   f"last match:\n{text[self._consumed:][-4000:]}")
            open_ = self._read(deadline)

    def rest(self) -> str:
        """The screen after the last match (what ``finish`` collected)."""
        return self.transcript[self._consumed:]

    # --- typing ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._master is None:
            raise ConsoleError("the terminal is already closed")
        os.write(self._master, data)

    def send(self, line: str) -> None:
        """Type ``line`` and press Enter."""
        self._write(line.encode("utf-8") + b"\r")

    def send_eof(self) -> None:
        """Press Ctrl-D at the start of a line: the program reads end of input."""
        self._write(b"\x04")

    def send_interrupt(self) -> None:
        """Press Ctrl-C: the terminal sends SIGINT to the foreground process group."""
        self._write(b"\x03")

    def hang_up(self) -> None:
        """Close the terminal, as a dropped SSH session or serial line does."""
        if self._master is not None:
            os.close(self._master)
            self._master = None

    # --- the end -----------------------------------------------------------------------------

    def finish(self, *, timeout: float = 60) -> int:
        """Wait for the program to end, collecting what it prints; its exit status (negative:
        the signal that ended it). A program still running at the deadline is killed, with
        its whole process group, and the test fails."""
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None and time.monotonic() < deadline:
            if not self._read(min(deadline, time.monotonic() + 0.2)):
                time.sleep(0.05)  # the terminal is closed: no output to wait for
        if self._proc.poll() is None:
            self._kill()
            raise ConsoleError(f"still running after {timeout} s (a question asked forever?); "
                               f"the screen after the last match:\n{self.rest()[-4000:]}")
        end = time.monotonic() + 1  # what the last processes printed
        while time.monotonic() < end and self._read(end):
            pass
        self.returncode = self._proc.returncode
        left = self._session_members()
        if left:  # say, a config script still waiting after its frontend died
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise ConsoleError(f"ended (status {self.returncode}) but left processes behind: "
                               + ", ".join(f"{pid} {left[pid]}" for pid in left))
        return self.returncode

    def _session_members(self) -> dict[int, str]:
        """The processes still running in the command's session (its id is the command's
        pid): pid and name, from /proc."""
        members: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                    stat = handle.read()
            except OSError:  # ended meanwhile
                continue
            name = stat[stat.find("(") + 1:stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2:].split()
            # state ppid pgrp session ...; a zombie has ended, only its parent must reap it
            if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == self._proc.pid:
                members[int(entry)] = name
        return members

    def _kill(self) -> None:
        """SIGKILL the command's process group (its pid, see ``__init__``), then reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=30)

    def close(self) -> None:
        """Leave nothing behind: kill the group if it still runs, close the terminal."""
        if self._proc.poll() is None:
            self._kill()
        self.hang_up()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
