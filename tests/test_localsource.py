"""The ``--from DIR`` source against a hostile directory (issue 8, part 3), in process.

DIR is treated like a server: every test builds a bad stick in a line or two and asserts the
typed error, its exit code (through the CLI's one map) and that the download directory holds
nothing the bad stick delivered.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from opq_box_updater.cli import exit_code_for
from opq_box_updater.errors import (
    ConfigError,
    DownloadError,
    LengthOrHashMismatchError,
    MissingFileError,
    NotPlainFileError,
    UpdaterError,
)
from opq_box_updater.localsource import LocalSource

PACKAGE = b"PK\x05\x06" + bytes(18) + b"not really a zip, but bytes with a hash" * 100
SHA = hashlib.sha256(PACKAGE).hexdigest()
PKG = f"packages/{SHA}.zip"
VERSION = b'{"signed": {}, "signatures": []}'


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    """A directory with the repository's layout (content is not verified at this level)."""
    d = tmp_path / "stick"
    (d / "root").mkdir(parents=True)
    (d / "packages").mkdir()
    (d / "version.json").write_bytes(VERSION)
    (d / "root/1.root.json").write_bytes(b"{}")
    (d / PKG).write_bytes(PACKAGE)
    return d


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    return d


def refused(exc: pytest.ExceptionInfo[UpdaterError], code: int, *words: str) -> None:
    """One line naming what failed, mapped to ``code``."""
    text = str(exc.value)
    assert exit_code_for(exc.value) == code, (type(exc.value), text)
    assert "\n" not in text
    for word in words:
        assert word in text, text


def test_a_genuine_stick_delivers_its_bytes(stick: Path, dest: Path) -> None:
    with LocalSource(stick, progress=False) as source:
        response = source.fetch_metadata("version.json")
        assert response == (200, VERSION, None, None)
        # Validators are ignored: a file has none, and a 304 would skip verification.
        assert source.fetch_metadata("version.json", etag='"x"').body == VERSION
        path = source.fetch_package(PKG, dest, SHA, len(PACKAGE))
    assert path == dest / f"{SHA}.zip" and path.read_bytes() == PACKAGE
    assert sorted(p.name for p in dest.iterdir()) == [f"{SHA}.zip"]


def test_a_network_partial_download_is_replaced_by_the_stick_copy(stick: Path,
                                                                   dest: Path) -> None:
    (dest / f"{SHA}.part").write_bytes(b"garbage from a cut download" * 10)
    with LocalSource(stick, progress=False) as source:
        assert source.fetch_package(PKG, dest, SHA, len(PACKAGE)).read_bytes() == PACKAGE
    assert not (dest / f"{SHA}.part").exists()


def test_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        LocalSource(tmp_path / "not-mounted")
    refused(exc, 2, "not-mounted", "mount -o ro,nodev,nosuid,noexec")


def test_an_empty_directory_is_a_stick_not_mounted(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    with pytest.raises(ConfigError) as exc:
        LocalSource(tmp_path / "mnt")
    refused(exc, 2, "the directory is empty; is the stick mounted?", "mount -o ro,nodev")


@pytest.mark.parametrize("relpath", ["version.json", "root/2.root.json", PKG])
def test_a_missing_file_is_what_404_is(stick: Path, dest: Path, relpath: str) -> None:
    (stick / relpath).unlink(missing_ok=True)
    with LocalSource(stick) as source, pytest.raises(MissingFileError) as exc:
        if relpath == PKG:
            source.fetch_package(relpath, dest, SHA, len(PACKAGE))
        else:
            source.fetch_metadata(relpath)
    refused(exc, 4, str(stick / relpath), "no such file")
    assert list(dest.iterdir()) == []


def _symlink_out(stick: Path, tmp_path: Path) -> str:
    """version.json -> a valid copy outside the stick."""
    outside = tmp_path / "outside.json"
    outside.write_bytes(VERSION)
    (stick / "version.json").unlink()
    (stick / "version.json").symlink_to(outside)
    return "version.json"


def _symlink_in(stick: Path, tmp_path: Path) -> str:
    """version.json -> a file inside the stick: no link is followed at all."""
    (stick / "copy.json").write_bytes(VERSION)
    (stick / "version.json").unlink()
    (stick / "version.json").symlink_to("copy.json")
    return "version.json"


def _linked_dir(stick: Path, tmp_path: Path) -> str:
    """root/ -> a directory outside the stick holding a root."""
    outside = tmp_path / "outside-root"
    outside.mkdir()
    (outside / "1.root.json").write_bytes(b"{}")
    shutil.rmtree(stick / "root")
    (stick / "root").symlink_to(outside)
    return "root/1.root.json"


def _fifo(stick: Path, tmp_path: Path) -> str:
    (stick / "version.json").unlink()
    os.mkfifo(stick / "version.json")  # opening it for reading would block forever
    return "version.json"


def _directory(stick: Path, tmp_path: Path) -> str:
    (stick / "version.json").unlink()
    (stick / "version.json").mkdir()
    return "version.json"


def _file_for_directory(stick: Path, tmp_path: Path) -> str:
    shutil.rmtree(stick / "root")
    (stick / "root").write_bytes(b"{}")
    return "root/1.root.json"


def _device(stick: Path, tmp_path: Path) -> str:
    (stick / "version.json").unlink()
    try:
        os.mknod(stick / "version.json", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero
    except PermissionError:
        pytest.skip("mknod needs root")  # the tests run as root (make test, CI)
    return "version.json"


@pytest.mark.parametrize("plant,what", [
    (_symlink_out, "is a symbolic link"), (_symlink_in, "is a symbolic link"),
    (_linked_dir, "is a symbolic link, not a directory"), (_fifo, "is a FIFO"),
    (_directory, "is a directory, not a file"), (_file_for_directory, "not a directory"),
    (_device, "is a device")], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_anything_but_plain_files_and_directories_is_refused(
        stick: Path, tmp_path: Path, plant: object, what: str) -> None:
    relpath = plant(stick, tmp_path)  # type: ignore[operator]
    with LocalSource(stick) as source, pytest.raises(NotPlainFileError) as exc:
        source.fetch_metadata(relpath)
    refused(exc, 3, what, "refused")


def test_a_linked_packages_directory_is_refused_before_a_byte_is_copied(
        stick: Path, tmp_path: Path, dest: Path) -> None:
    shutil.move(stick / "packages", tmp_path / "elsewhere")
    (stick / "packages").symlink_to(tmp_path / "elsewhere")
    with LocalSource(stick) as source, pytest.raises(NotPlainFileError) as exc:
        source.fetch_package(PKG, dest, SHA, len(PACKAGE))
    refused(exc, 3, "packages is a symbolic link")
    assert list(dest.iterdir()) == []


def test_metadata_over_the_cap_is_refused_unread(stick: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (stick / "version.json").write_bytes(b" " * 65537)
    reads: list[int] = []
    real = LocalSource._read

    def counting(self: LocalSource, fd: int, size: int, where: str) -> bytes:
        reads.append(size)
        return real(self, fd, size, where)

    monkeypatch.setattr(LocalSource, "_read", counting)
    with LocalSource(stick) as source, pytest.raises(LengthOrHashMismatchError) as exc:
        source.fetch_metadata("version.json")
    refused(exc, 3, "65537 bytes, more than the limit of 65536")
    assert reads == []
    with LocalSource(stick) as source:  # the same cap as over HTTP, exactly
        (stick / "version.json").write_bytes(b" " * 65536)
        assert len(source.fetch_metadata("version.json").body or b"") == 65536


@pytest.mark.parametrize("delta", [1, -1], ids=["longer", "shorter"])
def test_a_package_of_another_length_is_refused_before_copying(
        stick: Path, dest: Path, delta: int) -> None:
    with LocalSource(stick) as source, pytest.raises(LengthOrHashMismatchError) as exc:
        source.fetch_package(PKG, dest, SHA, len(PACKAGE) + delta)
    refused(exc, 3, f"{len(PACKAGE)} bytes, the release signs {len(PACKAGE) + delta}")
    assert list(dest.iterdir()) == []


def test_a_package_with_a_flipped_byte_leaves_nothing(stick: Path, dest: Path) -> None:
    data = bytearray(PACKAGE)
    data[100] ^= 1
    (stick / PKG).write_bytes(bytes(data))
    with LocalSource(stick) as source, pytest.raises(LengthOrHashMismatchError) as exc:
        source.fetch_package(PKG, dest, SHA, len(PACKAGE))
    refused(exc, 3, "SHA-256 mismatch", f"signed {SHA}")
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("relpath,change", [
    ("version.json", "grow"), (PKG, "rewrite"), (PKG, "grow")])
def test_a_file_that_changes_while_read_is_not_used(
        stick: Path, dest: Path, monkeypatch: pytest.MonkeyPatch, relpath: str,
        change: str) -> None:
    """Something writes to the stick during the copy: the same size with new bytes (new
    mtime) or more bytes. Exit 4: run again when it has finished."""
    real = LocalSource._read
    done: list[bool] = []

    def read(self: LocalSource, fd: int, size: int, where: str) -> bytes:
        if not done:
            done.append(True)
            with open(stick / relpath, "r+b") as f:  # the same inode, changed under us
                if change == "grow":
                    f.seek(0, os.SEEK_END)
                    f.write(b"more")
                else:
                    f.write(b"X")
                    os.utime(f.fileno(), ns=(1, 1))
        return real(self, fd, size, where)

    monkeypatch.setattr(LocalSource, "_read", read)
    with LocalSource(stick) as source, pytest.raises(DownloadError) as exc:
        if relpath == PKG:
            source.fetch_package(relpath, dest, SHA, len(PACKAGE))
        else:
            source.fetch_metadata(relpath)
    refused(exc, 4, "changed while it was being read", "run again")
    assert list(dest.iterdir()) == []


def test_a_read_error_of_a_failing_stick_is_exit_4(stick: Path, dest: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int, size: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with LocalSource(stick) as source:
        monkeypatch.setattr("opq_box_updater.localsource.os.read", failing)
        with pytest.raises(DownloadError) as exc:
            source.fetch_package(PKG, dest, SHA, len(PACKAGE))
    refused(exc, 4, "Input/output error", "export to another one")
    assert list(dest.iterdir()) == []


def test_a_verified_copy_in_the_download_directory_is_used_without_the_stick(
        stick: Path, dest: Path) -> None:
    """A second run (after a postponed apply, say) does not copy again, nor need the stick."""
    with LocalSource(stick, progress=False) as source:
        first = source.fetch_package(PKG, dest, SHA, len(PACKAGE))
        (stick / PKG).unlink()
        assert source.fetch_package(PKG, dest, SHA, len(PACKAGE)) == first
    assert first.read_bytes() == PACKAGE


def _swap_after_check(monkeypatch: pytest.MonkeyPatch, stick: Path, swap: str) -> None:
    """Replace version.json right after its lstat: the race a hostile stick could try."""
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(path, *args, **kwargs)
        if path == "version.json" and kwargs.get("dir_fd") is not None:
            target, other = stick / "version.json", stick / "other"
            if swap == "symlink":
                other.symlink_to("/etc/passwd")
            else:
                other.write_bytes(VERSION)  # made while the old one lives: another inode
            os.replace(other, target)
        return result

    monkeypatch.setattr(os, "stat", stat)


@pytest.mark.parametrize("swap,words", [
    ("symlink", ("cannot open", "replaced")),
    ("another-file", ("changed while it was being opened",))])
def test_a_file_swapped_between_its_check_and_its_open_is_not_read(
        stick: Path, monkeypatch: pytest.MonkeyPatch, swap: str, words: tuple[str, ...]
        ) -> None:
    with LocalSource(stick) as source:
        _swap_after_check(monkeypatch, stick, swap)
        with pytest.raises(DownloadError) as exc:
            source.fetch_metadata("version.json")
    refused(exc, 4, *words)


def test_the_copy_shows_progress_on_a_terminal(stick: Path, dest: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with LocalSource(stick, progress=True) as source:
        source.fetch_package(PKG, dest, SHA, len(PACKAGE))
    assert "100%" in capsys.readouterr().err


@pytest.mark.parametrize("relpath", ["../version.json", "root//1.root.json", "./version.json"])
def test_only_plain_relative_paths_are_asked_for(stick: Path, relpath: str) -> None:
    """The updater asks only for paths it built or the signature checked; anything else is
    a bug, never a file outside DIR."""
    with LocalSource(stick) as source, pytest.raises(ValueError):
        source.fetch_metadata(relpath)
    source.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        source.fetch_metadata("version.json")
    with pytest.raises(ValueError, match="SHA-256"):
        source.fetch_package(PKG, stick, "ABC", 1)
