"""Every attack of DESIGN 6 that needs no dpkg, served by a real HTTP server on 127.0.0.1.

Each test asserts the exit code *and* that nothing changed: the installed version, the state
files (byte for byte where metadata is refused before its signatures verify), the trusted
roots, the dpkg root, no script ran, nothing written outside the download directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Box, tree_digest
from faultserver import Fault, FaultServer
from reposim import DAY, RepoSim

REFUSED, NETWORK = 3, 4


@dataclass
class World:
    tmp: Path
    sim: RepoSim
    server: FaultServer
    box: Box
    marker: Path  # an attacker's run script would create this

    def evil_script(self) -> bytes:
        return f"#!/bin/sh\ntouch {self.marker}\n".encode()

    def everything(self) -> dict[str, str]:
        """All files under the test's directory but the repository, the download directory
        and bookkeeping: 'nothing written outside the download directory'."""
        return tree_digest(self.tmp, exclude=(
            self.sim.path, self.sim.keydir, self.sim.path.parent / f"{self.sim.path.name}-build",
            self.box.download_dir, self.box.state_dir / "last_run.json",
            self.box.state_dir / "lock", self.box.log_file.parent, self.box.config_path))

    def state_bytes(self) -> bytes:
        return (self.box.state_dir / "state.json").read_bytes()


@pytest.fixture
def world(tmp_path: Path, box_factory: object) -> Iterator[World]:
    sim = RepoSim(tmp_path / "repo", root_keys=2, root_threshold=2)
    sim.release(1)
    with FaultServer(sim.path) as server:
        box = box_factory(server.url, sim.anchor)  # type: ignore[operator]
        proc = box.run("run")
        assert proc.returncode == 0, proc.stderr
        assert box.status()["installed_version"] == 1
        yield World(tmp_path, sim, server, box, tmp_path / "PWNED")


def assert_refused_untouched(w: World, code: int, *, state_may_change: bool = False) -> None:
    """Run the box and check the exit code and that nothing but bookkeeping changed."""
    before, state_before = w.everything(), w.state_bytes()
    proc = w.box.run("run")
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip(), "a refusal must say why"
    assert "Traceback" not in proc.stderr
    status = w.box.status()
    assert status["installed_version"] == 1
    assert status["last_result"] == ("refused" if code == REFUSED else "network-error")
    assert not w.marker.exists()
    after = w.everything()
    if state_may_change:  # a verified release was accepted; its package then refused
        for name in ("state.json", "release.json"):
            before.pop(str(w.box.state_dir / name)), after.pop(str(w.box.state_dir / name))
    else:
        assert w.state_bytes() == state_before
    assert after == before


# --- arbitrary package -----------------------------------------------------------------------

def test_package_signed_by_a_stranger(world: World) -> None:
    w = world
    w.sim.publish(2, package=w.sim.make_package(2, run=w.evil_script()),
                  signers=[w.sim.stranger()])
    assert_refused_untouched(w, REFUSED)


def test_stranger_root_and_package(world: World) -> None:
    """The attacker replaces the whole chain with its own keys: root v2 signed by itself."""
    w = world
    stranger = w.sim.stranger()
    doc = w.sim.root_doc()
    doc["version"] = 2
    doc["roles"]["root"] = {"keyids": [], "threshold": 1}
    from opq_box_updater.publish.keys import key_id, public_hex
    kid = key_id(stranger)
    doc["keys"] = {kid: {"keytype": "ed25519", "public": public_hex(stranger)}}
    doc["roles"] = {"root": {"keyids": [kid], "threshold": 1},
                    "release": {"keyids": [kid], "threshold": 1}}
    w.sim.write("root/2.root.json", w.sim.sign(doc, [stranger]))
    w.sim.publish(2, package=w.sim.make_package(2, run=w.evil_script()), signers=[stranger],
                  root_version=2)
    assert_refused_untouched(w, REFUSED)
    assert sorted(p.name for p in (w.box.state_dir / "roots").iterdir()) == ["1.root.json"]


# --- rollback and freeze ---------------------------------------------------------------------

def test_rollback_to_an_older_validly_signed_release(world: World) -> None:
    w = world
    old = w.sim.read("version.json")
    w.sim.release(2)
    assert w.box.run("run").returncode == 0
    w.sim.write("version.json", old)
    before = w.box.status()["installed_version"]
    assert before == 2
    state_before = w.state_bytes()
    proc = w.box.run("run")
    assert proc.returncode == REFUSED, proc.stderr
    assert "rollback" in proc.stderr
    assert w.state_bytes() == state_before and w.box.status()["installed_version"] == 2


def test_same_version_reissued_earlier_is_a_rollback(world: World) -> None:
    w = world
    w.sim.publish(1, package=w.sim.make_package(1), issued=w.sim.now - timedelta(hours=1))
    assert_refused_untouched(w, REFUSED)


def test_freeze_expired_release(world: World) -> None:
    w = world
    w.sim.publish(2, issued=w.sim.now - 40 * DAY, expires=w.sim.now - DAY,
                  package=w.sim.make_package(2, run=w.evil_script()))
    assert_refused_untouched(w, REFUSED)


def test_expired_release_still_served_as_304_is_refused(world: World, tmp_path: Path) -> None:
    """A frozen server answering 304 forever cannot keep a box on a release past its expiry:
    here the box's clock is the one thing that moves (faked through the stored release)."""
    w = world
    release = w.box.state_dir / "release.json"
    doc = json.loads(release.read_bytes())
    doc["signed"]["expires"] = "2000-01-01T00:00:00Z"  # unsigned change: only expiry is read
    release.write_text(json.dumps(doc))
    proc = w.box.run("run")
    assert proc.returncode == REFUSED and "expired" in proc.stderr


def test_expired_root_refuses_every_release(tmp_path: Path, box_factory: object) -> None:
    sim = RepoSim(tmp_path / "repo")
    sim.release(1)
    sim.rotate("release", expires=sim.now + timedelta(seconds=1))  # root v2 expires at once
    import time
    time.sleep(2)
    with FaultServer(sim.path) as server:
        box: Box = box_factory(server.url, sim.anchor)  # type: ignore[operator]
        proc = box.run("run")
        assert proc.returncode == REFUSED, proc.stderr
        assert "expired" in proc.stderr
        assert box.status()["installed_version"] == 0


# --- endless data, slow retrieval ------------------------------------------------------------

@pytest.mark.parametrize("path", ["/version.json", "/root/2.root.json"])
def test_endless_metadata_stops_at_the_cap(world: World, path: str) -> None:
    w = world
    w.sim.rotate("release")  # the release names root v2, so the box fetches it
    w.server.set_fault(path, Fault(endless=True))
    # (What the server wrote is no measure of what the box read: loopback socket buffers
    # take megabytes. The fetcher's own tests count the bytes read against the cap.)
    assert_refused_untouched(w, REFUSED)


def test_package_longer_than_signed_length(world: World) -> None:
    w = world
    package = w.sim.make_package(2, run=w.evil_script())
    w.sim.publish(2, package=package, length=len(package) - 100)
    assert_refused_untouched(w, REFUSED, state_may_change=True)
    assert not list(w.box.download_dir.glob("*.part"))  # deleted: retried next run


def test_endless_package_stops_at_length(world: World) -> None:
    w = world
    w.sim.publish(2, package=w.sim.make_package(2, run=w.evil_script()))
    sha = w.sim.current().package.sha256  # type: ignore[union-attr]
    w.server.set_fault(f"/packages/{sha}.zip", Fault(endless=True))
    assert_refused_untouched(w, REFUSED, state_may_change=True)


def test_slow_retrieval_gives_up_at_the_deadline(world: World) -> None:
    w = world
    w.box.write_config(timeouts={"connect": 2, "read": 2, "total": 3})
    w.sim.publish(2)
    w.server.set_fault("/version.json", Fault(trickle=0.5))
    assert_refused_untouched(w, NETWORK)


# --- wrong software, tampering, unsafe packages ----------------------------------------------

def test_validly_signed_package_of_another_release(world: World) -> None:
    w = world
    w.sim.publish(3, package=w.sim.make_package(2, run=w.evil_script()))
    assert_refused_untouched(w, REFUSED, state_may_change=True)
    assert 3 in w.box.status()["failed_versions"]


def test_flipped_byte_in_package(world: World) -> None:
    w = world
    w.sim.publish(2, package=w.sim.make_package(2, run=w.evil_script()))
    sha = w.sim.current().package.sha256  # type: ignore[union-attr]
    w.sim.flip_byte(f"packages/{sha}.zip", offset=100)
    assert_refused_untouched(w, REFUSED, state_may_change=True)
    assert 2 not in w.box.status()["failed_versions"]  # a bad download is retried


@pytest.mark.parametrize("offset", [20, -40, -3])
def test_flipped_byte_in_metadata(world: World, offset: int) -> None:
    w = world
    w.sim.publish(2, package=w.sim.make_package(2, run=w.evil_script()))
    w.sim.flip_byte("version.json", offset=offset)
    assert_refused_untouched(w, REFUSED)


UNSAFE = {
    "zip-slip": {"members": {"../../../PWNED": b"x"}},
    "absolute path": {"members": {"/tmp/PWNED-abs": b"x"}},
    "symlink": {"symlinks": {"link": "/etc/passwd"}},
    "backslash": {"members": {"..\\..\\PWNED": b"x"}},
}


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_package_signed_by_stolen_release_key(world: World, name: str) -> None:
    w = world
    w.sim.publish(2, package=w.sim.make_package(2, run=w.evil_script(),
                                                **UNSAFE[name]))  # type: ignore[arg-type]
    assert_refused_untouched(w, REFUSED, state_may_change=True)
    assert 2 in w.box.status()["failed_versions"]
    assert not Path("/tmp/PWNED-abs").exists()
    assert not list(w.box.download_dir.glob("extract-*"))


def test_zip_bomb_stops_at_max_unpacked_bytes(world: World) -> None:
    w = world
    w.box.write_config(max_unpacked_bytes=1024 * 1024)
    bomb = w.sim.make_package(2, run=w.evil_script(), members={"zeros": bytes(8 * 1024 * 1024)})
    assert len(bomb) < 100 * 1024
    w.sim.publish(2, package=bomb)
    assert_refused_untouched(w, REFUSED, state_may_change=True)
    assert not list(w.box.download_dir.glob("extract-*"))


# --- key rotation: mix-and-match and threshold -----------------------------------------------

def test_mix_and_match_release_signed_by_a_removed_key(world: World) -> None:
    w = world
    old_release_keys = w.sim.release_keys
    w.sim.rotate("release")
    assert w.box.run("run").returncode == 0  # walks to root v2
    assert w.box.status()["root_version"] == 2
    for root_version in (1, 2):
        w.sim.publish(5, package=w.sim.make_package(5, run=w.evil_script()),
                      signers=old_release_keys, root_version=root_version)
        assert_refused_untouched(w, REFUSED)


def test_mix_and_match_refused_after_walking_the_chain(world: World) -> None:
    """The box still trusts root v1: it walks to v2, where the old key is gone."""
    w = world
    old_release_keys = w.sim.release_keys
    w.sim.rotate("release", resign=False)
    w.sim.publish(5, package=w.sim.make_package(5, run=w.evil_script()),
                  signers=old_release_keys, root_version=2)
    assert_refused_untouched(w, REFUSED)
    assert sorted(p.name for p in (w.box.state_dir / "roots").iterdir()) == ["1.root.json"]


def test_threshold_root_signed_by_too_few_keys(world: World) -> None:
    w = world
    w.sim.rotate("release", signers=w.sim.root_keys[:1])  # root threshold is 2
    assert_refused_untouched(w, REFUSED)
    assert w.box.status()["root_version"] == 1


def test_release_naming_a_root_the_server_lacks(world: World) -> None:
    w = world
    w.sim.publish(2, root_version=2)
    assert_refused_untouched(w, REFUSED)


def test_root_rotation_is_followed(world: World) -> None:
    w = world
    w.sim.rotate("root")
    w.sim.rotate("release")
    w.sim.release(2)
    proc = w.box.run("run")
    assert proc.returncode == 0, proc.stderr
    status = w.box.status()
    assert status["root_version"] == 3 and status["installed_version"] == 2


def test_box_with_an_expired_root_recovers_when_a_new_root_is_published(
        tmp_path: Path, box_factory: object) -> None:
    """The stored root's expiry is checked after the walk: otherwise a box whose root expired
    could never reach the operators' new root and would need a visit."""
    import time

    from opq_box_updater.metadata import format_time
    sim = RepoSim(tmp_path / "repo")
    doc = sim.root_doc(1)
    doc["expires"] = format_time(sim.now + timedelta(seconds=2))
    sim.write("root/1.root.json", sim.sign(doc, sim.root_keys))
    sim.release(1)
    with FaultServer(sim.path) as server:
        box: Box = box_factory(server.url, sim.anchor)  # type: ignore[operator]
        assert box.run("run").returncode == 0
        time.sleep(3)
        proc = box.run("check")
        assert proc.returncode == REFUSED and "expired" in proc.stderr
        sim.rotate("root")  # root v2, releases re-signed to name it
        proc = box.run("run")
        assert proc.returncode == 0, proc.stderr
        assert box.status()["root_version"] == 2


# --- channels (DESIGN 2.3) ----------------------------------------------------------------------

def test_another_channels_release_at_this_path_is_refused_and_floors_untouched(
        world: World) -> None:
    """Cross-channel floor poisoning: arm64's validly signed v4 served as version.json must
    not raise this channel's floor, or its own v2 would then be refused as a rollback."""
    w = world
    genuine = w.sim.read("version.json")
    w.sim.release(4, version_file="version-arm64.json")
    w.sim.write("version.json", w.sim.read("version-arm64.json"))
    assert_refused_untouched(w, REFUSED)
    assert "channel 'version-arm64.json'" in w.box.run("run").stderr
    w.sim.write("version.json", genuine)
    w.sim.release(2)
    proc = w.box.run("run")
    assert proc.returncode == 0, proc.stderr
    assert w.box.status()["installed_version"] == 2


def test_moving_a_box_between_channels_never_locks_it_out(world: World) -> None:
    w = world  # installed: version.json v1
    w.sim.release(5, version_file="version-beta.json")
    w.box.write_config(version_file="version-beta.json")
    proc = w.box.run("run")
    assert proc.returncode == 0, proc.stderr
    status = w.box.status()
    assert (status["installed_version"], status["installed_channel"]) == (5, "version-beta.json")

    w.sim.release(2)  # back to stable, whose v2 is below beta's 5: no rollback, no lock-out
    w.box.write_config(version_file="version.json")
    proc = w.box.run("run")
    assert proc.returncode == 0, proc.stderr
    status = w.box.status()
    assert (status["installed_version"], status["installed_channel"]) == (2, "version.json")
    assert w.box.run("run").returncode == 0 and w.box.status()["last_result"] == "up-to-date"


# --- hostile times and text in signed metadata --------------------------------------------------

def test_a_signed_issued_before_1970_is_refused_not_a_corrupt_state(world: World) -> None:
    """Year 0999 used to be accepted, stored as '999-...' and then read back as a corrupt
    state.json on every run (re-applying the release every day)."""
    w = world
    w.sim.publish(2, extra={"issued": "0999-06-01T00:00:00Z"})
    for _ in range(2):
        assert_refused_untouched(w, REFUSED)
    assert not list(w.box.state_dir.glob("state.json.corrupt-*"))


def test_a_lone_surrogate_in_metadata_is_refused_not_a_crash(world: World) -> None:
    w = world
    data = w.sim.publish(2, notes="x")
    assert b'"notes": "x"' in data
    w.sim.write("version.json", data.replace(b'"notes": "x"', b'"notes": "\\ud800"'))
    assert_refused_untouched(w, REFUSED)
    assert "surrogate" in w.box.run("run").stderr


# --- a local unprivileged user (DESIGN 6, threat model) -------------------------------------

def test_state_directory_and_lock_are_private(world: World) -> None:
    w = world
    lock = w.box.state_dir / "lock"
    lock.chmod(0o644)  # as an older version made it: anyone could hold the flock
    w.box.state_dir.chmod(0o755)
    assert w.box.run("run").returncode == 0
    assert oct(w.box.state_dir.stat().st_mode & 0o777) == oct(0o700)
    assert oct(lock.stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("where", ["state", "state/roots", "cache"])
@pytest.mark.parametrize("how", ["owned by nobody", "world-writable", "symlink"])
def test_a_directory_another_user_controls_is_refused(world: World, where: str,
                                                      how: str) -> None:
    """A state or download directory another account owns or may write lets it plant
    symlinks root then writes through, or hold the lock: exit 2, nothing changed."""
    w = world
    w.sim.release(2)
    target = w.box.base / where
    target.mkdir(exist_ok=True)
    if how == "owned by nobody":
        os.chown(target, 65534, 65534)
    elif how == "world-writable":
        target.chmod(0o777)
    else:
        real = w.box.base / f"{target.name}-real"
        target.rename(real)
        target.symlink_to(real)
    before = w.box.digest()
    proc = w.box.run("run")
    assert proc.returncode == 2, proc.stderr
    assert str(target) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert w.box.digest() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("where", ["state", "cache"])
def test_a_directory_below_one_another_user_owns_is_refused(world: World, where: str) -> None:
    """Whoever owns a parent can swap the whole path for a symlink between the check and the
    write (O_NOFOLLOW guards only the last component)."""
    w = world
    w.sim.release(2)
    parent = w.box.base / "home-pi"
    parent.mkdir()
    os.chown(parent, 65534, 65534)
    target = parent / where
    target.mkdir(mode=0o700)
    w.box.write_config(**{"state_dir" if where == "state" else "download_dir_path":
                          str(target) + "/"})
    proc = w.box.run("run")
    assert proc.returncode == 2, proc.stderr
    assert f"below {parent}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_package_over_max_package_bytes_is_refused_before_downloading(world: World) -> None:
    """A local limit: check and run both refuse (3) without downloading, and the release is
    not marked failed, so raising the limit is enough to take it."""
    w = world
    w.sim.release(2)
    length = w.sim.current().package.length  # type: ignore[union-attr]
    w.box.write_config(max_package_bytes=length - 1)
    served = len(w.server.log)
    for command in ("check", "run"):
        proc = w.box.run(command)
        assert proc.returncode == REFUSED, proc.stderr
        assert "max_package_bytes" in proc.stderr
    assert not [r for r in w.server.log[served:] if r.path.startswith("/packages/")]
    assert w.box.status()["failed_versions"] == []
    w.box.write_config(max_package_bytes=length)
    proc = w.box.run("run")
    assert proc.returncode == 0, proc.stderr
    assert w.box.status()["installed_version"] == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_state_directory_still_to_be_made_below_a_foreign_one_is_refused(
        world: World) -> None:
    """The nearest existing directory counts too when the configured one does not exist."""
    w = world
    parent = w.box.base / "home-pi"
    parent.mkdir()
    os.chown(parent, 65534, 65534)
    w.box.write_config(state_dir=str(parent / "not-yet" / "state") + "/")
    proc = w.box.run("run")
    assert proc.returncode == 2, proc.stderr
    assert not (parent / "not-yet").exists()
