"""opq-box-publish: init, build, release, refresh, rotate and verify, library and CLI.

Every document the publisher writes is checked with the box's own verifier
(:mod:`opq_box_updater.metadata`): what the publisher writes, a box accepts.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from debs import make_deb
from reposim import RepoSim

from opq_box_updater.errors import RepositoryError, UnsafePackageError
from opq_box_updater.metadata import (
    Floors,
    parse_envelope,
    parse_release,
    verify_next_root,
    verify_release,
    verify_trust_anchor,
)
from opq_box_updater.publish import build, cli, keys, repo, rotate, verify
from opq_box_updater.publish.common import PublishError, parse_duration, sha256_file

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)
RUN = b"#!/bin/sh\necho updated\n"


_DEBS: dict[str, bytes] = {}


def real_deb(path: Path) -> Path:
    """A real .deb (dpkg-deb) at ``path`` named ``NAME_VERSION_all.deb``: the publisher reads
    its control as boxes do. Built once per name and copied."""
    name, version, _ = path.name.split("_")
    if path.name not in _DEBS:
        with tempfile.TemporaryDirectory() as tmp:
            _DEBS[path.name] = make_deb(Path(tmp), f"opq-{name}", version).read_bytes()
    path.write_bytes(_DEBS[path.name])
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "update.sh").write_bytes(RUN)
    real_deb(tmp_path / "hello_1.0_all.deb")
    return tmp_path


def make_package(work: Path, version: int, name: str | None = None) -> Path:
    out = work / (name or f"p{version}.zip")
    build.build_package(out, version=version, debs=[work / "hello_1.0_all.deb"],
                        run=work / "update.sh")
    return out


@dataclass
class Repo:
    path: Path
    keydir: Path
    work: Path

    def release(self, version: int, **kwargs: Any) -> Any:
        kwargs.setdefault("now", NOW)
        return repo.publish_release(self.path, self.keydir, make_package(self.work, version),
                                    **kwargs)


@pytest.fixture
def published(work: Path) -> Repo:
    """A repository with 3 root keys (threshold 2), 2 release keys (threshold 1), release 1."""
    r = Repo(work / "repo", work / "keys", work)
    repo.init_repo(r.path, r.keydir, root_keys=3, root_threshold=2, release_keys=2, now=NOW)
    r.release(1)
    return r


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- init / build / release / verify -------------------------------------------------------


def test_cli_init_build_release_verify(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo_dir, keydir = work / "repo", work / "keys"
    code, out, _ = run_cli(capsys, "init", repo_dir, "--keys", keydir)
    assert code == 0
    assert str(repo_dir / "root" / "1.root.json") in out
    verify_trust_anchor((repo_dir / "root" / "1.root.json").read_bytes())
    code, out, _ = run_cli(capsys, "build", work / "p.zip", "--deb", work / "hello_1.0_all.deb",
                           "--run", work / "update.sh", "--version", "5")
    assert code == 0, out
    code, out, err = run_cli(capsys, "release", repo_dir, work / "p.zip", "--keys", keydir,
                             "--rollout", "40", "--notes", "first")
    assert code == 0, err
    code, out, err = run_cli(capsys, "verify", repo_dir)
    assert code == 0, err
    assert "release v5" in out
    release = repo.read_release(repo_dir, "version.json")
    assert release is not None
    assert (release.version, release.rollout_percent, release.notes) == (5, 40, "first")
    # Nothing secret went into the repository.
    for path in repo_dir.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes()


def test_init_refuses_existing_repo_keys_and_keydir_inside(work: Path) -> None:
    repo.init_repo(work / "repo", work / "keys")
    with pytest.raises(PublishError, match="already holds a repository"):
        repo.init_repo(work / "repo", work / "keys2")
    with pytest.raises(PublishError, match="already holds keys"):
        repo.init_repo(work / "other", work / "keys")
    with pytest.raises(PublishError, match="inside the repository"):
        repo.init_repo(work / "third", work / "third" / "keys")
    with pytest.raises(PublishError, match="threshold"):
        repo.init_repo(work / "fourth", work / "keys4", root_keys=2, root_threshold=3)


def test_release_document_is_what_a_box_accepts(published: Repo) -> None:
    data = (published.path / "version.json").read_bytes()
    root = repo.load_chain(published.path)[-1]
    release = verify_release(root, data, NOW, Floors())
    assert release.version == 1 and release.root_version == 1
    assert release.issued == NOW and release.expires == NOW + timedelta(days=30)
    package = published.path / release.package.path
    assert sha256_file(package) == (release.package.sha256, release.package.length)
    assert package.read_bytes() == (published.work / "p1.zip").read_bytes()
    # No temp files left behind; the release history is the one dotfile.
    assert [p.name for p in published.path.rglob(".*")] == [".history.jsonl"]


def test_release_refuses_non_increasing_version_unless_forced(published: Repo) -> None:
    before = (published.path / "version.json").read_bytes()
    with pytest.raises(PublishError, match="not newer"):
        published.release(1)
    assert (published.path / "version.json").read_bytes() == before
    published.release(1, force=True, notes="again")
    published.release(2)
    assert repo.read_release(published.path, "version.json").version == 2  # type: ignore[union-attr]


def test_release_channels_and_bad_names(published: Repo) -> None:
    published.release(3, version_file="version-beta.json")
    report = verify.verify_repo(published.path, now=NOW)
    assert report.ok, report.problems
    assert set(report.releases) == {"version.json", "version-beta.json"}
    with pytest.raises(PublishError, match="version file"):
        published.release(4, version_file="../evil.json")


def test_release_refuses_a_package_boxes_would_refuse(published: Repo, work: Path) -> None:
    bad = work / "bad.zip"
    bad.write_bytes(RepoSim.make_package(9, members={"../evil": b"x"}))
    with pytest.raises(PublishError, match=r"has a '\.\.' component"):
        repo.publish_release(published.path, published.keydir, bad, now=NOW)
    bad.write_bytes(RepoSim.make_package(9, run=None))
    with pytest.raises(PublishError, match="neither debs nor a run script"):
        repo.publish_release(published.path, published.keydir, bad, now=NOW)
    bad.write_bytes(b"not a zip")
    with pytest.raises(PublishError, match="not a valid zip file"):
        repo.publish_release(published.path, published.keydir, bad, now=NOW)


# --- build ---------------------------------------------------------------------------------


def test_build_is_deterministic_and_writes_the_manifest(work: Path) -> None:
    (work / "hc.sh").write_bytes(b"#!/bin/sh\nexit 0\n")
    real_deb(work / "b_2_all.deb")
    args: dict[str, Any] = {"version": 7, "debs": [work / "hello_1.0_all.deb",
                                                   work / "b_2_all.deb"],
                            "run": work / "update.sh", "healthcheck": work / "hc.sh"}
    build.build_package(work / "a.zip", **args)
    os.utime(work / "update.sh", (0, 0))  # file times must not matter
    build.build_package(work / "b.zip", **args)
    assert (work / "a.zip").read_bytes() == (work / "b.zip").read_bytes()
    with zipfile.ZipFile(work / "a.zip") as zf:
        assert zf.namelist()[0] == "manifest.json"
        assert json.loads(zf.read("manifest.json")) == {
            "format": 1, "version": 7, "debs": ["hello_1.0_all.deb", "b_2_all.deb"],
            "run": "update.sh", "healthcheck": "hc.sh"}
        assert zf.read("update.sh") == RUN
    assert build.inspect_package(work / "a.zip").debs == ("hello_1.0_all.deb", "b_2_all.deb")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "at least one --deb or a --run"),
    ({"debs": ["update.sh"]}, "must end in .deb"),
    ({"debs": ["missing.deb"]}, "no such file"),
    ({"debs": ["notdeb.deb"]}, "not a Debian package"),
    ({"run": "update.sh", "healthcheck": "sub/update.sh"}, "two files are named"),
    ({"run": ".hidden"}, "cannot be a package member name"),
])
def test_build_refuses(work: Path, kwargs: dict[str, Any], message: str) -> None:
    (work / "notdeb.deb").write_bytes(b"PK\x03\x04")
    (work / "sub").mkdir()
    (work / "sub" / "update.sh").write_bytes(RUN)
    (work / ".hidden").write_bytes(RUN)
    resolved: dict[str, Any] = {k: ([work / d for d in v] if isinstance(v, list) else work / v)
                                for k, v in kwargs.items()}
    with pytest.raises(PublishError, match=message):
        build.build_package(work / "out.zip", version=1, **resolved)
    assert not (work / "out.zip").exists()


@pytest.mark.parametrize(("package", "message"), [
    (RepoSim.make_package(1, members={"/abs": b""}), "is an absolute path"),
    (RepoSim.make_package(1, symlinks={"link": "/etc/passwd"}), "is a symlink"),
    (RepoSim.make_package(1, manifest={"debs": ["x.deb"]}), "not in the package"),
    (RepoSim.make_package(1, manifest={"format": 2}), "format 2 is not 1"),
    (RepoSim.make_package(1, manifest={"extra": 1}), "exactly the keys"),
    (RepoSim.make_package(1, members={"manifest.json": b'{"version": 1.0}'}), "floats"),
])
def test_inspect_package_applies_the_box_rules(tmp_path: Path, package: bytes,
                                               message: str) -> None:
    path = tmp_path / "p.zip"
    path.write_bytes(package)
    with pytest.raises(UnsafePackageError, match=message):
        build.inspect_package(path)


# --- refresh -------------------------------------------------------------------------------


def test_refresh_keeps_version_and_moves_issued_forward(published: Repo) -> None:
    old = repo.read_release(published.path, "version.json")
    assert old is not None
    later = NOW + timedelta(days=20)
    new = repo.refresh_release(published.path, published.keydir, now=later,
                               expires=timedelta(days=60), rollout=50)
    assert (new.version, new.package, new.notes) == (old.version, old.package, old.notes)
    assert new.issued == later and new.expires == later + timedelta(days=60)
    assert new.rollout_percent == 50
    root = repo.load_chain(published.path)[-1]
    # A box that saw the old copy accepts the new one (equal version, later issued).
    verify_release(root, (published.path / "version.json").read_bytes(), later,
                   Floors(old.version, old.issued))
    # Refreshing twice in the same second still moves issued forward.
    again = repo.refresh_release(published.path, published.keydir, now=later)
    assert again.issued > new.issued


def test_refresh_without_release_is_an_error(work: Path) -> None:
    repo.init_repo(work / "repo", work / "keys")
    with pytest.raises(PublishError, match="publish a release first"):
        repo.refresh_release(work / "repo", work / "keys")


# --- rotate (table-driven, python-tuf test_updater_key_rotations style) --------------------


@dataclass(frozen=True)
class Step:
    role: str
    add: int = 0  # fresh keys generated outside the tool and added by public key
    remove: int = 0  # how many current keys of the role to remove
    threshold: int | None = None
    expect_keys: int = 0
    expect_threshold: int = 0
    expect_generated: int = 0


ROTATIONS: dict[str, list[Step]] = {
    "replace release key": [Step("release", expect_keys=2, expect_threshold=1,
                                 expect_generated=2)],
    "add then remove release keys": [
        Step("release", add=1, expect_keys=3, expect_threshold=1),
        Step("release", remove=2, expect_keys=1, expect_threshold=1),
        Step("release", remove=1, expect_keys=1, expect_threshold=1, expect_generated=1)],
    "raise release threshold": [
        Step("release", threshold=2, expect_keys=2, expect_threshold=2),
        Step("release", threshold=3, expect_keys=3, expect_threshold=3, expect_generated=1)],
    "replace all root keys": [Step("root", expect_keys=3, expect_threshold=2,
                                   expect_generated=3)],
    "root threshold up, then remove": [
        Step("root", threshold=3, expect_keys=3, expect_threshold=3),
        Step("root", remove=1, expect_keys=3, expect_threshold=3, expect_generated=1),
        Step("root", remove=2, threshold=1, expect_keys=1, expect_threshold=1)],
    "add root key, lower threshold": [
        Step("root", add=1, threshold=1, expect_keys=4, expect_threshold=1),
        Step("root", remove=3, expect_keys=1, expect_threshold=1)],
}


@pytest.mark.parametrize("steps", ROTATIONS.values(), ids=ROTATIONS.keys())
def test_rotations(published: Repo, steps: list[Step]) -> None:
    store = keys.KeyStore(published.keydir)
    for number, step in enumerate(steps):
        now = NOW + timedelta(days=number + 1)
        before = repo.load_chain(published.path)[-1]
        added = []
        for _ in range(step.add):  # an operator-held key, stored in KEYDIR to sign with
            key = Ed25519PrivateKey.generate()
            store.store(key, step.role)
            added.append(keys.public_hex(key))
        removed = list(before.role(step.role).keyids[:step.remove])
        result = rotate.rotate_role(published.path, published.keydir, step.role, add=added,
                                  remove=[k[:12] for k in removed], threshold=step.threshold,
                                  now=now)
        new = result.root
        data = repo.root_file(published.path, new.version).read_bytes()
        assert verify_next_root(before, data).version == before.version + 1
        role = new.role(step.role)
        assert (len(role.keyids), role.threshold) == (step.expect_keys, step.expect_threshold)
        assert len(result.generated) == step.expect_generated
        assert not set(removed) & set(role.keyids)
        assert result.resigned == ("version.json",)
        release = verify_release(new, (published.path / "version.json").read_bytes(), now,
                                 Floors())
        assert release.root_version == new.version
        report = verify.verify_repo(published.path, now=now)
        assert report.ok, report.problems
    # A box pinned to root v1 walks the whole chain.
    assert len(repo.load_chain(published.path)) == len(steps) + 1


def test_rotate_without_the_needed_private_keys_changes_nothing(published: Repo) -> None:
    snapshot = {p: p.read_bytes() for p in published.path.rglob("*") if p.is_file()}
    root = repo.load_chain(published.path)[-1]
    for keyid in root.role("root").keyids[:2]:  # threshold 2 of 3: only one key left
        next(published.keydir.glob(f"root-{keyid[:12]}.pem")).unlink()
    with pytest.raises(PublishError, match=r"needs 2 signature\(s\) but only 1"):
        rotate.rotate_role(published.path, published.keydir, "release", now=NOW)
    # An added release key whose private key is elsewhere cannot re-sign version.json.
    outside = Ed25519PrivateKey.generate()
    with pytest.raises(PublishError):
        rotate.rotate_role(published.path, published.keydir, "release",
                         add=[keys.public_hex(outside)], remove=list(root.role("release").keyids),
                         now=NOW)
    after = {p: p.read_bytes() for p in published.path.rglob("*") if p.is_file()}
    assert after == snapshot


def test_rotate_add_accepts_key_files(published: Repo, work: Path) -> None:
    key = Ed25519PrivateKey.generate()
    keys.KeyStore(published.keydir).store(key, "release")
    pub = next(published.keydir.glob(f"release-{keys.key_id(key)[:12]}.pub"))
    new = rotate.rotate_role(published.path, published.keydir, "release", add=[str(pub)],
                           now=NOW).root
    assert keys.key_id(key) in new.role("release").keyids
    with pytest.raises(PublishError, match="already holds"):
        rotate.rotate_role(published.path, published.keydir, "release", add=[str(pub)], now=NOW)
    with pytest.raises(PublishError, match="does not name exactly one"):
        rotate.rotate_role(published.path, published.keydir, "release", remove=["abc"], now=NOW)


def test_cli_rotate(published: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "rotate", published.path, "--keys", published.keydir,
                             "--role", "release")
    assert code == 0, err
    assert "wrote root/2.root.json" in out and "re-signed for root v2: version.json" in out
    code, out, err = run_cli(capsys, "rotate", published.path, "--keys", published.keydir,
                             "--role", "root", "--remove", "0000000000")
    assert code == 2 and "does not name exactly one root key" in err


# --- verify --------------------------------------------------------------------------------


def test_verify_reports_expiry(published: Repo) -> None:
    soon = NOW + timedelta(days=25)
    report = verify.verify_repo(published.path, now=soon)
    assert report.ok and any("expires" in w and "refresh" in w for w in report.warnings)
    late = NOW + timedelta(days=31)
    report = verify.verify_repo(published.path, now=late)
    assert not report.ok and "expired" in report.problems[0]
    report = verify.verify_repo(published.path, now=NOW + timedelta(days=731))
    assert "root v1 expired" in report.problems[0]


def tamper_version_field(path: Path) -> None:
    doc = json.loads(path.read_bytes())
    doc["signed"]["rollout_percent"] = 99
    path.write_text(json.dumps(doc))


def current_package(repo_dir: Path) -> Path:
    release = repo.read_release(repo_dir, "version.json")
    assert release is not None
    return repo_dir / release.package.path


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda r: tamper_version_field(r / "version.json"), "valid signature"),
    (lambda r: flip_last_byte(current_package(r)), "has sha256"),
    (lambda r: current_package(r).unlink(), "is missing"),
    (lambda r: (r / "root" / "3.root.json").write_bytes(b"{}"), "root/2.root.json is missing"),
    (lambda r: (r / "root" / "1.root.json").write_bytes(b'{"signed": 1.5}'), "trust anchor"),
    (lambda r: (r / "version-x.json").write_bytes(b"x" * 70000), "boxes refuse metadata"),
])
def test_cli_verify_fails_on_tampered_repo(published: Repo, capsys: pytest.CaptureFixture[str],
                                           tamper: Any, message: str) -> None:
    published.release(2, now=None)
    assert run_cli(capsys, "verify", published.path)[0] == 0
    tamper(published.path)
    code, _, err = run_cli(capsys, "verify", published.path)
    assert code == 3
    assert message in err
    assert all(line.startswith("opq-box-publish: ") for line in err.splitlines())


def test_verify_with_trust_root(published: Repo, work: Path) -> None:
    rotate.rotate_role(published.path, published.keydir, "release", now=NOW)
    anchor = repo.root_file(published.path, 2)
    assert verify.verify_repo(published.path, anchor, now=NOW).ok
    other = work / "other"
    repo.init_repo(other, work / "otherkeys", now=NOW)
    report = verify.verify_repo(published.path, repo.root_file(other, 1), now=NOW)
    assert not report.ok and "differs from the trust anchor" in report.problems[0]


def test_verify_refuses_mix_and_match_release(published: Repo) -> None:
    old = (published.path / "version.json").read_bytes()
    rotate.rotate_role(published.path, published.keydir, "release", now=NOW)
    (published.path / "version.json").write_bytes(old)  # signed by the removed key
    report = verify.verify_repo(published.path, now=NOW)
    assert "mix-and-match" in report.problems[0]


# --- keys ----------------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_private_keys_are_0600_even_with_umask_0(work: Path, open_umask: None) -> None:
    repo.init_repo(work / "repo", work / "keys", root_keys=2, root_threshold=1)
    pems = sorted((work / "keys").glob("*.pem"))
    assert len(pems) == 3
    assert stat.S_IMODE((work / "keys").stat().st_mode) == 0o700
    for pem in pems:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        pub = pem.with_suffix(".pub").read_text().strip()
        assert keys.key_id(keys.KeyStore(work / "keys").private_key(
            keys.keyid_of(bytes.fromhex(pub)))) == keys.keyid_of(bytes.fromhex(pub))
    store = keys.KeyStore(work / "keys")
    first = store.list_keys()[0]
    with pytest.raises(PublishError, match="refusing to overwrite"):
        store.store(store.private_key(first.keyid), first.label)


def test_passphrase_protected_keys(work: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    repo.init_repo(work / "repo", work / "keys", passphrase=b"s3cret", now=NOW)
    for pem in (work / "keys").glob("*.pem"):
        assert pem.read_bytes().startswith(b"-----BEGIN OPQ SCRYPT ED25519 PRIVATE KEY-----")
    package = make_package(work, 1)
    with pytest.raises(PublishError, match="is encrypted"):
        repo.publish_release(work / "repo", work / "keys", package, now=NOW)
    with pytest.raises(PublishError, match="wrong passphrase"):
        repo.publish_release(work / "repo", work / "keys", package, passphrase=b"no", now=NOW)
    assert not (work / "repo" / "version.json").exists()
    assert not list((work / "repo" / "packages").iterdir())  # keys are checked first
    (work / "pass").write_text("s3cret\n")
    (work / "pass").chmod(0o600)
    code, _, err = run_cli(capsys, "release", work / "repo", package, "--keys", work / "keys",
                           "--passphrase-file", work / "pass")
    assert code == 0, err
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "s3cret")
    code, _, err = run_cli(capsys, "rotate", work / "repo", "--keys", work / "keys",
                           "--role", "release")
    assert code == 0, err
    new = [p for p in (work / "keys").glob("*.pem") if p.stat().st_mtime >= 0]
    assert all(p.read_bytes().startswith(b"-----BEGIN OPQ SCRYPT") for p in new)


def test_parse_public_key_forms(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    raw = keys.public_bytes(key)
    store = keys.KeyStore(tmp_path / "k")
    store.ensure_dir()
    pem = store.store(key, "root")
    assert keys.parse_public_key(raw.hex()) == raw
    assert keys.parse_public_key(str(pem.with_suffix(".pub"))) == raw
    assert keys.parse_public_key(str(pem)) == raw
    with pytest.raises(PublishError):
        keys.parse_public_key("nothing-here")


def test_parse_duration() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("2y") == timedelta(days=730)
    assert parse_duration("12h") == timedelta(hours=12)
    for bad in ("", "0d", "3", "1.5d", "-1d"):
        with pytest.raises(PublishError):
            parse_duration(bad)


def test_cli_errors_are_one_line(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "release", work / "nope", work / "x.zip", "--keys",
                           work / "keys")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    code, _, err = run_cli(capsys, "-v", "verify", work / "nope")
    assert code == 3
    with pytest.raises(SystemExit) as exc:
        cli.main(["build", "x.zip"])
    assert exc.value.code == 2


# --- the simulator itself ------------------------------------------------------------------


def test_reposim_builds_honest_and_hostile_states(tmp_path: Path) -> None:
    sim = RepoSim(tmp_path / "repo", root_keys=2, root_threshold=2, now=NOW)
    sim.release(1)
    assert verify.verify_repo(sim.path, now=NOW).ok
    sim.publish(2)
    root = verify_trust_anchor(sim.anchor_bytes)
    assert verify_release(root, sim.read("version.json"), NOW, Floors()).version == 2
    sim.publish(3, signers=[sim.stranger()])
    with pytest.raises(RepositoryError, match="0 valid signature"):
        verify_release(root, sim.read("version.json"), NOW, Floors())
    sim.publish(3, expires=NOW - timedelta(days=1))
    with pytest.raises(RepositoryError, match="expired"):
        verify_release(root, sim.read("version.json"), NOW, Floors())
    sim.publish(3)
    data = sim.rotate("root", signers=sim.root_keys[:1])  # under threshold
    with pytest.raises(RepositoryError, match="1 valid signature"):
        verify_next_root(root, data)
    sim.remove("root/2.root.json")
    data = sim.rotate("release")
    new = verify_next_root(root, data)
    assert verify_release(new, sim.read("version.json"), NOW, Floors()).root_version == 2
    assert sim.lib_rotate("release", threshold=1).version == 3
    assert verify.verify_repo(sim.path, now=NOW).ok
    sim.publish(9, length=10)
    assert "has sha256" in verify.verify_repo(sim.path, now=NOW).problems[0]
    release = parse_release(parse_envelope(sim.read("version.json")))
    assert release.package.length == 10


def test_large_package_memory_stays_flat(work: Path) -> None:
    """build, release and verify stream: a 64 MiB package costs a few MiB of memory."""
    import tracemalloc

    payload = work / "payload"
    with payload.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: cheap to create
    big = make_deb(work / "debs", "opq-big", "1.0", compression="none",
                   files={"usr/share/opq-big/payload": payload.read_bytes()})
    payload.unlink()
    repo.init_repo(work / "repo", work / "keys", now=NOW)
    tracemalloc.start()
    try:
        build.build_package(work / "big.zip", version=1, debs=[big])
        release = repo.publish_release(work / "repo", work / "keys", work / "big.zip", now=NOW)
        assert verify.verify_repo(work / "repo", now=NOW).ok
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert release.package.length > 64 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, peak


def test_inspect_package_refuses_repeated_names(tmp_path: Path) -> None:
    path = tmp_path / "p.zip"
    path.write_bytes(RepoSim.make_package(1, members=[("update.sh", b"#!/bin/sh\n")]))
    with pytest.raises(UnsafePackageError, match=r"repeats 'update\.sh'"):
        build.inspect_package(path)


def test_rewrites_within_one_second_still_change_the_mtime_second(tmp_path: Path) -> None:
    """nginx's validators are the mtime's second and the size: each rewrite must move them."""
    from opq_box_updater.fsutil import atomic_write

    path = tmp_path / "version.json"
    seconds = []
    for _ in range(3):
        atomic_write(path, b"same size")
        seconds.append(int(path.stat().st_mtime))
    assert seconds[0] < seconds[1] < seconds[2]
