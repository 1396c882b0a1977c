"""The package download's checks that mutation testing (make mutate) showed untested: each
test here fails when the check it names is deleted from fetcher.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_fetcher
from faultserver import Fault, FaultServer
from test_fetcher import Package, get_package

from opq_box_updater.errors import LengthOrHashMismatchError

# test_fetcher's fixtures: a repository served on 127.0.0.1, its package, a download dir.
repo, server, package, dest = (test_fetcher.repo, test_fetcher.server, test_fetcher.package,
                               test_fetcher.dest)


def test_complete_part_with_wrong_bytes_is_fetched_again(
        server: FaultServer, package: Package, dest: Path) -> None:
    """A planted or torn .part of exactly the signed length is hashed before use: it is
    thrown away and the package fetched whole, never handed on unverified."""
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[::-1])
    assert get_package(server, package, dest).read_bytes() == package.data
    assert [r.headers.get("Range") for r in server.log] == [None]


def test_206_total_other_than_the_signed_length_is_refused(
        server: FaultServer, package: Package, dest: Path) -> None:
    """The right bytes under a Content-Range naming another file size: the server's file is
    not the signed one, so the part goes and nothing is committed."""
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    end = package.length - 1
    server.set_fault(package.relpath, Fault(
        headers={"Content-Range": f"bytes 1000-{end}/{package.length + 8}"}))
    with pytest.raises(LengthOrHashMismatchError, match="server's file has"):
        get_package(server, package, dest)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("header", ["bytes 999-{end}/{length}", "bytes 0-{end}/{length}",
                                    "bytes 1000-{end}", "1000-{end}/{length}"])
def test_206_from_another_offset_starts_over(
        server: FaultServer, package: Package, dest: Path, header: str) -> None:
    """A 206 that does not continue exactly at the part's end is not appended: the download
    starts over from byte 0 and still yields the signed bytes."""
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    value = header.format(end=package.length - 1, length=package.length)
    server.set_fault(package.relpath, Fault(headers={"Content-Range": value}, times=1))
    assert get_package(server, package, dest).read_bytes() == package.data
    # the refused answer may be logged after the new request: compare without order
    assert sorted(str(r.headers.get("Range")) for r in server.log) == ["None", "bytes=1000-"]

