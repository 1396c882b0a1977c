"""Network faults through the real CLI (issue 5.2): every fault is exit 4 and one line.

A box has release 1 installed; release 2 (a package of incompressible bytes) is published and
the server misbehaves on ``version.json`` or on the package. Each fault must end the run with
exit 4 and exactly one ``error:`` line on stderr (``-q``, as cron runs it; no traceback), with
nothing changed: the box's files (``Box.digest``), the installed version, ``last_result``
``network-error``. The next healthy run then installs release 2, and where the fault left a
partial download it resumes it: its package request carries a Range header and the package
bytes served over both runs stay within 1.05 x the package size (DESIGN 7).

For package faults the box first runs ``check``, which verifies release 2 and records the
floors and validators like ``apt update``; the faulty run then changes nothing at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Box
from faultserver import Fault, FaultServer
from reposim import RepoSim

from opq_box_updater.httpcheck import valid_etag, valid_last_modified

NETWORK = 4
PAYLOAD = 512 * 1024  # random, so the zip is about as long
HALF = PAYLOAD // 2


@dataclass
class Case:
    """One fault: where, what, what the error line says, and whether a .part survives."""

    target: str  # "version" or "package"
    fault: Fault
    says: str
    partial: bool = False
    config: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "version-500": Case("version", Fault(status=500), "HTTP 500"),
    "version-404": Case("version", Fault(status=404), "HTTP 404"),
    "version-reset": Case("version", Fault(reset_after=100), "connection reset"),
    "version-truncated": Case("version", Fault(truncate_after=100), "closed"),
    "version-content-length-too-long": Case("version", Fault(content_length=60000), "closed"),
    "version-one-byte-per-second": Case("version", Fault(trickle=1.0), "timeouts.total",
                                        config={"timeouts": {"connect": 2, "read": 2,
                                                             "total": 2}}),
    "version-redirect-loop": Case("version", Fault(redirect_loop=True), "redirect"),
    "package-500": Case("package", Fault(status=500), "HTTP 500"),
    "package-404": Case("package", Fault(status=404), "HTTP 404"),
    "package-reset": Case("package", Fault(reset_after=HALF), "connection reset", partial=True),
    "package-truncated": Case("package", Fault(truncate_after=HALF), "closed", partial=True),
    # Declares half the bytes: the client believes it, stops there, and resumes next run.
    "package-content-length-too-short": Case("package", Fault(content_length=HALF),
                                             "ended after", partial=True),
    "package-one-byte-per-second": Case("package", Fault(trickle=1.0), "timeouts.total",
                                        partial=True,
                                        config={"timeouts": {"connect": 2, "read": 2,
                                                             "total": 2.5}}),
    "package-redirect-loop": Case("package", Fault(redirect_loop=True), "redirect"),
    # The deadline when the socket goes with the response (issue 13, 1.1): before the fix
    # these ran for the whole trickle (minutes), far past timeouts.total.
    **{f"{target}-one-byte-per-second-{name}": Case(
        target, Fault(trickle=1.0, **fault), "timeouts.total",  # type: ignore[arg-type]
        partial=target == "package",
        config={"timeouts": {"connect": 2, "read": 2, "total": 2.5}})
       for target in ("version", "package")
       for name, fault in (("connection-close", {"connection_close": True}),
                           ("http-1.0", {"http10": True}))},
    # Hostile headers (issue 13, 1.4): exit 4, never 1.
    "version-superscript-content-length": Case(
        "version", Fault(headers={"Content-Length": "\xb2"}, truncate_after=0),
        "invalid Content-Length"),
    "package-superscript-content-length": Case(
        "package", Fault(headers={"Content-Length": "\xb2"}, truncate_after=0),
        "invalid Content-Length"),
    "version-redirect-to-unclosed-ipv6": Case("version", Fault(redirect_to="http://[::1"),
                                              "Invalid IPv6 URL"),
    "package-redirect-to-bad-ipv6": Case("package", Fault(redirect_to="http://[zzz]/"),
                                         "does not appear to be an IPv4 or IPv6 address"),
    "package-redirect-non-utf-8": Case("package", Fault(redirect_to="/\xff\xfe.zip"),
                                       "can't decode"),
}


@dataclass
class World:
    sim: RepoSim
    server: FaultServer
    box: Box
    package_path: str  # URL path of release 2's package
    length: int


@pytest.fixture
def world(tmp_path: Path, box_factory: Any) -> Iterator[World]:
    sim = RepoSim(tmp_path / "repo")
    sim.release(1)
    with FaultServer(sim.path) as server:
        box: Box = box_factory(server.url, sim.anchor)
        assert_ok(box.run("run"))
        sim.publish(2, package=sim.make_package(2, members={"payload.bin":
                                                            os.urandom(PAYLOAD)}))
        release = sim.current()
        assert release is not None
        yield World(sim, server, box, "/" + release.package.path, release.package.length)


def assert_ok(proc: Any) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    """``stderr`` of a ``-q`` run is exactly one line, ``error: <what>``, naming each
    fragment; returns it."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    assert "Traceback" not in stderr
    return lines[0]


def assert_unchanged_after_network_error(box: Box, before: dict[str, str]) -> None:
    assert box.digest() == before
    status = box.status()
    assert status["installed_version"] == 1
    assert status["last_result"] == "network-error"
    assert status["failed_versions"] == []
    assert status["phase"] == "idle"


@pytest.mark.parametrize("name", CASES)
def test_fault_is_exit_4_then_the_next_run_succeeds_and_resumes(world: World, name: str) -> None:
    case = CASES[name]
    w = world
    if case.config:
        w.box.write_config(**case.config)
    if case.target == "package":
        assert w.box.run("check").returncode == 100  # verify release 2 first
        path = w.package_path
    else:
        path = "/version.json"
    before = w.box.digest()
    w.server.set_fault(path, case.fault)

    proc = w.box.run("-q", "run", timeout=90)  # every fault here ends within 30 s

    assert proc.returncode == NETWORK, proc.stderr
    assert_one_error_line(proc.stderr, w.server.url + path, case.says)
    assert_unchanged_after_network_error(w.box, before)
    parts = list(w.box.download_dir.glob("*.part"))
    if case.partial:
        assert len(parts) == 1 and 0 < parts[0].stat().st_size < w.length, parts
        kept = parts[0].stat().st_size
    else:
        assert parts == []
        kept = 0

    # The server recovers; the next run succeeds, resuming what the faulty one kept.
    w.server.set_fault(path, None)
    w.box.write_config(timeouts={"connect": 5, "read": 5, "total": 30})
    assert_ok(w.box.run("run"))
    status = w.box.status()
    assert (status["installed_version"], status["last_result"]) == (2, "updated")
    served = w.server.requests_for(w.package_path)
    # The healthy run's request (a trickling handler may log after it: find it by shape).
    healthy = [r for r in served if r.status == (206 if kept else 200)
               and r.headers.get("Range") == (f"bytes={kept}-" if kept else None)
               and r.bytes_sent == w.length - kept]
    assert len(healthy) == 1, served
    # A server that declares fewer bytes than it writes (content_length) gets only the
    # declared ones read: count what the box could have received.
    cap = case.fault.content_length if case.fault.content_length is not None else w.length
    total = healthy[0].bytes_sent + sum(min(r.bytes_sent, cap) for r in served
                                        if r is not healthy[0])
    assert total <= 1.05 * w.length, [(r.status, r.bytes_sent) for r in served]
    assert not list(w.box.download_dir.glob("*.part"))


def test_metadata_shorter_than_its_content_length_claims_is_refused_naming_the_url(
        world: World) -> None:
    """A server (or proxy) that declares fewer bytes than the document has: the box believes
    the header, and what it got is no valid document. That is the server serving something
    bad (3, like any malformed metadata), not a transfer failure; nothing is stored, and the
    next run, served properly, succeeds."""
    w = world
    before = w.box.digest()
    w.server.set_fault("/version.json", Fault(content_length=100))
    proc = w.box.run("-q", "run")
    assert proc.returncode == 3, proc.stderr
    assert_one_error_line(proc.stderr, w.server.url + "/version.json", "not valid JSON")
    assert w.box.digest() == before
    assert w.box.status()["last_result"] == "refused"
    w.server.set_fault("/version.json", None)
    assert_ok(w.box.run("run"))
    assert w.box.status()["installed_version"] == 2


#: A reason phrase that, printed raw, sets the terminal's title and clears the screen (with
#: ESC, and with the 8-bit CSI a status line's Latin-1 can carry).
HOSTILE_REASON = "\x1b]0;owned\x07\x1b[2J\x9b2Jerror fixed"


@pytest.mark.parametrize("target", ["version", "package"])
def test_a_hostile_reason_phrase_cannot_drive_the_operators_terminal(
        world: World, target: str) -> None:
    """The server chooses its status line: its controls reach the error line and the log
    escaped, never raw."""
    w = world
    if target == "package":
        assert w.box.run("check").returncode == 100
    path = w.package_path if target == "package" else "/version.json"
    before = w.box.digest()
    w.server.set_fault(path, Fault(status=503, reason=HOSTILE_REASON))

    proc = w.box.run("-q", "run")

    assert proc.returncode == NETWORK, proc.stderr
    line = assert_one_error_line(proc.stderr, "HTTP 503", "\\x1b]0;owned\\x07")
    assert "\\x9b2J" in line
    log = w.box.log_file.read_text(encoding="utf-8")
    assert "\\x1b]0;owned" in log
    for raw in ("\x1b", "\x07", "\x9b"):
        assert raw not in proc.stderr and raw not in log
    assert_unchanged_after_network_error(w.box, before)


def test_unresolvable_host_is_exit_4(world: World) -> None:
    w = world
    before = w.box.digest()
    w.box.write_config(server_url="http://nonexistent.invalid/")

    proc = w.box.run("-q", "run")

    assert proc.returncode == NETWORK, proc.stderr
    assert_one_error_line(proc.stderr, "http://nonexistent.invalid/version.json",
                          "cannot resolve the host name")
    assert_unchanged_after_network_error(w.box, before)
    w.box.write_config(server_url=w.server.url)
    assert_ok(w.box.run("run"))
    assert w.box.status()["installed_version"] == 2


def test_connection_refused_is_exit_4(world: World) -> None:
    """The server is down (nothing listens on its port any more)."""
    w = world
    before = w.box.digest()
    w.server.stop()

    proc = w.box.run("-q", "run")

    assert proc.returncode == NETWORK, proc.stderr
    assert_one_error_line(proc.stderr, "connection refused")
    assert_unchanged_after_network_error(w.box, before)


def test_without_q_the_error_is_still_one_line_after_the_progress_log(world: World) -> None:
    """At the default verbosity stderr also shows what went well; the failure is still
    exactly one ``error:`` line, the last."""
    w = world
    w.server.set_fault(w.package_path, Fault(reset_after=HALF))
    proc = w.box.run("run")
    assert proc.returncode == NETWORK
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and proc.stderr.splitlines()[-1] == errors[0], proc.stderr
    assert errors[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert "verified release 2" in proc.stderr


# --- validator poisoning (issue 13, 1.2) ----------------------------------------------------

POISONS = {
    "folded-etag": {"ETag": '"abc"\r\n "def"'},
    "nul-etag": {"ETag": '"a\x00b"'},
    "10k-etag": {"ETag": '"' + "a" * 10240 + '"'},
    "95-folded-lines": {"ETag": "\r\n ".join(['"x"'] * 95)},
    "folded-last-modified": {"Last-Modified": "Sun, 06 Nov 1994 08:49:37 GMT\r\n x"},
}


def stored_validators(box: Box) -> tuple[Any, Any]:
    state = json.loads((box.state_dir / "state.json").read_text())
    return state.get("etag"), state.get("last_modified")


def assert_state_small_and_clean(box: Box) -> None:
    assert (box.state_dir / "state.json").stat().st_size < 8192
    etag, last_modified = stored_validators(box)
    assert etag is None or valid_etag(etag) == etag
    assert last_modified is None or valid_last_modified(last_modified) == last_modified


@pytest.mark.parametrize("poison", POISONS)
def test_a_validator_poisoned_once_never_locks_the_box_out(world: World, poison: str) -> None:
    """A validly signed release served once with a malformed or huge validator: the box
    installs it, stores no such validator, and every later run still works."""
    w = world
    w.server.set_fault("/version.json", Fault(headers=POISONS[poison], times=1))
    assert_ok(w.box.run("run"))
    assert w.box.status()["installed_version"] == 2
    assert_state_small_and_clean(w.box)
    for _ in range(2):  # before the fix: exit 4 on every run from here on
        assert_ok(w.box.run("-q", "run"))
    w.sim.release(3)
    assert_ok(w.box.run("-q", "run"))
    assert w.box.status()["installed_version"] == 3
    assert_state_small_and_clean(w.box)


def test_validators_poisoned_by_an_older_version_are_never_sent(world: World) -> None:
    """state.json written by an older updater holds a folded ETag: the box asks without it
    (requests would refuse it, nginx answer 400), updates, and stores a valid one."""
    w = world
    path = w.box.state_dir / "state.json"
    state = json.loads(path.read_text())
    assert valid_etag(state["etag"]) == state["etag"]  # the field exists, and is valid now
    state["etag"] = POISONS["folded-etag"]["ETag"]
    path.write_text(json.dumps(state))
    seen = len(w.server.requests_for("/version.json"))
    assert_ok(w.box.run("-q", "run"))
    assert w.box.status()["installed_version"] == 2
    [request] = w.server.requests_for("/version.json")[seen:]
    assert "If-None-Match" not in request.headers and request.status == 200
    assert_state_small_and_clean(w.box)
    assert stored_validators(w.box)[0] is not None
