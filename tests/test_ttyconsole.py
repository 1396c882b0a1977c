"""The console driver of the interactive debconf test (tests/ttyconsole.py) keeps its word:
the command gets a real controlling terminal of a console's size, answers arrive as typed
lines, and a question asked forever fails within the deadline instead of hanging the run."""

from __future__ import annotations

import os
import time

import pytest
from ttyconsole import Console, ConsoleError

ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_real_terminal_of_a_console_size() -> None:
    script = ('tty; [ -t 0 ] && [ -t 1 ] && echo "on a terminal"; stty size; '
              'exec 3</dev/tty && echo "controlling terminal"; printf "URL: "; read -r x; '
              'echo "got [$x]"; exit 7')
    with Console(["sh", "-c", script], env=ENV, rows=24, cols=80) as console:
        console.expect(r"^/dev/pts/\d+$")
        console.expect(r"^on a terminal$")
        console.expect(r"^24 80$")
        console.expect(r"^controlling terminal$")
        console.expect(r"URL: $")
        console.send("http://a b/")
        assert console.finish(timeout=10) == 7
        assert "got [http://a b/]" in console.rest()


def test_end_of_input_and_hang_up_reach_the_program() -> None:
    with Console(["sh", "-c", 'printf "URL: "; read -r x || echo "end of input"'],
                 env=ENV) as console:
        console.expect(r"URL: $")
        console.send_eof()
        console.expect(r"end of input$")  # Ctrl-D echoes no newline
        assert console.finish(timeout=10) == 0
    with Console(["sh", "-c", 'printf "URL: "; read -r x; sleep 60'], env=ENV) as console:
        console.expect(r"URL: $")
        console.hang_up()
        assert console.finish(timeout=10) != 0  # SIGHUP (or end of input) ends it


def test_a_question_asked_forever_fails_in_time_and_is_killed() -> None:
    """The loop the debconf test guards against: end of input answered by asking again."""
    script = 'while :; do printf "URL: "; read -r x; done'
    with Console(["sh", "-c", script], env=ENV) as console:
        console.expect(r"URL: $")
        console.send_eof()
        pid = console.pid
        started = time.monotonic()
        with pytest.raises(ConsoleError, match="still running after 2 s"):
            console.finish(timeout=2)
        assert time.monotonic() - started < 30
        assert _gone(pid)


def test_a_prompt_that_never_comes_fails_in_time() -> None:
    with (Console(["sh", "-c", "echo working; sleep 60"], env=ENV) as console,
          pytest.raises(ConsoleError, match=r"(?s)no 'URL: \$' within 1 s.*working")):
        console.expect(r"URL: $", timeout=1)
    with (Console(["sh", "-c", "echo bye"], env=ENV) as console,
          pytest.raises(ConsoleError, match="ended before")):
        console.expect(r"URL: $", timeout=20)


def test_processes_left_behind_fail_the_run_and_are_killed() -> None:
    """The command ended, but a child it started (deaf to the hang-up) still runs."""
    script = "trap '' HUP; sleep 60 & echo started"
    with Console(["sh", "-c", script], env=ENV) as console:
        console.expect(r"^started$")
        time.sleep(0.2)  # let sh exit
        with pytest.raises(ConsoleError, match=r"left processes behind: \d+ (sh|sleep)"):
            console.finish(timeout=20)
        deadline = time.monotonic() + 10
        while console._session_members() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not console._session_members()
