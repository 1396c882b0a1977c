"""Local faults through the real CLI (issue 5.3): disk, state, log, clock and config.

Disk full is a small tmpfs mounted over the box's download directory (the tests run as root;
under ``CI`` a mount that cannot be made fails the test instead of skipping it). Read-only
directories are read-only bind mounts, because root ignores file modes. The clock is moved
with ``faketime`` (Debian package ``faketime``) around the CLI only.

What each fault must give (the operator's view):

* **disk full** (download or extraction): exit 1 — a local problem, neither a refusal (3)
  nor the server's fault (4) — with one line naming the directory; the release is *not*
  marked failed, nothing is applied, what was downloaded is kept, and the next run with
  space resumes and installs;
* **unwritable state directory**: exit 1 with one line naming the path; nothing changes;
* **corrupt state.json**: moved aside, a fresh state begins (one error line, exit 0); the
  next run is quiet: no crash loop;
* **unwritable log file**: the run works and says so once;
* **clock at 1970**: a box that has seen a release still refuses metadata that expired
  before it (``trusted_now``) and takes the current release; **at 2100** everything has
  expired: exit 3, saying so;
* **malformed config**: exit 2 naming the key and the file; unknown keys only in the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, Box, require_tool
from faultserver import FaultServer
from reposim import DAY, RepoSim

LOCAL, CONFIG, REFUSED = 1, 2, 3


# --- mounts ----------------------------------------------------------------------------------


def _mount(*args: str) -> None:
    """Run mount; if it is impossible here (not root, no CAP_SYS_ADMIN), fail under CI and
    skip otherwise."""
    mount = require_tool("mount")
    proc = subprocess.run([mount, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        message = f"mount {' '.join(args)} failed: {proc.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _umount(path: Path) -> None:
    umount = require_tool("umount")
    if subprocess.run([umount, str(path)], capture_output=True, check=False).returncode:
        subprocess.run([umount, "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created if missing), always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


def resize(path: Path, size: str) -> None:
    """Grow a mounted tmpfs; its files stay."""
    _mount("-o", f"remount,size={size}", str(path))


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` made read-only by a read-only bind mount of itself, always unmounted."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        _umount(path)


# --- the world: a box with release 1 installed -------------------------------------------------


@dataclass
class World:
    tmp: Path
    sim: RepoSim
    server: FaultServer
    box: Box

    def marker(self, version: int) -> Path:
        return self.tmp / f"ran-{version}"

    def publish(self, version: int, payload: int = 0, **kwargs: Any) -> int:
        """Publish ``version`` (run script touching ``marker(version)``, plus ``payload``
        random bytes); returns the package length."""
        script = f"#!/bin/sh\necho ran >> {self.marker(version)}\n".encode()
        members = {"payload.bin": os.urandom(payload)} if payload else None
        self.sim.publish(version, package=self.sim.make_package(version, run=script,
                                                                members=members), **kwargs)
        release = self.sim.current()
        assert release is not None
        return release.package.length

    @property
    def package_path(self) -> str:
        release = self.sim.current()
        assert release is not None
        return "/" + release.package.path


@pytest.fixture
def world(tmp_path: Path, box_factory: Any) -> Iterator[World]:
    sim = RepoSim(tmp_path / "repo")
    with FaultServer(sim.path) as server:
        w = World(tmp_path, sim, server, box_factory(server.url, sim.anchor))
        w.publish(1)
        assert_ok(w.box.run("run"))
        assert w.marker(1).read_text() == "ran\n"
        yield w


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """A ``-q`` run ended with ``code`` and exactly one ``error:`` line naming ``fragments``."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], proc.stderr
    return lines[0]


def assert_still_release_1(w: World, result: str) -> None:
    status = w.box.status()
    assert status["installed_version"] == 1
    assert status["last_result"] == result
    assert status["failed_versions"] == [], "a local fault must not mark the release failed"
    assert status["phase"] == "idle"
    assert not w.marker(2).exists(), "nothing of release 2 may have been applied"


# --- disk full -------------------------------------------------------------------------------


def test_disk_full_during_download_then_resume_with_space(world: World) -> None:
    w = world
    length = w.publish(2, payload=512 * 1024)
    assert w.box.run("check").returncode == 100  # release 2 verified and recorded
    before = w.box.digest()
    with tmpfs(w.box.download_dir, "256k") as cache:
        proc = w.box.run("-q", "run")
        line = one_error_line(proc, LOCAL, "No space left on device", str(cache))
        assert "resume" in line  # says what happens next
        assert w.box.digest() == before
        assert_still_release_1(w, "error")
        parts = list(cache.glob("*.part"))
        assert len(parts) == 1 and 0 < parts[0].stat().st_size < length
        kept = parts[0].stat().st_size

        resize(cache, "8m")  # the operator frees space
        assert_ok(w.box.run("run"))
        assert w.box.status()["installed_version"] == 2
        assert w.marker(2).read_text() == "ran\n"
    # Only the missing part is fetched again. (What the first request put on the wire is no
    # measure here: loopback buffers take the whole package before the disk fills.)
    requests = w.server.requests_for(w.package_path)
    assert len(requests) == 2
    assert requests[-1].headers.get("Range") == f"bytes={kept}-"
    assert (requests[-1].status, requests[-1].bytes_sent) == (206, length - kept)


def test_disk_full_during_extraction_then_success_with_space(world: World) -> None:
    w = world
    w.publish(2, payload=160 * 1024)  # the zip fits in 256k, the zip plus its contents not
    before = w.box.digest()
    with tmpfs(w.box.download_dir, "256k") as cache:
        proc = w.box.run("-q", "run")
        one_error_line(proc, LOCAL, "No space left on device", str(cache))
        assert not list(cache.glob("extract-*")), "a failed extraction leaves nothing"
        assert len(list(cache.glob("*.zip"))) == 1, "the verified download is kept"
        changed = {k for k in set(before) | set(w.box.digest())
                   if before.get(k) != w.box.digest().get(k)}
        # Release 2 verified before the disk filled: its floor and validators are kept.
        assert changed <= {str(w.box.state_dir / "state.json"),
                           str(w.box.state_dir / "release.json")}, changed
        assert_still_release_1(w, "error")

        resize(cache, "8m")
        assert_ok(w.box.run("run"))
    assert w.box.status()["installed_version"] == 2
    assert w.marker(2).read_text() == "ran\n"
    assert len(w.server.requests_for(w.package_path)) == 1, "not downloaded again"


# --- state directory -------------------------------------------------------------------------


def test_unwritable_state_directory_is_one_clear_line(world: World) -> None:
    w = world
    w.publish(2)
    before = w.box.digest()
    with read_only(w.box.state_dir):
        proc = w.box.run("-q", "run")
        one_error_line(proc, LOCAL, str(w.box.state_dir), "Read-only file system")
        status = w.box.run("status")  # status only reads: it still works
        assert status.returncode == 0 and "installed version: 1" in status.stdout
    assert w.box.digest() == before
    assert not w.marker(2).exists()
    assert_ok(w.box.run("run"))
    assert w.box.status()["installed_version"] == 2


CORRUPT = {
    "empty": b"",
    "truncated": b'{"format": 1, "installed_version": 1, "flo',
    "zeros after a power cut": bytes(4096),
    "not an object": b"[1, 2]",
    "time floor not a time": b'{"format": 1, "installed_version": 1, "time_floor": "soon"}',
    "packages not a map": b'{"format": 1, "installed_version": 1, "applied_packages": 5}',
    "journal version not a number":
        b'{"format": 1, "journal": {"phase": "applying", "target_version": "x"}}',
    "failed versions a string": b'{"format": 1, "failed_versions": "12"}',
    "installed version a bool": b'{"format": 1, "installed_version": true}',
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_state_is_moved_aside_and_the_box_recovers(world: World, name: str) -> None:
    w = world
    (w.box.state_dir / "state.json").write_bytes(CORRUPT[name])

    proc = w.box.run("-q", "run")

    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and "moved to" in lines[0], proc.stderr
    aside = list(w.box.state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == CORRUPT[name]
    # A fresh state re-installs the current release (documented in state.Store.load).
    assert w.box.status()["installed_version"] == 1
    assert w.box.status()["root_version"] == 1
    again = w.box.run("-q", "run")  # no crash loop: a quiet, normal run
    assert (again.returncode, again.stderr) == (0, "")
    assert w.box.status()["last_result"] == "up-to-date"


@pytest.mark.parametrize("name", ["truncated", "packages not a map"])
def test_status_reports_a_corrupt_state_and_leaves_it_to_the_next_run(world: World,
                                                                       name: str) -> None:
    """``status`` takes no lock, so it must not move state.json aside (a run may be writing
    a good one at that instant); it says what the next run will do, and does not crash."""
    w = world
    state = w.box.state_dir / "state.json"
    state.write_bytes(CORRUPT[name])
    proc = w.box.run("status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["installed_version"] == 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and "next run" in lines[0], proc.stderr
    assert state.read_bytes() == CORRUPT[name]
    assert not list(w.box.state_dir.glob("state.json.corrupt-*"))


# --- log file --------------------------------------------------------------------------------


@contextlib.contextmanager
def log_as_directory(w: World) -> Iterator[None]:
    w.box.write_config(log_file=str(w.tmp))
    yield


@contextlib.contextmanager
def log_on_read_only_mount(w: World) -> Iterator[None]:
    w.box.log_file.parent.mkdir(parents=True, exist_ok=True)
    with read_only(w.box.log_file.parent):
        yield


@contextlib.contextmanager
def log_on_full_disk(w: World) -> Iterator[None]:
    """The log file opens fine, then every write fails (/var/log full)."""
    w.box.log_file.unlink(missing_ok=True)
    with tmpfs(w.box.log_file.parent, "16k") as logs:
        with contextlib.suppress(OSError):
            (logs / "filler").write_bytes(bytes(64 * 1024))
        yield


LOG_FAULTS = {"a directory": log_as_directory, "read-only": log_on_read_only_mount,
              "disk full": log_on_full_disk}


@pytest.mark.parametrize("name", LOG_FAULTS)
def test_unwritable_log_file_warns_once_and_the_run_works(world: World, name: str) -> None:
    w = world
    w.publish(2)
    with LOG_FAULTS[name](w):
        proc = w.box.run("run")
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "log file" in line]
    assert len(warnings) == 1, proc.stderr
    assert "cannot write" in warnings[0]
    assert "updated to release 2" in proc.stderr  # the log still reaches stderr
    assert w.box.status()["installed_version"] == 2


# --- the clock -------------------------------------------------------------------------------


# libfaketime bug (wolfcw/libfaketime#426): with the monotonic clock excluded, which Python's
# threads and the fetcher's deadline need, the absolute clock_nanosleep() behind Python
# 3.11's time.sleep() fails with EINVAL (subprocess's wait loop sleeps). Only under faketime,
# time.sleep becomes select() with a relative timeout, which libfaketime leaves alone.
_FAKETIME_SHIM = (
    "import runpy, select, time\n"
    "time.sleep = lambda seconds: select.select([], [], [], seconds) and None\n"
    "runpy.run_module('opq_box_updater.cli', run_name='__main__', alter_sys=True)\n"
)


def run_at(box: Box, when: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with the wall clock at ``when`` (``faketime``); the monotonic clock
    stays real so timeouts and the deadline watchdog behave."""
    faketime = require_tool("faketime")
    return subprocess.run(
        [faketime, when, PY, "-c", _FAKETIME_SHIM, "--config", str(box.config_path), *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"})


def test_clock_at_1970_uses_the_newest_issued_it_has_seen(world: World) -> None:
    w = world
    # Validly signed, but expired a day before the release the box already has was issued:
    # a box trusting its 1970 clock would take it.
    w.publish(2, issued=w.sim.now - 40 * DAY, expires=w.sim.now - DAY)
    before = w.box.digest()
    proc = run_at(w.box, "1970-01-02 00:00:00", "-q", "run")
    one_error_line(proc, REFUSED, "expired")
    assert w.box.digest() == before
    assert w.box.status()["installed_version"] == 1

    w.publish(2)  # the operators publish it properly: current at the newest issued
    proc = run_at(w.box, "1970-01-02 00:00:00", "run")
    assert_ok(proc)
    assert "system clock 1970-01-02" in proc.stderr and "behind" in proc.stderr
    assert w.box.status()["installed_version"] == 2
    assert w.marker(2).read_text() == "ran\n"


def test_clock_at_2100_everything_has_expired(world: World) -> None:
    w = world
    w.publish(2)
    before = w.box.digest()
    for command in ("run", "check"):
        proc = run_at(w.box, "2100-01-01 00:00:00", "-q", command)
        one_error_line(proc, REFUSED, "expired")
    assert w.box.digest() == before
    status = w.box.status()
    assert (status["installed_version"], status["last_result"]) == (1, "refused")
    assert not w.marker(2).exists()


# --- the config file -------------------------------------------------------------------------


def test_config_that_is_not_json_is_exit_2_naming_the_file(world: World) -> None:
    w = world
    good = w.box.config_path.read_text()
    w.box.config_path.write_text(good.rstrip().rstrip("}"))  # the closing brace lost
    before = w.box.digest()
    for command in ("run", "check", "status"):
        proc = w.box.run("-q", command)
        one_error_line(proc, CONFIG, str(w.box.config_path), "not valid JSON")
    assert w.box.digest() == before


@pytest.mark.parametrize(("key", "value", "named"), [
    ("timeouts", {"connect": 5, "read": 5, "total": "fast"}, "timeouts.total"),
    ("max_package_bytes", "1G", "max_package_bytes"),
    ("state_dir", "state", "state_dir"),
    ("server_url", 7, "server_url"),
])
def test_config_value_of_the_wrong_type_is_exit_2_naming_key_and_file(
        world: World, key: str, value: object, named: str) -> None:
    w = world
    w.box.write_config(**{key: value})
    before = w.box.digest()
    proc = w.box.run("-q", "run")
    one_error_line(proc, CONFIG, f"'{named}'", str(w.box.config_path))
    assert w.box.digest() == before


def test_unknown_config_key_is_a_warning_in_the_log_only(world: World) -> None:
    w = world
    w.publish(2)
    w.box.write_config(colour="blue")
    proc = w.box.run("run")
    assert_ok(proc)
    assert "colour" not in proc.stderr
    assert w.box.status()["installed_version"] == 2
    log = w.box.log_file.read_text()
    assert f"{w.box.config_path}: unknown key 'colour' ignored" in log
    assert "colour" in w.box.run("-v", "check").stderr  # with -v, on stderr too


@pytest.mark.parametrize("prefix", ["\ufeff", "// box 17\n"], ids=["BOM", "comment"])
def test_config_edited_by_hand_is_a_clear_error(world: World, prefix: str) -> None:
    """Typical hand edits (an editor's BOM, a comment) are one line naming the file."""
    w = world
    doc = json.loads(w.box.config_path.read_text())
    w.box.config_path.write_text(prefix + json.dumps(doc), encoding="utf-8")
    proc = w.box.run("-q", "run")
    one_error_line(proc, CONFIG, str(w.box.config_path))
