"""Provisioning from the operators' signed apt repository, in a clean Debian 12 root (issue 8).

One root, one nginx and one build for the module (tests run in file order and leave the root
as they found it): nginx serves the docs' site, the update repository at ``/`` and the apt
repository (``scripts/apt-repo``) at ``/apt/``; the root's apt has exactly the source of
docs/operations.md ("Provisioning from the apt repository"): a keyring file and a deb822
``.sources`` entry with ``Signed-By:``. ``/apt/`` is a link switched between three
repositories: the genuine one, a copy whose ``InRelease`` was edited, and one signed by
another key.

* apt refuses the edited and the stranger-signed repository: ``apt-get update`` fails,
  ``apt-get install`` finds nothing, and nothing but apt's bookkeeping changed;
* ``opq-box-publisher`` installs alone: no cron job, no debconf question, no box config;
* a preseeded box installs ``opq-box-updater`` from it, pinned anchor and all, and its
  first ``check`` finds release 1 on the same nginx; purge leaves the root as it was;
* a box running the 1.0 updater (built from git) takes the split through a release of its
  own updater: a failed health check restores 1.0 whole, the next release installs 1.1;
* a box with the 1.0 two-package layout upgrades from the apt repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nginxfix import Nginx
from test_debian_install import (
    CONFIG,
    LIBRARY,
    PAYLOAD,
    PROJECT,
    RAN_MARKER,
    SYSTEM_PATH,
    Root,
    _mounts_under,
    _require_prerequisites,
    _run,
    _unavailable,
    build_debs,
    changelog_version,
    preseed,
    publish_release,
    root_tarball,
    snapshot,
    snapshot_diff,
)

pytestmark = [pytest.mark.slow, pytest.mark.root]

#: The last commit with the 1.0 layout (the module inside opq-box-updater).
OLD_LAYOUT_COMMIT = "17f103e4664a904e2d50a590d12b216316a855d1"
KEYRING = "/usr/share/keyrings/opq-box-archive-keyring.gpg"
SOURCES = "/etc/apt/sources.list.d/opq-box.sources"
URL = "http://127.0.0.1:{port}/"


@dataclass
class Signer:
    """A throw-away GnuPG home with one ed25519 signing key."""

    home: Path
    fingerprint: str

    def env(self) -> dict[str, str]:
        return {"PATH": SYSTEM_PATH, "GNUPGHOME": str(self.home), "LC_ALL": "C.UTF-8"}

    def export(self, out: Path) -> None:
        out.write_bytes(subprocess.run(["gpg", "--batch", "--export", self.fingerprint],
                                       env=self.env(), capture_output=True,
                                       check=True).stdout)


def make_signer(name: str) -> Signer:
    # Short path: gpg-agent's socket lives in GNUPGHOME when /run/user/0 does not exist.
    home = Path(tempfile.mkdtemp(prefix="opq-gpg-", dir="/tmp"))
    env = {"PATH": SYSTEM_PATH, "GNUPGHOME": str(home), "LC_ALL": "C.UTF-8"}
    _run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
          f"{name} <opq@example.org>", "ed25519", "sign", "never"], env=env)
    listing = _run(["gpg", "--batch", "--with-colons", "--list-keys"], env=env).stdout
    fingerprint = next(line.split(":")[9] for line in listing.splitlines()
                       if line.startswith("fpr:"))
    return Signer(home, fingerprint)


def apt_repo(out: Path, signer: Signer, debs: list[Path]) -> None:
    _run([str(PROJECT / "scripts/apt-repo"), str(out), "--key", signer.fingerprint,
          *map(str, debs)], env=signer.env())


@dataclass
class World:
    root: Root
    url: str
    served: Path          # the link nginx serves as /apt/
    repos: dict[str, Path]
    new: dict[str, Path]
    old: dict[str, Path]
    anchor: Path
    baseline: dict[str, str]
    update_repo: Path

    def serve(self, name: str) -> None:
        tmp = self.served.with_name(".served.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.repos[name])
        os.replace(tmp, self.served)

    def apt(self, command: str) -> subprocess.CompletedProcess[str]:
        return self.root.sh(command, check=False)


def build_old_layout(tmp: Path, anchor: Path) -> dict[str, Path]:
    """opq-box-updater and opq-box-publisher 1.0.0 as released: built from git."""
    def present() -> bool:
        return subprocess.run(["git", "-C", str(PROJECT), "cat-file", "-e",
                               OLD_LAYOUT_COMMIT + "^{commit}"], check=False,
                              capture_output=True).returncode == 0

    if not present():  # a shallow clone (CI's may be): fetch the history from its origin
        subprocess.run(["git", "-C", str(PROJECT), "fetch", "--quiet", "--unshallow"],
                       check=False, capture_output=True, timeout=300)
    if not present():
        _unavailable(f"commit {OLD_LAYOUT_COMMIT[:12]} not in this clone, and fetching the "
                     "history from its origin did not bring it")
    src = tmp / "old-src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(PROJECT), "archive", OLD_LAYOUT_COMMIT],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    _run(["make", "--no-print-directory", "-C", str(src), "deb", f"DIST={tmp / 'old'}",
          f"DEB_WORK={tmp / 'old.work'}", f"TRUST_ROOT={anchor}"], env=env)
    return {deb.name.split("_")[0]: deb for deb in (tmp / "old").glob("*.deb")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    _require_prerequisites()
    for tool in ("gpg", "gpgv", "apt-ftparchive", "git"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            _unavailable(f"{tool} is missing (make apt-repo installs apt-utils gpg gpg-agent)")
    tmp = tmp_path_factory.mktemp("aptrepo")
    publish = tmp / "publish"
    publish.mkdir()
    update_repo = publish_release(publish)
    anchor = update_repo / "root/1.root.json"
    new = build_debs(tmp / "dist", trust_root=anchor)
    old = build_old_layout(tmp, anchor)
    signers = [make_signer("OPQ Box archive"), make_signer("Stranger")]
    operators, stranger = signers
    repos = {"genuine": tmp / "apt-genuine", "tampered": tmp / "apt-tampered",
             "stranger": tmp / "apt-stranger"}
    apt_repo(repos["genuine"], operators, list(new.values()))
    shutil.copytree(repos["genuine"], repos["tampered"])
    inrelease = repos["tampered"] / "dists/bookworm/InRelease"
    text = inrelease.read_text()
    assert "Label: OPQ Box\n" in text
    inrelease.write_text(text.replace("Label: OPQ Box\n", "Label: OPQ Bux\n"))
    apt_repo(repos["stranger"], stranger, list(new.values()))
    # Distinct times, as real repositories have: made within one second, they would share
    # a Last-Modified, and apt would take a 304 for the copy it refused a moment ago.
    for age, repo in enumerate(repos.values()):
        for file in (repo / "dists").rglob("*"):
            stamp = file.stat().st_mtime - 3600 * (age + 1)
            os.utime(file, (stamp, stamp))

    path = tmp / "root"
    path.mkdir()
    _run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(root_tarball())])
    policy = path / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    # Only the operators' source: the test must not reach Debian's mirrors.
    for other in (path / "etc/apt/sources.list.d").iterdir():
        other.unlink()
    (path / "etc/apt/sources.list").unlink(missing_ok=True)
    root = Root(path)
    baseline = snapshot(path)

    served = tmp / "apt-served"
    served.symlink_to(repos["genuine"])
    nginx = Nginx(update_repo, tmp / "nginx", apt_dir=served)
    try:
        nginx.start()
        operators.export(root.file(KEYRING))
        root.file(SOURCES).write_text(
            f"Types: deb\nURIs: {nginx.url}apt/\nSuites: bookworm\nComponents: main\n"
            f"Signed-By: {KEYRING}\n")
        yield World(root, nginx.url, served, repos, new, old, anchor, baseline, update_repo)
    finally:
        nginx.stop()
        for signer in signers:
            subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=signer.env(), check=False)
            shutil.rmtree(signer.home, ignore_errors=True)
        for point in sorted(_mounts_under(path), reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False)
        if not _mounts_under(path):
            shutil.rmtree(path, ignore_errors=True)


def installed(world: World) -> dict[str, str]:
    out = world.root.sh("dpkg-query -W -f '${Package} ${Version} ${db:Status-Abbrev}\\n'"
                        " 'opq-*' 'python3-opq-*' 2>/dev/null || true").stdout
    return {f[0]: f[1] for f in (line.split() for line in out.splitlines())
            if len(f) == 3 and f[2] == "ii"}


def changed_besides_apt(world: World) -> list[str]:
    """What differs from the root before the test, apt's own bookkeeping and the source
    and keyring the test added excepted."""
    diff = snapshot_diff(world.baseline, snapshot(world.root.path))
    return [line for line in diff if SOURCES not in line and KEYRING not in line]


@pytest.mark.parametrize("repo, reason", [
    ("tampered", "BADSIG"),
    ("stranger", "NO_PUBKEY"),
])
def test_apt_refuses_a_repository_not_signed_by_the_operators_key(
        world: World, repo: str, reason: str) -> None:
    world.serve(repo)
    update = world.apt("apt-get update")
    assert update.returncode != 0, update
    assert reason in update.stdout + update.stderr, update
    assert "is not signed" in update.stderr, update.stderr
    lists = sorted(p.name for p in world.root.file("/var/lib/apt/lists").iterdir()
                   if p.name.startswith("127.0.0.1"))
    assert lists == [], lists
    for package in ("opq-box-updater", "opq-box-publisher"):
        attempt = world.apt(f"apt-get install -y --no-install-recommends {package}")
        assert attempt.returncode == 100, attempt
        assert "Unable to locate package" in attempt.stderr, attempt.stderr
    assert installed(world) == {}
    assert changed_besides_apt(world) == []


def test_the_publisher_installs_alone(world: World) -> None:
    """The signing server gets the publisher and the module, nothing of the box."""
    world.serve("genuine")
    world.root.sh("apt-get update")
    world.root.sh("apt-get install -y --no-install-recommends opq-box-publisher")
    version = changelog_version()
    assert installed(world) == {"opq-box-publisher": version, LIBRARY: version}
    for path in ("/etc/cron.d/opq-box-updater", "/etc/opq", "/usr/bin/opq-box-updater",
                 "/etc/logrotate.d/opq-box-updater", "/var/lib/opq-box-updater"):
        assert not world.root.file(path).exists(), path
    templates = world.root.file("/var/cache/debconf/templates.dat").read_text()
    assert "opq-box-updater/" not in templates, "no debconf question on the signing server"
    world.root.sh("opq-box-publish verify --help >/dev/null")

    world.root.sh(f"apt-get purge -y opq-box-publisher {LIBRARY}")
    assert installed(world) == {}
    assert changed_besides_apt(world) == []


def test_a_box_provisions_from_the_apt_repository(world: World) -> None:
    """docs/operations.md, literally: preseed, apt-get install; the anchor is pinned, the
    deb stays where a rollback finds it, and the first check sees release 1."""
    world.serve("genuine")
    world.root.sh("apt-get update")
    preseed(world.root, world.url)
    world.root.sh("apt-get install -y --no-install-recommends opq-box-updater")
    version = changelog_version()
    assert installed(world) == {"opq-box-updater": version, LIBRARY: version}
    assert world.root.config() == {"server_url": world.url}
    pinned = world.root.file("/usr/share/opq-box-updater/root.json")
    assert pinned.read_bytes() == world.anchor.read_bytes()
    for name in ("opq-box-updater", LIBRARY):
        kept = world.root.file(f"/var/cache/apt/archives/{world.new[name].name}")
        assert kept.read_bytes() == world.new[name].read_bytes(), "kept for a rollback"
    assert world.root.file("/etc/cron.d/opq-box-updater").is_file()
    check = world.apt("opq-box-updater check")
    assert check.returncode == 100, check

    world.root.sh(f"apt-get purge -y opq-box-updater {LIBRARY} && apt-get clean")
    assert installed(world) == {}
    assert changed_besides_apt(world) == []


def release(world: World, version: int, debs: list[Path], healthcheck: str | None) -> None:
    """Publish ``version`` carrying ``debs`` into the update repository nginx serves."""
    publish = Path(sys.executable).parent / "opq-box-publish"
    work = world.update_repo.parent
    package = work / f"update-{version}.zip"
    cmd = [str(publish), "build", str(package), "--version", str(version),
           *[arg for deb in debs for arg in ("--deb", str(deb))]]
    if healthcheck is not None:
        script = work / f"health-{version}.sh"
        script.write_text(f"#!/bin/sh\n{healthcheck}\n")
        cmd += ["--healthcheck", str(script)]
    _run(cmd)
    _run([str(publish), "release", str(world.update_repo), str(package), "--keys",
          str(work / "keys")])


def test_a_1_0_box_takes_the_split_through_its_own_updater(world: World) -> None:
    """The fleet's path: the 1.0 updater applies a release carrying the 1.1 module and
    updater packages. A failing health check rolls back to 1.0 whole (the module package
    purged, the 1.0 package with its files back); the next release installs 1.1."""
    preseed(world.root, world.url)
    old = world.old["opq-box-updater"]  # a box: no publisher
    shutil.copy(old, world.root.file("/tmp"))
    # Installed from a file, so the rollback needs it where it looks.
    shutil.copy(old, world.root.file("/var/cache/apt/archives"))
    world.root.sh(f"cd /tmp && apt-get install -y --no-install-recommends ./{old.name}")
    first = world.apt("opq-box-updater run")
    assert first.returncode == 0, first  # release 1 of the fixture
    config = world.root.file(CONFIG).read_bytes()

    # opq-box-updater first: the 1.0 updater runs one dpkg -i in manifest order, without
    # --auto-deconfigure, and dpkg will not unpack the module package while it Breaks the
    # installed 1.0 (with the module first this release fails on every 1.0 box).
    split = [world.new["opq-box-updater"], world.new[LIBRARY]]
    release(world, 2, split, healthcheck="exit 1")
    failed = world.apt("opq-box-updater run")
    assert failed.returncode == 5, failed
    assert "health" in failed.stderr, failed.stderr  # installed, then rolled back
    assert installed(world) == {"opq-box-updater": "1.0.0", PAYLOAD: "1.0"}
    assert world.root.sh("dpkg --audit").stdout == ""
    assert world.root.file("/usr/lib/python3/dist-packages/opq_box_updater/__init__.py"
                           ).is_file(), "the 1.0 package's module is back"
    status = json.loads(world.root.sh("opq-box-updater status --json").stdout)
    assert status["installed_version"] == 1 and not status.get("unrestored_packages"), status

    release(world, 3, split, healthcheck=None)
    done = world.apt("opq-box-updater run")
    assert done.returncode == 0, world.root.file("/var/log/opq/box_updater.log").read_text()[-3000:]
    version = changelog_version()
    assert installed(world) == {"opq-box-updater": version, LIBRARY: version, PAYLOAD: "1.0"}
    assert world.root.sh("dpkg --audit").stdout == ""
    assert world.root.file(CONFIG).read_bytes() == config
    status = json.loads(world.root.sh("opq-box-updater status --json").stdout)
    assert status["installed_version"] == 3, status

    world.root.sh(f"apt-get purge -y opq-box-updater {LIBRARY} {PAYLOAD} && apt-get clean")
    assert installed(world) == {}
    world.root.sh("rm -f /tmp/*.deb " + RAN_MARKER)
    assert changed_besides_apt(world) == []


def test_a_box_of_the_old_two_package_layout_upgrades(world: World) -> None:
    """1.0 held the module in opq-box-updater; installing 1.1 from the repository moves it
    into python3-opq-box-updater (Breaks/Replaces) and keeps the box's configuration."""
    world.serve("genuine")
    world.root.sh("apt-get update")
    preseed(world.root, world.url)
    for deb in world.old.values():
        shutil.copy(deb, world.root.file("/tmp"))
    names = " ".join(f"./{deb.name}" for deb in world.old.values())
    world.root.sh(f"cd /tmp && apt-get install -y --no-install-recommends {names}")
    assert installed(world) == {"opq-box-updater": "1.0.0", "opq-box-publisher": "1.0.0"}
    config = world.root.file(CONFIG).read_bytes()

    world.root.sh("apt-get install -y --no-install-recommends opq-box-updater")
    version = changelog_version()
    assert installed(world) == {"opq-box-updater": version, "opq-box-publisher": version,
                                LIBRARY: version}
    assert world.root.sh("dpkg --audit").stdout == ""
    assert world.root.file(CONFIG).read_bytes() == config
    world.root.sh("opq-box-publish --help >/dev/null")
    check = world.apt("opq-box-updater check")
    assert check.returncode == 100, check
