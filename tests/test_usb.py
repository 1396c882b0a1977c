"""Updates without a network, end to end (issue 8, part 3; DESIGN 3.6 ``--from DIR``).

The operator exports with the real ``opq-box-publish export``; the box runs the real CLI with
``run --from STICK`` / ``check --from STICK`` and dpkg in its temporary root. The box's
``server_url`` and ``report_url`` point at a recording server on 127.0.0.1 that serves the
same stick: a ``--from`` run must leave its log empty, and the same stick fetched over the
network must be refused with the same exit code and the same message (the location aside).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, Box
from debs import require_tool
from faultserver import FaultServer
from reposim import RepoSim
from test_apply_e2e import APPLY_FAILED, DPKG_TOOLS, OK, UPDATE_AVAILABLE, World

from opq_box_updater.faults import FAULT_ENV
from opq_box_updater.publish.export import export_repo

REFUSED, NETWORK = 3, 4
PUBLISH = [sys.executable, "-m", "opq_box_updater.publish.cli"]


class Usb(World):
    """A :class:`World` whose server serves the stick, not the repository."""

    @property
    def stick(self) -> Path:
        return self.tmp / "stick"

    def export(self, dest: Path | None = None, version_file: str = "version.json") -> Path:
        """What the operator does: ``opq-box-publish export REPO DIR``."""
        dest = dest or self.stick
        proc = subprocess.run([*PUBLISH, "export", str(self.sim.path), str(dest),
                               "--version-file", version_file],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "mount -o ro,nodev,nosuid,noexec" in proc.stdout
        return dest

    def offline(self, *args: str, expect: int, stick: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
        """``args --from STICK``; asserts the exit code and that no request was made."""
        before = len(self.server.log)
        proc = self.run(*args, "--from", str(stick or self.stick), expect=expect)
        assert self.server.log[before:] == [], "a --from run used the network"
        return proc


@pytest.fixture
def usb(tmp_path: Path, box_factory: Any) -> Iterator[Usb]:
    for tool in DPKG_TOOLS:
        require_tool(tool)
    sim = RepoSim(tmp_path / "repo")
    (tmp_path / "stick").mkdir()
    with FaultServer(tmp_path / "stick") as server:
        box = box_factory(server.url, sim.anchor, report_url=f"{server.url}/report")
        yield Usb(tmp_path, sim, server, box)


@contextlib.contextmanager
def mounted_like_a_stick(source: Path, target: Path) -> Iterator[Path]:
    """``source`` at ``target`` with the operator's options (a bind mount: this kernel may
    have no vfat): ``mount -o ro,nodev,nosuid,noexec``."""
    mount, umount = require_tool("mount"), require_tool("umount")
    target.mkdir()
    subprocess.run([mount, "--bind", str(source), str(target)], check=True)
    try:
        subprocess.run([mount, "-o", "remount,bind,ro,nodev,nosuid,noexec", str(target)],
                       check=True)
        yield target
    finally:
        subprocess.run([umount, str(target)], check=True)


def test_a_genuine_stick_updates_a_box_with_hooks_and_rolls_back_like_the_network(
        usb: Usb) -> None:
    u = usb
    u.hook("pre-update.d", "10-log", f'echo "pre-update $OPQ_UPDATE_VERSION" >> {u.order}')
    u.publish(1, [u.deb("alpha", "1.0")])
    u.export()
    assert {p.relative_to(u.stick).as_posix() for p in u.stick.rglob("*")} == {
        "root", "root/1.root.json", "packages", "version.json",
        u.sim.current().package.path}  # type: ignore[union-attr]

    with mounted_like_a_stick(u.stick, u.tmp / "mnt") as mnt:
        proc = u.offline("check", expect=UPDATE_AVAILABLE, stick=mnt)
        assert "release 1 is available" in proc.stdout
        before = u.box.digest()
        proc = u.offline("run", "--dry-run", expect=OK, stick=mnt)
        assert "would download packages/" in proc.stdout and "alpha_1.0_all.deb" in proc.stdout
        assert u.box.digest() == before and u.lines() == []
        u.offline("run", expect=OK, stick=mnt)
    u.assert_clean({"alpha": "1.0"})
    lines = u.lines()
    assert lines[:2] == ["pre-update 1", "postinst alpha 1.0"]
    assert lines[2].startswith("run 1 ") and lines[3:] == ["healthcheck"]
    status = u.box.status()
    assert status["installed_version"] == 1 and status["last_result"] == "updated"
    u.offline("check", expect=OK)

    # Release 2 fails its health check: rolled back and marked failed, as over the network.
    u.forget()
    u.publish(2, [u.deb("alpha", "2.0")], healthcheck="exit 1")
    u.export()
    proc = u.offline("run", expect=APPLY_FAILED)
    assert "rolled back" in proc.stderr
    u.assert_clean({"alpha": "1.0"})
    assert u.box.status()["failed_versions"] == [2]
    u.offline("run", expect=OK)  # skipped: failed before

    # Release 3 after a key rotation: the box walks the stick's chain to root v2.
    u.sim.rotate("release")
    u.publish(3, [u.deb("alpha", "3.0")])
    u.export()
    u.offline("run", expect=OK)
    u.assert_clean({"alpha": "3.0"})
    status = u.box.status()
    assert status["installed_version"] == 3 and status["root_version"] == 2
    assert u.server.log == []  # no report either: --from makes no request at all


# --- refused sticks --------------------------------------------------------------------------


def _flip_package(u: Usb) -> None:
    path = u.stick / u.sim.current().package.path  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _flip_signature(u: Usb) -> None:
    doc = json.loads((u.stick / "version.json").read_text())
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    (u.stick / "version.json").write_text(json.dumps(doc))


def _expired(u: Usb) -> None:
    u.sim.publish(2, expires=u.sim.now - timedelta(days=1),
                  issued=u.sim.now - timedelta(days=31))
    shutil.copy(u.sim.path / "version.json", u.stick / "version.json")


def _rollback(u: Usb) -> None:
    """The box has release 3 (from a newer stick); the stick holds release 2."""
    shutil.copytree(u.stick, u.tmp / "old-stick")
    u.sim.publish(3)
    export_repo(u.sim.path, u.stick)
    u.offline("run", expect=OK)
    shutil.rmtree(u.stick)
    shutil.move(u.tmp / "old-stick", u.stick)


def _other_channel(u: Usb) -> None:
    """A validly signed release of the beta channel, copied over version.json."""
    u.sim.publish(5, version_file="version-beta.json")
    beta = export_repo(u.sim.path, u.tmp / "beta-stick", version_file="version-beta.json")
    shutil.copy(u.tmp / "beta-stick/version-beta.json", u.stick / "version.json")
    shutil.copy(u.tmp / "beta-stick" / beta.release.package.path,
                u.stick / beta.release.package.path)


def _stranger(u: Usb) -> None:
    u.sim.publish(2, signers=[u.sim.stranger()])
    shutil.copy(u.sim.path / "version.json", u.stick / "version.json")


def _missing_root(u: Usb) -> None:
    """Release 2 names root v2, which the stick lacks (the network's 404 for a root)."""
    u.sim.rotate("release")
    u.sim.publish(2)
    export_repo(u.sim.path, u.stick)
    (u.stick / "root/2.root.json").unlink()


#: name -> (tamper, exit code, words of the message, same message over the network)
ATTACKS: dict[str, tuple[Callable[[Usb], None], int, tuple[str, ...], bool]] = {
    "package-byte": (_flip_package, REFUSED, ("SHA-256 mismatch",), True),
    "signature": (_flip_signature, REFUSED, ("signature",), True),
    "expired": (_expired, REFUSED, ("expired",), True),
    "rollback": (_rollback, REFUSED, ("older",), True),
    "other-channel": (_other_channel, REFUSED, ("channel",), True),
    "stranger": (_stranger, REFUSED, ("signature",), True),
    "missing-root": (_missing_root, REFUSED, ("names root v2", "root/2.root.json"), False),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_bad_stick_is_refused_like_the_network_and_changes_nothing(
        usb: Usb, attack: str) -> None:
    tamper, code, words, same_over_network = ATTACKS[attack]
    u = usb
    u.sim.publish(1)
    export_repo(u.sim.path, u.stick)
    u.offline("run", expect=OK)
    u.sim.publish(2)
    v2 = export_repo(u.sim.path, u.stick).release.package.sha256
    tamper(u)
    installed = u.box.status()["installed_version"]
    before = u.box.digest()

    proc = u.offline("run", expect=code)

    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(w in line for w in words), proc.stderr
    after = u.box.digest()
    if attack == "package-byte":  # bookkeeping DESIGN 3.1 allows: a verified release's floor
        for name in ("state.json", "release.json"):
            before.pop(str(u.box.state_dir / name)), after.pop(str(u.box.state_dir / name))
    assert after == before
    status = u.box.status()
    assert status["last_result"] == "refused" and status["failed_versions"] == []
    assert status["installed_version"] == installed
    assert not list(u.box.download_dir.glob(f"{v2}*"))  # no byte of release 2 kept
    # check does not download the package: a bad one is found only by run
    u.offline("check", expect=UPDATE_AVAILABLE if attack == "package-byte" else code)
    if same_over_network:  # the same stick served over HTTP: the same refusal
        network = u.run("run", expect=code)
        over_http = network.stderr.strip().splitlines()[-1]
        assert _untimed(over_http.replace(u.server.url, str(u.stick))) == _untimed(line)


def _untimed(line: str) -> str:
    """A message without the times in it (an expiry message names the current time)."""
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", line)


@pytest.mark.parametrize("missing", ["version.json", "package"])
def test_an_incomplete_stick_is_exit_4_like_a_404(usb: Usb, missing: str) -> None:
    u = usb
    u.sim.publish(1)
    export_repo(u.sim.path, u.stick)
    u.offline("run", expect=OK)
    u.sim.publish(2)
    result = export_repo(u.sim.path, u.stick)
    name = "version.json" if missing == "version.json" else result.release.package.path
    (u.stick / name).unlink()
    before = u.box.digest()
    proc = u.offline("run", expect=NETWORK)
    assert f"{u.stick / name}: no such file" in proc.stderr
    after = u.box.digest()
    if missing == "package":  # the release verified: its floor is kept (DESIGN 3.1)
        for state in ("state.json", "release.json"):
            before.pop(str(u.box.state_dir / state)), after.pop(str(u.box.state_dir / state))
    assert after == before
    assert u.box.status()["last_result"] == "network-error"


def test_a_stick_path_that_does_not_exist_is_a_usage_error(usb: Usb) -> None:
    proc = usb.offline("check", expect=2, stick=usb.tmp / "not-mounted")
    assert "not-mounted" in proc.stderr and "mount -o" in proc.stderr
    # The mount point exists, nothing is mounted on it: the same, not "an incomplete copy".
    usb.sim.publish(1)
    (usb.tmp / "mnt").mkdir()
    before = usb.box.digest()
    proc = usb.offline("run", expect=2, stick=usb.tmp / "mnt")
    assert "is the stick mounted?" in proc.stderr
    assert usb.box.digest() == before


def test_box_reads_the_stick_it_is_given_not_the_server(usb: Usb, tmp_path: Path) -> None:
    """``--from`` wins over ``server_url`` even when the server has a newer release."""
    u = usb
    u.sim.publish(1)
    export_repo(u.sim.path, tmp_path / "v1")
    u.sim.publish(2)
    export_repo(u.sim.path, u.stick)  # the server (serving the stick) has release 2
    u.offline("run", expect=OK, stick=tmp_path / "v1")
    assert u.box.status()["installed_version"] == 1
    box: Box = u.box
    assert box.run("check").returncode == UPDATE_AVAILABLE  # over the network: release 2


# --- power cuts ------------------------------------------------------------------------------


@pytest.mark.parametrize("cut,converged,next_run", [
    ("after-dpkg", {"alpha": "2.0"}, ("run",)),  # cron, server unreachable: recovers, then 4
    ("apply", {"alpha": "1.0"}, ("run", "--from")),  # by hand, the stick gone: rolled back, 5
], ids=["after-dpkg", "apply"])
def test_a_power_cut_during_a_stick_update_converges_without_the_stick(
        usb: Usb, cut: str, converged: dict[str, str], next_run: tuple[str, ...]) -> None:
    """The box recovers from its own copy of the package before it looks for any source:
    the next run converges to the old or the new release whether the stick is there or not."""
    u = usb
    u.publish(1, [u.deb("alpha", "1.0")])
    u.export()
    u.offline("run", expect=OK)
    u.publish(2, [u.deb("alpha", "2.0")])
    u.export()
    proc = subprocess.run([PY, "-m", "opq_box_updater.cli", "--config", str(u.box.config_path),
                           "run", "--from", str(u.stick)], capture_output=True, text=True,
                          env={**os.environ, FAULT_ENV: cut}, timeout=300)
    assert proc.returncode == -9, proc.stderr
    shutil.rmtree(u.stick)  # the stick is gone; the server has nothing either
    args = (*next_run, str(u.stick)) if next_run[-1] == "--from" else next_run
    proc = u.run(*args, expect=NETWORK if cut == "after-dpkg" else APPLY_FAILED)
    status = u.assert_clean(converged)
    assert status["installed_version"] == (2 if cut == "after-dpkg" else 1)
    assert status["failed_versions"] == []  # an interruption says nothing about the release


def test_the_stick_carries_the_release_rollout(usb: Usb) -> None:
    """A release rolled out to 0% is not taken from a stick either (exit 0, nothing done)."""
    u = usb
    u.sim.publish(1, rollout=0)
    export_repo(u.sim.path, u.stick)
    proc = u.offline("check", expect=OK)
    assert "rolled out to 0% of boxes" in proc.stdout
    u.offline("run", expect=OK)
    status = u.box.status()
    assert status["installed_version"] == 0 and status["last_result"] == "outside-rollout"


def test_max_package_bytes_holds_for_a_stick(usb: Usb) -> None:
    """The box's own cap refuses a larger package before a byte of it is copied (3)."""
    u = usb
    u.box.write_config(max_package_bytes=100)
    u.sim.publish(1)
    export_repo(u.sim.path, u.stick)
    proc = u.offline("run", expect=REFUSED)
    assert "over max_package_bytes (100)" in proc.stderr
    assert not list(u.box.download_dir.glob("*.zip")) and not list(
        u.box.download_dir.glob("*.part"))
