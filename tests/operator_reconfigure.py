"""``dpkg-reconfigure opq-box-updater`` as an operator uses it: at a 24x80 console.

Called by the clean-root scenario of tests/test_debian_install.py on its installed box (no
root or build of its own). Each run starts the real dpkg-reconfigure on a pseudo-terminal
(tests/ttyconsole.py) and answers only after the question is on the screen: invalid URLs
are refused with the reason and asked again while the file stays as it was; an empty
answer, Ctrl-D and a dropped terminal end the run and keep the URL; a valid URL changes
server_url and nothing else. The default frontend (Dialog) is not installed on a minimal
root: debconf falls back to readline, which is what docs/operations.md tells operators.
Every wait is bounded, so a question asked forever fails instead of hanging the run.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Protocol

from ttyconsole import Console

CONFIG = "/etc/opq/updater_config.json"
QUESTION = r"URL of the OPQ Box update server: $"
#: The operator's shell on the box's console: no DEBIAN_FRONTEND, a Linux console.
CONSOLE_ENV = ("TERM=linux",)
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
NEW_URL = "https://updates.example.org:8443/opq/"


class DebianRoot(Protocol):
    """What tests/test_debian_install.py's ``Root`` offers."""

    def file(self, name: str) -> Path: ...

    def config(self) -> dict[str, object]: ...

    def debconf_answer(self) -> str: ...

    def command(self, script: str, *, network: bool = True,
                env: tuple[str, ...] = ...) -> list[str]: ...


def _reconfigure(root: DebianRoot, frontend: str | None) -> Console:
    """``dpkg-reconfigure [-f FRONTEND] opq-box-updater`` on a fresh 24x80 console."""
    option = f"-f {frontend} " if frontend else ""
    return Console(root.command(f"exec dpkg-reconfigure {option}opq-box-updater",
                                env=CONSOLE_ENV), env=HOST_ENV, rows=24, cols=80)


def _etc_opq(root: DebianRoot) -> dict[str, bytes]:
    """/etc/opq byte for byte: the config and anything else (a temp file left behind)."""
    folder = root.file("/etc/opq")
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir())}


def _words(text: str) -> str:
    """A pattern for ``text`` as debconf shows it: wrapped at any space, spaces collapsed."""
    return r"\s+".join(re.escape(word) for word in text.split())


def _refused(console: Console, root: DebianRoot, answer: str, reason: str,
             before: dict[str, bytes], *, shown: str | None = None) -> None:
    """Type an invalid ``answer``: the reason is shown with the answer (as ``shown``), the
    question comes again, and nothing under /etc/opq changed meanwhile."""
    console.send(answer)
    console.expect(_words(f'The update server URL "{shown or answer}" {reason}'))
    again = console.expect(QUESTION)
    assert "Current URL: " in again, again
    assert _etc_opq(root) == before, f"{answer!r} changed /etc/opq"


def _ended_unchanged(console: Console, root: DebianRoot, url: str,
                     before: dict[str, bytes], *, status: int | None = 0) -> None:
    returncode = console.finish(timeout=60)
    if status is not None:
        assert returncode == status, console.transcript[-3000:]
    assert _etc_opq(root) == before, console.transcript[-3000:]
    assert root.debconf_answer() == url
    assert "[More]" not in console.transcript, "the error and the question fit 24 lines"


def check_interactive_reconfigure(root: DebianRoot, url: str) -> None:
    """The box follows ``url``, its file written by the postinst with the administrator's
    other keys. Ends with the same file, byte for byte."""
    before = _etc_opq(root)
    edited = root.config()
    assert edited["server_url"] == url and len(edited) > 1, edited

    # The command the operations guide gives, with debconf's default frontend.
    with _reconfigure(root, None) as console:
        console.expect(r"falling back to frontend: Readline$")
        shown = console.expect(QUESTION)
        assert f"Current URL: {url}" in shown, shown
        _refused(console, root, "ftp://updates.example.org/", "must start with http:// or https://",
                 before)
        _refused(console, root, "https://emilia.example.org/opq updates/",
                 "contains whitespace", before)
        # The arrow keys of a console without line editing type escape sequences: the
        # error shows them the way the terminal echoed them, not as an invisible cursor move.
        _refused(console, root, "https://emilia.example.org/\x1b[D", "contains whitespace",
                 before, shown="https://emilia.example.org/^[[D")
        console.send("")  # an empty answer keeps the current URL
        _ended_unchanged(console, root, url, before)

    # Ctrl-D after a refused answer ends the run; the refused answer is not kept.
    with _reconfigure(root, "teletype") as console:
        console.expect(QUESTION)
        _refused(console, root, "http://user:secret@updates.example.org/",
                 "must not contain a user name or password", before)
        console.send_eof()
        _ended_unchanged(console, root, url, before)

    # Ctrl-C, and the terminal going away (a dropped SSH session), after a refused answer.
    with _reconfigure(root, "readline") as console:
        console.expect(QUESTION)
        _refused(console, root, "ftp://updates.example.org/", "must start with", before)
        console.send_interrupt()
        _ended_unchanged(console, root, url, before, status=-signal.SIGINT)
    with _reconfigure(root, "readline") as console:
        console.expect(QUESTION)
        _refused(console, root, "ftp://updates.example.org/", "must start with", before)
        console.hang_up()
        _ended_unchanged(console, root, url, before, status=None)

    # A valid answer changes server_url and nothing else, in both frontends.
    with _reconfigure(root, "readline") as console:
        console.expect(QUESTION)
        console.send(f"  {NEW_URL} ")  # pasted with blanks around it
        console.expect(_words(f"{CONFIG} updated (server_url {NEW_URL})"))
        assert console.finish(timeout=60) == 0, console.transcript[-3000:]
    assert root.config() == {**edited, "server_url": NEW_URL}
    assert list(root.config()) == list(edited), "key order kept"
    assert root.debconf_answer() == NEW_URL
    with _reconfigure(root, "teletype") as console:
        shown = console.expect(QUESTION)
        assert f"Current URL: {NEW_URL}" in shown, shown
        console.send(url)
        assert console.finish(timeout=60) == 0, console.transcript[-3000:]
    assert _etc_opq(root) == before
    assert root.debconf_answer() == url
