"""``opq-box-publish export`` (issue 8, part 3): what it writes, in which order, on a file
system without links or modes (vfat), and what it refuses. In process, no box."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tree_digest
from reposim import RepoSim

from opq_box_updater.errors import RepositoryError
from opq_box_updater.publish import cli, export
from opq_box_updater.publish.common import PublishError
from opq_box_updater.publish.verify import verify_repo


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """The publisher's CLI renames log levels and replaces the package logger's handlers;
    undo that, so tests of the box's CLI in the same process see logging as they expect."""
    names = dict(logging._levelToName)
    log = logging.getLogger("opq_box_updater")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    for number, name in names.items():
        logging.addLevelName(number, name)
    log.handlers[:], log.propagate = handlers, propagate
    log.setLevel(level)


@pytest.fixture
def sim(tmp_path: Path) -> RepoSim:
    """A repository with root v2 (a rotation), release 1 of version.json and release 7 of
    version-beta.json."""
    sim = RepoSim(tmp_path / "repo")
    sim.publish(1)
    sim.rotate("release")
    sim.publish(7, version_file="version-beta.json")
    return sim


def files(directory: Path) -> dict[str, str]:
    return {str(Path(k).relative_to(directory)): v for k, v in tree_digest(directory).items()}


def test_export_writes_one_channel_with_every_root_and_verifies(sim: RepoSim,
                                                               tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    result = export.export_repo(sim.path, stick, now=sim.now)
    package = result.release.package.path
    assert result.release.version == 1 and result.root_version == 2
    assert sorted(result.written) == sorted([package, "root/1.root.json", "root/2.root.json",
                                             "version.json"])
    written = files(stick)
    assert set(written) == {"root", "packages", package, "root/1.root.json",
                            "root/2.root.json", "version.json"}
    for name in result.written:  # byte for byte the repository's files
        assert written[name] == hashlib.sha256((sim.path / name).read_bytes()).hexdigest()
    assert verify_repo(stick, trust_root=sim.anchor, now=sim.now).ok

    # Again: nothing to write, and the other channel goes beside it.
    assert export.export_repo(sim.path, stick, now=sim.now).written == []
    beta = export.export_repo(sim.path, stick, version_file="version-beta.json", now=sim.now)
    assert beta.written == [beta.release.package.path, "version-beta.json"]
    assert set(verify_repo(stick, now=sim.now).releases) == {"version.json",
                                                             "version-beta.json"}


def test_export_makes_no_link_and_changes_no_mode_or_owner_and_syncs_everything(
        sim: RepoSim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On vfat chmod, chown and links fail: export must not need them. Every file is fsynced
    before its rename; the version file is renamed last."""
    stick = tmp_path / "stick"

    def on_stick(target: Any) -> bool:
        if isinstance(target, int):
            target = os.readlink(f"/proc/self/fd/{target}")
        return os.fspath(target).startswith(str(stick))

    def vfat(name: str, which: int) -> Any:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if on_stick(args[which]):  # elsewhere (the package check's temp dir) as usual
                raise PermissionError(1, f"Operation not permitted (vfat): {name}")
            return real(*args, **kwargs)
        return call

    for name, which in (("chmod", 0), ("fchmod", 0), ("chown", 0), ("fchown", 0),
                        ("lchown", 0), ("symlink", 1), ("link", 1)):
        monkeypatch.setattr(os, name, vfat(name, which))
    synced: list[int] = []
    replaced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        assert os.stat(src).st_ino in synced, f"{dst} renamed before its fsync"
        replaced.append(Path(dst).name)
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    result = export.export_repo(sim.path, stick, now=sim.now)
    sha = result.release.package.sha256
    assert replaced == [f"{sha}.zip", "1.root.json", "2.root.json", "version.json"]
    for directory in (stick / "packages", stick / "root", stick):  # renames made durable
        assert os.stat(directory).st_ino in synced


def test_a_repository_that_does_not_verify_exports_nothing(sim: RepoSim,
                                                           tmp_path: Path) -> None:
    sim.flip_byte(sim.current().package.path)  # type: ignore[union-attr]
    stick = tmp_path / "stick"
    stick.mkdir()
    with pytest.raises(RepositoryError, match="does not verify, nothing was exported"):
        export.export_repo(sim.path, stick, now=sim.now)
    assert list(stick.iterdir()) == []
    code = cli.main(["export", str(sim.path), str(stick)])
    assert code == cli.EXIT_VERIFY and list(stick.iterdir()) == []


def test_a_copy_the_stick_corrupts_is_reported_not_success(
        sim: RepoSim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final verify reads what the stick holds: here the device returns other bytes."""
    def faulty_device(fd: int) -> None:
        if os.fstat(fd).st_size > 200:  # metadata and the package alike
            os.pwrite(fd, b"\x00", 150)

    monkeypatch.setattr(export, "_advise_dontneed", faulty_device)
    with pytest.raises(RepositoryError, match=r"written to .* does not verify"):
        export.export_repo(sim.path, tmp_path / "stick", now=sim.now)


def test_a_cut_export_leaves_the_previous_one_whole(
        sim: RepoSim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stick is pulled while the new version file is being written: the old release and
    its package are still there and verify; the next export removes the temp file."""
    stick = tmp_path / "stick"
    export.export_repo(sim.path, stick, now=sim.now)
    before = files(stick)
    sim.publish(2)
    real_replace = os.replace

    def pulled(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).name == "version.json":
            raise OSError(5, "Input/output error")
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", pulled)
    with pytest.raises(PublishError, match=r"cannot write .*version\.json: Input/output error"):
        export.export_repo(sim.path, stick, now=sim.now)
    monkeypatch.undo()
    after = files(stick)
    assert {k: v for k, v in after.items() if k in before} == before
    report = verify_repo(stick, trust_root=sim.anchor, now=sim.now)
    assert report.ok and report.releases["version.json"].version == 1
    (stick / "root/.2.root.json.abc_123.tmp").write_bytes(b"left by a crash")
    assert "version.json" in export.export_repo(sim.path, stick, now=sim.now).written
    assert not list(stick.rglob("*.tmp"))


@pytest.mark.parametrize("case", ["newer-root", "inside-repo", "no-channel", "bad-name",
                                  "linked-dir"])
def test_what_cannot_be_done_as_asked_is_exit_2(sim: RepoSim, tmp_path: Path,
                                                case: str) -> None:
    stick, version_file = tmp_path / "stick", "version.json"
    (stick / "root").mkdir(parents=True)
    if case == "newer-root":  # another repository's export
        (stick / "root/9.root.json").write_bytes(b"{}")
    elif case == "inside-repo":
        stick = sim.path / "usb"
    elif case == "no-channel":
        version_file = "version-arm64.json"
    elif case == "bad-name":
        version_file = "../version.json"
    else:
        (stick / "root").rmdir()
        (stick / "root").symlink_to(tmp_path)
    before = tree_digest(tmp_path)
    with pytest.raises(PublishError):
        export.export_repo(sim.path, stick, version_file=version_file, now=sim.now)
    assert tree_digest(tmp_path) == before
    code = cli.main(["export", str(sim.path), str(stick), "--version-file", version_file])
    assert code == cli.EXIT_USAGE


def test_the_cli_says_until_when_the_stick_works_and_how_to_use_it(
        sim: RepoSim, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim.refresh()  # expires 30 days from the real clock, which the CLI uses
    assert cli.main(["export", str(sim.path), str(tmp_path / "stick")]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "exported release v1 of version.json" in out and "root v1..v2" in out
    assert "mkdir -p /mnt/usb; mount -o ro,nodev,nosuid,noexec /dev/sda1 /mnt/usb" in out
    assert f"until {sim.current().expires:%Y-%m-%dT%H:%M:%SZ}" in out  # type: ignore[union-attr]


def test_the_stick_steps_of_the_docs_make_their_mount_points() -> None:
    """operations.md's stick steps, followed literally on a fresh Debian 12 (whose /mnt is
    empty and which has no /media/usb): each mount point is made before it is mounted on."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = doc.split("## Updates without a network (USB stick)", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```sh\n")[1:]]
    assert len(blocks) == 2, blocks
    for block in blocks:
        made: set[str] = set()
        mounted = []
        for line in block.splitlines():
            words = line.split("#", 1)[0].split()
            if words[:2] == ["mkdir", "-p"]:
                made.update(words[2:])
            elif words[:1] == ["mount"]:
                mounted.append(words[-1])
                assert words[-1] in made, f"{words[-1]} is not made before: {line}"
        assert mounted, block
