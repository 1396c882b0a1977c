"""The publisher refuses what boxes would refuse (issue 12, item 5): every package below was
once built and released with exit 0, then refused by every box (exit 3, version marked
failed fleet-wide). The publisher now runs the box's own extraction, manifest, deb and
metadata checks before signing, refuses with the box's message, and changes nothing."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from debs import make_deb
from reposim import RepoSim

from opq_box_updater import config
from opq_box_updater.errors import UnsafePackageError
from opq_box_updater.metadata import METADATA_MAX_BYTES
from opq_box_updater.package import extract_package, inspect_debs, load_manifest
from opq_box_updater.publish import build, cli, repo
from opq_box_updater.publish.common import PublishError

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)


def ar_archive(members: dict[str, bytes]) -> bytes:
    """A System V ar archive (what ``ar rc`` writes), here of anything but a .deb's parts."""
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += (f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{0o644:<8o}{len(data):<10}`\n").encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


#: An ELF relocatable object's first bytes: what `ar rc fake_1.0_all.deb foo.o` holds.
OBJECT_FILE = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHI", 1, 62, 1) + bytes(48)


def zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buffer.getvalue()


def manifest(version: int, debs: list[str] | None = None) -> bytes:
    import json
    return json.dumps({"format": 1, "version": version, "debs": debs or [],
                       "run": "update.sh", "healthcheck": None}).encode()


def dos_symlink() -> bytes:
    """A symlink member from a zip whose create_system is not Unix (the old check looked at
    Unix-made zips only; the box looks at the mode whatever the system)."""
    info = zipfile.ZipInfo("link")
    info.create_system = 0
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_with([("manifest.json", manifest(2)), ("update.sh", b"#!/bin/sh\n"),
                     (info, b"/etc/passwd")])


def box_refusal(package: Path, tmp: Path, version: int) -> str:
    """What a box says about ``package`` as release ``version`` (its apply-side steps)."""
    tmp.mkdir()
    with pytest.raises(UnsafePackageError) as caught:
        workdir = extract_package(package, tmp, max_unpacked_bytes=1 << 30)
        inspect_debs(workdir, load_manifest(workdir, version), {"all", "amd64", "arm64"})
    return str(caught.value)


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A repository publishing v1 (a real deb)."""
    repo.init_repo(tmp_path / "repo", tmp_path / "keys", now=NOW)
    deb = make_deb(tmp_path / "debs", "opq-hello", "1.0")
    (tmp_path / "update.sh").write_bytes(b"#!/bin/sh\n")
    build.build_package(tmp_path / "v1.zip", version=1, debs=[deb], run=tmp_path / "update.sh")
    repo.publish_release(tmp_path / "repo", tmp_path / "keys", tmp_path / "v1.zip", now=NOW)
    return tmp_path / "repo"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def zstd_deb(tmp: Path) -> bytes:
    return make_deb(tmp / "zstd", "opq-zstd", "2.0", compression="zstd").read_bytes()


CASES = {
    "zstd deb": lambda tmp: RepoSim.make_package(2, debs={"opq-zstd_2.0_all.deb": zstd_deb(tmp)}),
    "control character": lambda tmp: RepoSim.make_package(2, members={"notes\x1b[2J.txt": b"x"}),
    "symlink member": lambda tmp: dos_symlink(),
    "d/b beside d//b": lambda tmp: RepoSim.make_package(
        2, members=[("d/b", b"1"), ("d//b", b"2")]),
    "file and directory": lambda tmp: RepoSim.make_package(
        2, members=[("d", b"file"), ("d/x", b"inside")]),
    "ar of an object file": lambda tmp: RepoSim.make_package(
        2, debs={"fake_1.0_all.deb": ar_archive({"foo.o": OBJECT_FILE})}),
}


@pytest.mark.parametrize("case", CASES)
def test_release_refuses_what_boxes_refuse_with_their_message(
        published: Path, tmp_path: Path, case: str) -> None:
    package = tmp_path / "bad.zip"
    package.write_bytes(CASES[case](tmp_path))
    said = box_refusal(package, tmp_path / "box", 2)
    before = snapshot(published)
    with pytest.raises(PublishError) as caught:
        repo.publish_release(published, tmp_path / "keys", package, now=NOW)
    assert said in str(caught.value)
    assert snapshot(published) == before, "nothing written, not even the package"


def test_cli_release_exits_nonzero_and_says_why(published: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    package = tmp_path / "bad.zip"
    package.write_bytes(CASES["d/b beside d//b"](tmp_path))
    before = snapshot(published)
    code = cli.main(["release", str(published), str(package), "--keys", str(tmp_path / "keys")])
    assert code != 0
    assert "member 'd//b' repeats 'd/b'" in capsys.readouterr().err
    assert snapshot(published) == before


@pytest.mark.parametrize("kind", ["zstd", "object"])
def test_build_refuses_debs_boxes_cannot_read(tmp_path: Path, kind: str) -> None:
    if kind == "zstd":
        deb = make_deb(tmp_path / "debs", "opq-zstd", "2.0", compression="zstd")
        said = "zstd-compressed control archives are not supported"
    else:
        deb = tmp_path / "fake_1.0_all.deb"
        deb.write_bytes(ar_archive({"foo.o": OBJECT_FILE}))
        said = "fake_1.0_all.deb is not a valid .deb"
    with pytest.raises(PublishError, match=said):
        build.build_package(tmp_path / "out.zip", version=2, debs=[deb])
    assert not (tmp_path / "out.zip").exists()


def test_notes_over_the_boxes_metadata_cap_are_refused(published: Path, tmp_path: Path) -> None:
    (tmp_path / "update.sh").write_bytes(b"#!/bin/sh\n")
    build.build_package(tmp_path / "v2.zip", version=2, run=tmp_path / "update.sh")
    before = snapshot(published)
    with pytest.raises(PublishError, match=f"more than the limit of {METADATA_MAX_BYTES}"):
        repo.publish_release(published, tmp_path / "keys", tmp_path / "v2.zip",
                             notes="n" * 100_000, now=NOW)
    assert snapshot(published) == before, "nothing written, not even the package"
    with pytest.raises(PublishError, match="shorten --notes"):
        repo.publish_release(published, tmp_path / "keys", tmp_path / "v2.zip",
                             notes="é" * 33_000, now=NOW)  # 66 kB in UTF-8
    release = repo.publish_release(published, tmp_path / "keys", tmp_path / "v2.zip",
                                   notes="n" * 60_000, now=NOW)
    assert release.version == 2
    assert len((published / "version.json").read_bytes()) <= METADATA_MAX_BYTES


def test_the_publishers_unpacked_limit_is_the_boxes_default() -> None:
    assert config.Config._field_defaults["max_unpacked_bytes"] == build.MAX_UNPACKED_BYTES
