"""Updates from a USB stick on a box installed from the built debs, in a clean Debian 12 root
(issue 8, part 3: "all three paths are tested in clean Debian 12 roots").

What an operator does, in order: ``apt-get install ./opq-box-updater_*.deb
./python3-opq-box-updater_*.deb`` (built with the repository's trust anchor) into a root
made by ``mmdebstrap`` (the cached tarball of tests/test_debian_install.py), then
``opq-box-publish export REPO DIR`` of a repository made with the publisher. DIR becomes an
ext4 image loop-mounted ``ro,nodev,nosuid,noexec`` at the root's ``/mnt/usb`` (the kernel
here has no vfat; where loop devices are missing, a read-only bind mount with the same
options), and ``opq-box-updater run --from /mnt/usb`` runs in the chroot inside a network
namespace of its own: no server is reachable, not even 127.0.0.1.

* release 1 from the stick installs its .deb with the root's dpkg and runs its script;
* release 2 on a stick whose package had one byte changed, and on one whose version file was
  edited, is refused with exit 3, and the root's dpkg status and the installed files stay
  byte for byte what they were;
* the genuine release-2 stick then installs: the refusals were the tampering's doing.

One root, one build and one repository for the module; every mount is undone in teardown,
failures included.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_debian_install import (
    LIBRARY,
    PAYLOAD,
    PROJECT,
    PUBLISH,
    RAN_MARKER,
    SYSTEM_PATH,
    Root,
    _mounts_under,
    _require_prerequisites,
    _run,
    _unavailable,
    build_debs,
    build_payload_deb,
    preseed,
    publish_release,
    root_tarball,
)

pytestmark = [pytest.mark.slow, pytest.mark.root]

MOUNT_POINT = "/mnt/usb"
STICK_OPTIONS = "ro,nodev,nosuid,noexec"
#: Nothing listens here, and the runs are in a network namespace without a route anyway.
UNREACHABLE_URL = "http://127.0.0.1:9/opq/"
REFUSED = 3


@dataclass
class StickWorld:
    root: Root
    repo: Path
    tmp: Path

    def export(self, name: str) -> Path:
        """``opq-box-publish export REPO DIR``, as docs/operations.md says."""
        dest = self.tmp / name
        proc = _run([str(PUBLISH), "export", str(self.repo), str(dest)])
        assert f"mount -o {STICK_OPTIONS}" in proc.stdout, proc.stdout
        return dest

    def offline(self, command: str) -> subprocess.CompletedProcess[str]:
        """``command`` in the chroot, in a network namespace of its own."""
        return self.root.sh(command, check=False, network=False)

    def payload(self) -> str:
        return self.root.sh(f"dpkg-query -W -f '${{Version}} ${{Status}}' {PAYLOAD}").stdout

    def status(self) -> dict[str, object]:
        return dict(json.loads(self.root.sh("opq-box-updater status --json").stdout))


@contextlib.contextmanager
def mounted_stick(world: StickWorld, export: Path) -> Iterator[str]:
    """``export`` as a stick at the root's /mnt/usb; yields how it is mounted. Always
    unmounted (and its loop device freed) on the way out."""
    target = world.root.file(MOUNT_POINT)
    target.mkdir(parents=True, exist_ok=True)
    image = export.with_suffix(".img")
    size = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    with image.open("wb") as handle:
        handle.truncate(size + 16 * 1024 * 1024)
    _run(["mkfs.ext4", "-q", "-F", "-d", str(export), str(image)],
         env={"PATH": SYSTEM_PATH})
    loop = subprocess.run(["mount", "-o", f"loop,{STICK_OPTIONS}", str(image), str(target)],
                          capture_output=True, text=True, check=False)
    how = "loop-mounted ext4 image"
    try:
        if loop.returncode != 0:  # a container without loop devices
            how = f"read-only bind mount ({loop.stderr.strip()})"
            _run(["mount", "--bind", str(export), str(target)])
            _run(["mount", "-o", f"remount,bind,{STICK_OPTIONS}", str(target)])
        options = _run(["findmnt", "-n", "-o", "OPTIONS", str(target)]).stdout
        assert {"ro", "nodev", "nosuid", "noexec"} <= set(options.strip().split(",")), options
        yield how
    finally:
        while str(target) in _mounts_under(target.parent):
            if subprocess.run(["umount", str(target)], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", str(target)], check=False)
        for line in _run(["losetup", "-n", "-O", "NAME", "-j", str(image)]).stdout.split():
            subprocess.run(["losetup", "-d", line], check=False)
        image.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StickWorld]:
    _require_prerequisites()
    subprocess.run([str(PROJECT / "scripts/need-apt"), "e2fsprogs"], check=False)
    for tool in ("mkfs.ext4", "losetup", "findmnt", "mount", "umount"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            _unavailable(f"{tool} is missing (apt-get install e2fsprogs mount util-linux)")
    tmp = tmp_path_factory.mktemp("usbroot")
    publish = tmp / "publish"
    publish.mkdir()
    repo = publish_release(publish)
    debs = build_debs(tmp / "dist", trust_root=repo / "root/1.root.json")

    path = tmp / "root"
    path.mkdir()
    _run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(root_tarball())])
    policy = path / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    root = Root(path)
    try:
        preseed(root, UNREACHABLE_URL)
        for name in ("opq-box-updater", LIBRARY):
            shutil.copy(debs[name], root.file("/tmp"))
        root.sh(f"cd /tmp && apt-get install -y --no-install-recommends "
                f"./{debs['opq-box-updater'].name} ./{debs[LIBRARY].name}")
        yield StickWorld(root, repo, tmp)
    finally:
        for point in sorted(_mounts_under(path), reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False)
        if not _mounts_under(path):  # never delete through a mount into the host
            shutil.rmtree(path, ignore_errors=True)


def release_2(world: StickWorld) -> None:
    """Release 2: the payload at 2.0, signed by the repository's keys."""
    keys = world.repo.parent / "keys"
    deb = build_payload_deb(world.tmp, version="2.0")
    package = world.tmp / "update-2.zip"
    _run([str(PUBLISH), "build", str(package), "--deb", str(deb), "--version", "2"])
    _run([str(PUBLISH), "release", str(world.repo), str(package), "--keys", str(keys)])


def flip_package_byte(stick: Path) -> None:
    """One byte of the package changed; length kept, so only the hash can tell."""
    (package,) = (stick / "packages").iterdir()
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x01
    package.write_bytes(bytes(data))


def edit_version_file(stick: Path) -> None:
    """The signed release's expiry pushed out by a year: the signature no longer matches."""
    version = stick / "version.json"
    signed = json.loads(version.read_text())
    expires = signed["signed"]["expires"]
    signed["signed"]["expires"] = str(int(expires[:4]) + 1) + expires[4:]
    version.write_text(json.dumps(signed))


def test_a_box_installed_from_its_debs_updates_from_a_stick_and_refuses_a_tampered_one(
        world: StickWorld) -> None:
    genuine_1 = world.export("stick-1")
    with mounted_stick(world, genuine_1) as how:
        checked = world.offline(f"opq-box-updater check --from {MOUNT_POINT}")
        assert checked.returncode == 100, (how, checked)
        ran = world.offline(f"opq-box-updater run --from {MOUNT_POINT}")
        assert ran.returncode == 0, (how, ran)
    assert world.payload() == "1.0 install ok installed"
    assert world.root.file(RAN_MARKER).read_text().split() == ["1", "0"]
    status = world.status()
    assert status["installed_version"] == 1 and status["last_result"] == "updated", status

    release_2(world)
    genuine_2 = world.export("stick-2")
    dpkg_status = world.root.file("/var/lib/dpkg/status")
    hello = world.root.file(f"/usr/share/{PAYLOAD}/hello")
    before = (dpkg_status.read_bytes(), hello.read_bytes())
    tampering = ((flip_package_byte, (f"error: {MOUNT_POINT}/packages/", "SHA-256 mismatch")),
                 (edit_version_file, ("error: release v2: 0 valid signature(s)",)))
    for tamper, says in tampering:
        stick = world.tmp / f"tampered-{tamper.__name__}"
        shutil.copytree(genuine_2, stick)
        tamper(stick)
        with mounted_stick(world, stick) as how:
            refused = world.offline(f"opq-box-updater run --from {MOUNT_POINT}")
        assert refused.returncode == REFUSED, (tamper.__name__, how, refused)
        assert all(text in refused.stderr for text in says), refused.stderr
        assert (dpkg_status.read_bytes(), hello.read_bytes()) == before, tamper.__name__
        assert world.status()["installed_version"] == 1
    assert world.root.sh("dpkg --audit").stdout == ""

    with mounted_stick(world, genuine_2) as how:
        ran = world.offline(f"opq-box-updater run --from {MOUNT_POINT}")
    assert ran.returncode == 0, (how, ran)
    assert world.payload() == "2.0 install ok installed"
    assert world.status()["installed_version"] == 2
    assert not _mounts_under(world.root.file("/mnt"))
