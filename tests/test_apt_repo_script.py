"""scripts/apt-repo on its own (issue 8): what a publish leaves for boxes that are reading.

Fast (no root, no chroot): a throw-away GnuPG home per module, small debs from
``debs.make_deb``. apt itself is exercised against the result in
``test_apt_provisioning.py``; here the script's own promises: indexes named by a previous
``InRelease`` stay reachable under ``by-hash/``, a deb is never replaced by other bytes under
its name, and a key that cannot sign publishes nothing.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool, tree_digest
from debs import make_deb

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT / "scripts/apt-repo"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def gnupg() -> Iterator[tuple[dict[str, str], str]]:
    """(environment with GNUPGHOME, fingerprint) of a fresh ed25519 signing key."""
    for tool in ("gpg", "gpgv", "apt-ftparchive", "dpkg-deb", "flock"):
        require_tool(tool)
    # Short path: gpg-agent's socket may live in GNUPGHOME.
    home = tempfile.mkdtemp(prefix="opq-gpg-", dir="/tmp")
    env = {"PATH": SYSTEM_PATH, "GNUPGHOME": home, "LC_ALL": "C.UTF-8"}
    try:
        subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                        "OPQ test archive <opq@example.org>", "ed25519", "sign", "never"],
                       env=env, check=True, capture_output=True)
        listing = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], env=env,
                                 check=True, capture_output=True, text=True).stdout
        fingerprint = re.search(r"^fpr:+([0-9A-F]{40}):", listing, re.MULTILINE)
        assert fingerprint, listing
        yield env, fingerprint.group(1)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)


def publish(env: dict[str, str], key: str, repo: Path, *debs: Path
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), str(repo), "--key", key, "--arch", "amd64 armhf",
                           *map(str, debs)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def signed_indexes(inrelease: str) -> dict[str, str]:
    """path -> sha256 of the SHA256 section of an InRelease."""
    section = inrelease.split("SHA256:\n", 1)[1].split("\n-----BEGIN PGP SIGNATURE", 1)[0]
    out = {}
    for line in section.splitlines():
        if not line.startswith(" "):
            break
        digest, _size, path = line.split()
        out[path] = digest
    return out


def test_indexes_of_the_previous_inrelease_stay_reachable(
        gnupg: tuple[dict[str, str], str], tmp_path: Path) -> None:
    env, key = gnupg
    repo = tmp_path / "apt"
    first = make_deb(tmp_path / "debs", "opq-box-updater", "1.1.0")
    assert publish(env, key, repo, first).returncode == 0
    dists = repo / "dists/bookworm"
    old = signed_indexes((dists / "InRelease").read_text())
    assert {"main/binary-amd64/Packages", "main/binary-armhf/Packages.gz"} <= set(old)

    second = make_deb(tmp_path / "debs", "opq-box-updater", "1.2.0")
    done = publish(env, key, repo, second)
    assert done.returncode == 0, done.stderr
    new = signed_indexes((dists / "InRelease").read_text())
    assert new != old
    for index in (old, new):
        for path, digest in index.items():
            by_hash = dists / Path(path).parent / "by-hash/SHA256" / digest
            assert hashlib.sha256(by_hash.read_bytes()).hexdigest() == digest, path
    packages = (dists / "main/binary-armhf/Packages").read_text()
    assert "Version: 1.1.0" in packages and "Version: 1.2.0" in packages
    assert hashlib.sha256((dists / "main/binary-armhf/Packages").read_bytes()).hexdigest() \
        == new["main/binary-armhf/Packages"]
    keyring = tmp_path / "key.gpg"
    keyring.write_bytes(subprocess.run(["gpg", "--batch", "--export", key], env=env,
                                       check=True, capture_output=True).stdout)
    for args in (["InRelease"], ["Release.gpg", "Release"]):
        subprocess.run(["gpgv", "--keyring", str(keyring), *[str(dists / a) for a in args]],
                       check=True, capture_output=True)
    assert "Acquire-By-Hash: yes" in (dists / "Release").read_text()
    assert "Valid-Until" not in (dists / "Release").read_text()
    assert not list(repo.glob(".stage.*")), "no staging directory left"


def test_a_different_deb_under_a_published_name_is_refused(
        gnupg: tuple[dict[str, str], str], tmp_path: Path) -> None:
    env, key = gnupg
    repo = tmp_path / "apt"
    deb = make_deb(tmp_path / "a", "opq-box-updater", "1.1.0", files={"usr/share/x": "one"})
    assert publish(env, key, repo, deb).returncode == 0
    before = tree_digest(repo)
    rebuilt = make_deb(tmp_path / "b", "opq-box-updater", "1.1.0", files={"usr/share/x": "two"})
    extra = make_deb(tmp_path / "b", "opq-box-publisher", "1.1.0")
    refused = publish(env, key, repo, extra, rebuilt)
    assert refused.returncode == 2, refused
    assert "exists with other content" in refused.stderr
    assert tree_digest(repo) == before, "not even the acceptable deb named first was added"
    # The identical deb again is fine.
    assert publish(env, key, repo, deb).returncode == 0


@pytest.mark.parametrize("key, code, message", [
    ("0123456789ABCDEF0123456789ABCDEF01234567", 2, "no public key"),
    ("E80A78F4", 2, "full 40-digit fingerprint"),
])
def test_a_key_that_cannot_sign_publishes_nothing(
        gnupg: tuple[dict[str, str], str], tmp_path: Path, key: str, code: int,
        message: str) -> None:
    env, good = gnupg
    repo = tmp_path / "apt"
    assert publish(env, good, repo, make_deb(tmp_path / "d", "opq-box-updater", "1.1.0")
                   ).returncode == 0
    before = tree_digest(repo)
    refused = publish(env, key, repo, make_deb(tmp_path / "d", "opq-box-updater", "1.2.0"))
    assert refused.returncode != 0, refused
    assert message in refused.stderr
    assert tree_digest(repo) == before


def test_the_script_is_shellcheck_clean() -> None:
    shellcheck = require_tool("shellcheck")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout


def test_make_apt_repo_signs_with_a_passphrase_file_and_a_wrong_one_publishes_nothing(
        tmp_path: Path) -> None:
    """The documented batch path (make apt-repo ... APT_PASSPHRASE_FILE=...) for a key
    that has a passphrase, as the operators' key must."""
    for tool in ("gpg", "gpgv", "apt-ftparchive", "make"):
        require_tool(tool)
    home = tempfile.mkdtemp(prefix="opq-gpg-", dir="/tmp")
    env = {"PATH": SYSTEM_PATH, "GNUPGHOME": home, "LC_ALL": "C.UTF-8"}
    try:
        subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase",
                        "correct horse", "--quick-gen-key", "OPQ pass <opq@example.org>",
                        "ed25519", "sign", "never"], env=env, check=True, capture_output=True)
        listing = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], env=env,
                                 check=True, capture_output=True, text=True).stdout
        found = re.search(r"^fpr:+([0-9A-F]{40}):", listing, re.MULTILINE)
        assert found, listing
        repo = tmp_path / "apt"
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text("correct horse\n")
        bad.write_text("battery staple\n")

        def make(passphrase: Path, deb: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["make", "--no-print-directory", "-C", str(PROJECT), "apt-repo",
                 f"APT_DIR={repo}", f"APT_KEY={found.group(1)}", f"APT_DEBS={deb}",
                 f"APT_PASSPHRASE_FILE={passphrase}"],
                env=env, capture_output=True, text=True, timeout=120, check=False)

        done = make(good, make_deb(tmp_path / "d", "opq-box-updater", "1.1.0"))
        assert done.returncode == 0, done.stderr
        dists = tree_digest(repo / "dists")
        assert str(repo / "dists/bookworm/InRelease") in dists
        # gpg-agent keeps a passphrase for 10 minutes: a new session, as after the
        # documented `gpgconf --kill gpg-agent`, asks again.
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=True)
        published = tree_digest(repo)
        refused = make(bad, make_deb(tmp_path / "d", "opq-box-updater", "1.2.0",
                                     files={"usr/share/x": "built wrong"}))
        assert refused.returncode != 0, refused
        assert tree_digest(repo) == published, "the pool got a deb no index names"
        # So the operator may fix the build under the version that was never published.
        fixed = make(good, make_deb(tmp_path / "e", "opq-box-updater", "1.2.0",
                                    files={"usr/share/x": "built right"}))
        assert fixed.returncode == 0, fixed.stderr
        assert "Version: 1.2.0" in (repo / "dists/bookworm/main/binary-amd64/Packages"
                                    ).read_text()
        assert not list(repo.glob(".stage.*"))
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)
