"""Tests of :mod:`opq_box_updater.fetcher` against a real, misbehaving HTTP server on loopback.

Wall-clock assertions are deliberately loose (deadline + 5 s): they prove that a trickling
server is cut off at all, not how precisely.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultserver import Fault, FaultServer, self_signed_cert

from opq_box_updater.config import Timeouts
from opq_box_updater.errors import (
    DownloadError,
    DownloadHTTPError,
    LengthOrHashMismatchError,
    SlowRetrievalError,
    StateError,
)
from opq_box_updater.fetcher import Fetcher, post_report
from opq_box_updater.partfile import CHUNK_SIZE, HASH_QUEUE

META = "version.json"
META_BODY = b'{"signed": {"type": "release"}, "signatures": []}'.ljust(100)
PKG_SIZE = 1024 * 1024 + 123  # not a multiple of the chunk size
DEADLINE = 1.5


@dataclass(frozen=True)
class Package:
    relpath: str
    sha256: str
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "packages").mkdir(parents=True)
    (root / META).write_bytes(META_BODY)
    return root


@pytest.fixture
def server(repo: Path) -> Iterator[FaultServer]:
    with FaultServer(repo) as srv:
        yield srv


@pytest.fixture
def package(repo: Path) -> Package:
    return add_package(repo, random.Random(1).randbytes(PKG_SIZE))


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "downloads"


def add_package(repo: Path, data: bytes) -> Package:
    sha = hashlib.sha256(data).hexdigest()
    relpath = f"packages/{sha}.zip"
    (repo / relpath).write_bytes(data)
    return Package(relpath, sha, data)


def fetcher(url: str, total: float = 20, read: float = 10, **kwargs: object) -> Fetcher:
    return Fetcher(url, Timeouts(connect=5, read=read, total=total), progress=False,
                   **kwargs)  # type: ignore[arg-type]


def get_package(server: FaultServer, package: Package, dest: Path, **kwargs: object) -> Path:
    with fetcher(server.url, **kwargs) as f:  # type: ignore[arg-type]
        return f.fetch_package(package.relpath, dest, package.sha256, package.length)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_one_line_naming(exc: BaseException, url: str) -> None:
    assert url in str(exc)
    assert "\n" not in str(exc)


# --- metadata -------------------------------------------------------------------------------


def test_metadata_returns_body_and_validators_and_asks_for_identity(server: FaultServer) -> None:
    with fetcher(server.url) as f:
        resp = f.fetch_metadata(META)
    assert (resp.status, resp.body) == (200, META_BODY)
    assert resp.etag and resp.last_modified
    assert f.bytes_received == len(META_BODY)
    headers = server.log[-1].headers
    assert headers["Accept-Encoding"] == "identity"  # we hash the bytes as served
    assert headers["User-Agent"].startswith("opq-box-updater/")
    assert "If-None-Match" not in headers


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
def test_metadata_conditional_get_answers_304(server: FaultServer, validator: str) -> None:
    with fetcher(server.url) as f:
        first = f.fetch_metadata(META)
    kwargs = {validator: getattr(first, validator)}
    with fetcher(server.url) as f:
        again = f.fetch_metadata(META, **kwargs)
    assert again.status == 304 and again.body is None
    assert (again.etag, again.last_modified) == (first.etag, first.last_modified)
    assert f.bytes_received == 0
    header = {"etag": "If-None-Match", "last_modified": "If-Modified-Since"}[validator]
    assert server.log[-1].headers[header] == kwargs[validator]
    assert server.log[-1].status == 304


def test_metadata_with_stale_etag_gets_the_new_body(server: FaultServer, repo: Path) -> None:
    with fetcher(server.url) as f:
        resp = f.fetch_metadata(META, etag='"an-old-etag"')
    assert (resp.status, resp.body) == (200, META_BODY)


def test_metadata_follows_a_redirect(server: FaultServer) -> None:
    server.set_fault("/old.json", Fault(redirect_to=f"/{META}"))
    with fetcher(server.url) as f:
        assert f.fetch_metadata("old.json").body == META_BODY
    assert [r.path for r in server.log] == ["/old.json", f"/{META}"]


@pytest.mark.parametrize(("fault", "max_bytes", "max_received"), [
    pytest.param(Fault(body=b"x" * 101), 100, 0, id="content-length-above-cap"),
    pytest.param(Fault(endless=True), 100, 101, id="endless-body"),
    pytest.param(Fault(endless=True), 65536, 65537, id="endless-body-default-cap"),
])
def test_metadata_above_the_cap_is_refused(server: FaultServer, fault: Fault, max_bytes: int,
                                           max_received: int) -> None:
    server.set_fault(META, fault)
    with fetcher(server.url) as f, pytest.raises(LengthOrHashMismatchError) as info:
        f.fetch_metadata(META, max_bytes=max_bytes)
    assert f.bytes_received <= max_received  # never more than max_bytes + 1
    assert_one_line_naming(info.value, server.url)


def test_metadata_exactly_at_the_cap_is_accepted(server: FaultServer) -> None:
    with fetcher(server.url) as f:
        assert f.fetch_metadata(META, max_bytes=len(META_BODY)).body == META_BODY


@pytest.mark.parametrize(("fault", "error", "words"), [
    pytest.param(Fault(status=404), DownloadHTTPError, "HTTP 404", id="404"),
    pytest.param(Fault(status=500), DownloadHTTPError, "HTTP 500", id="500"),
    pytest.param(Fault(truncate_after=50), DownloadError, "after 50 of 100", id="truncated"),
    pytest.param(Fault(content_length=200), DownloadError, "after 100 of 200",
                 id="content-length-too-big"),
    pytest.param(Fault(reset_after=50), DownloadError, "", id="reset"),
    pytest.param(Fault(redirect_loop=True), DownloadError, "redirect", id="redirect-loop"),
    pytest.param(Fault(body=b"x", content_length=-1), DownloadError, "Content-Length",
                 id="invalid-content-length"),
])
def test_metadata_transfer_failures(server: FaultServer, fault: Fault,
                                    error: type[DownloadError], words: str) -> None:
    server.set_fault(META, fault)
    with fetcher(server.url) as f, pytest.raises(DownloadError) as info:
        f.fetch_metadata(META)
    assert type(info.value) is error
    assert words in str(info.value)
    assert_one_line_naming(info.value, server.url)
    if isinstance(info.value, DownloadHTTPError):
        assert info.value.status_code == fault.status


@pytest.mark.parametrize(("url", "words"), [
    pytest.param("http://nonexistent.invalid", "resolve", id="unresolvable"),
    pytest.param(f"http://127.0.0.1:{free_port()}", "refused", id="refused"),
])
def test_unreachable_server(url: str, words: str) -> None:
    with fetcher(url) as f, pytest.raises(DownloadError) as info:
        f.fetch_metadata(META)
    assert type(info.value) is DownloadError
    assert words in str(info.value)
    assert_one_line_naming(info.value, url)


def test_silent_server_hits_the_read_timeout(server: FaultServer) -> None:
    server.set_fault(META, Fault(delay=5))
    with fetcher(server.url, read=0.5) as f, pytest.raises(DownloadError) as info:
        f.fetch_metadata(META)
    assert type(info.value) is DownloadError  # a read timeout, not the overall deadline
    assert "timeouts.read" in str(info.value)


# --- the overall deadline -------------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    pytest.param(Fault(trickle=0.3), id="body"),
    pytest.param(Fault(trickle=0.3, trickle_headers=True), id="headers"),
])
def test_trickling_metadata_stops_at_the_deadline(server: FaultServer, fault: Fault) -> None:
    # Each byte arrives well within timeouts.read, so only the overall deadline can stop it.
    server.set_fault(META, fault)
    start = time.monotonic()
    with fetcher(server.url, total=DEADLINE) as f, pytest.raises(SlowRetrievalError) as info:
        f.fetch_metadata(META)
    assert time.monotonic() - start < DEADLINE + 5
    assert "timeouts.total" in str(info.value)


def test_trickling_package_stops_at_the_deadline_and_keeps_the_part(
        server: FaultServer, package: Package, dest: Path) -> None:
    server.set_fault(package.relpath, Fault(trickle=0.2))
    start = time.monotonic()
    with pytest.raises(SlowRetrievalError):
        get_package(server, package, dest, total=DEADLINE)
    assert time.monotonic() - start < DEADLINE + 5
    part = dest / f"{package.sha256}.part"
    assert 0 < part.stat().st_size < package.length  # kept for the next run
    assert package.data.startswith(part.read_bytes())


def test_deadline_covers_all_requests_of_a_fetcher(server: FaultServer) -> None:
    with fetcher(server.url, total=0.5) as f:
        f.fetch_metadata(META)
        time.sleep(0.6)
        with pytest.raises(SlowRetrievalError):
            f.fetch_metadata(META)
    assert len(server.log) == 1  # the late request never reached the network


# --- packages -------------------------------------------------------------------------------


def test_package_download_verifies_and_renames(server: FaultServer, package: Package,
                                               dest: Path) -> None:
    with fetcher(server.url) as f:
        path = f.fetch_package(package.relpath, dest, package.sha256, package.length)
    assert path == dest / f"{package.sha256}.zip"
    assert path.read_bytes() == package.data
    assert sorted(p.name for p in dest.iterdir()) == [path.name]
    assert f.bytes_received == package.length
    assert "Range" not in server.log[-1].headers


def test_verified_package_is_not_fetched_again(server: FaultServer, package: Package,
                                               dest: Path) -> None:
    get_package(server, package, dest)
    get_package(server, package, dest)
    assert len(server.log) == 1


def test_corrupt_package_on_disk_is_fetched_again(server: FaultServer, package: Package,
                                                  dest: Path) -> None:
    dest.mkdir()
    (dest / f"{package.sha256}.zip").write_bytes(b"not the package")
    assert get_package(server, package, dest).read_bytes() == package.data


# Planted in the download directory by someone else (issue 13, item 2): each must be removed,
# never written or read through; the download then succeeds.
PLANTS = {
    "part-symlink": ("part", lambda target, at: at.symlink_to(target)),
    "part-dangling-symlink": ("part", lambda target, at: at.symlink_to(target.parent / "new")),
    "part-hard-link": ("part", lambda target, at: os.link(target, at)),
    "part-fifo": ("part", lambda target, at: os.mkfifo(at)),
    "zip-symlink": ("zip", lambda target, at: at.symlink_to(target)),
    "zip-hard-link": ("zip", lambda target, at: os.link(target, at)),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_a_planted_link_is_never_written_through(server: FaultServer, package: Package,
                                                 dest: Path, tmp_path: Path,
                                                 plant: str) -> None:
    suffix, make = PLANTS[plant]
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious"
    target.write_bytes(package.data[:1000])  # a prefix: a resume would append the rest
    dest.mkdir()
    make(target, dest / f"{package.sha256}.{suffix}")
    assert get_package(server, package, dest).read_bytes() == package.data
    assert target.read_bytes() == package.data[:1000]
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    final = dest / f"{package.sha256}.zip"
    assert not final.is_symlink() and final.stat().st_nlink == 1
    assert "Range" not in server.log[-1].headers  # nothing was "resumed" from the target


def test_a_planted_zip_symlink_to_the_right_bytes_is_still_replaced(
        server: FaultServer, package: Package, dest: Path, tmp_path: Path) -> None:
    """Even the right bytes are not trusted behind a link: whoever owns the target could
    change them between the hash check and the extraction."""
    target = tmp_path / "theirs.zip"
    target.write_bytes(package.data)
    dest.mkdir()
    (dest / f"{package.sha256}.zip").symlink_to(target)
    path = get_package(server, package, dest)
    assert not path.is_symlink() and path.read_bytes() == package.data
    assert len(server.log) == 1


def test_a_planted_directory_is_a_clear_state_error(server: FaultServer, package: Package,
                                                    dest: Path) -> None:
    (dest / f"{package.sha256}.part" / "x").mkdir(parents=True)
    with pytest.raises(StateError, match="remove it by hand"):
        get_package(server, package, dest)


@pytest.mark.parametrize("fault", [
    pytest.param(lambda half: Fault(truncate_after=half, times=1), id="truncated"),
    pytest.param(lambda half: Fault(reset_after=half, times=1), id="reset"),
])
def test_interrupted_download_resumes_with_range(server: FaultServer, package: Package,
                                                 dest: Path, fault: object) -> None:
    half = package.length // 2
    server.set_fault(package.relpath, fault(half))  # type: ignore[operator]
    with fetcher(server.url) as first, pytest.raises(DownloadError) as info:
        first.fetch_package(package.relpath, dest, package.sha256, package.length)
    assert type(info.value) is DownloadError
    assert_one_line_naming(info.value, server.url)
    kept = (dest / f"{package.sha256}.part").stat().st_size
    assert kept <= half

    with fetcher(server.url) as second:
        path = second.fetch_package(package.relpath, dest, package.sha256, package.length)
    assert path.read_bytes() == package.data
    retry = server.log[-1]
    if kept:
        assert (retry.headers["Range"], retry.status) == (f"bytes={kept}-", 206)
    total = first.bytes_received + second.bytes_received
    assert package.length <= total <= 1.05 * package.length  # DESIGN 7


def test_resume_against_a_server_without_range_starts_over(
        server: FaultServer, package: Package, dest: Path) -> None:
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    server.set_fault(package.relpath, Fault(ignore_range=True))
    assert get_package(server, package, dest).read_bytes() == package.data
    assert server.log[-1].headers["Range"] == "bytes=1000-"
    assert server.log[-1].status == 200


def test_416_deletes_the_part_and_starts_over_once(server: FaultServer, package: Package,
                                                   dest: Path) -> None:
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    server.set_fault(package.relpath, Fault(status=416, times=1))
    assert get_package(server, package, dest).read_bytes() == package.data
    first, second = server.log
    assert (first.headers["Range"], first.status) == ("bytes=1000-", 416)
    assert ("Range" not in second.headers, second.status) == (True, 200)


def test_corrupt_part_prefix_is_detected_and_downloaded_afresh(
        server: FaultServer, package: Package, dest: Path) -> None:
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(b"\0" * 1000)  # not the package's bytes
    assert get_package(server, package, dest).read_bytes() == package.data
    assert [r.status for r in server.log] == [206, 200]


def test_complete_part_from_a_crashed_run_needs_no_network(
        server: FaultServer, package: Package, dest: Path) -> None:
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data)
    assert get_package(server, package, dest).read_bytes() == package.data
    assert server.log == []


def test_oversized_part_is_discarded(server: FaultServer, package: Package, dest: Path) -> None:
    """A .part longer than the signed length is discarded before any request: no Range past
    the end is ever sent (the server's 416 must not be what catches it)."""
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data + b"junk")
    assert get_package(server, package, dest).read_bytes() == package.data
    assert [(r.headers.get("Range"), r.status) for r in server.log] == [(None, 200)]


@pytest.mark.parametrize(("fault", "max_received"), [
    pytest.param(lambda p: Fault(body=p.data + b"more"), 0, id="declares-too-much"),
    pytest.param(lambda p: Fault(endless=True), PKG_SIZE + 1, id="endless"),
    pytest.param(lambda p: Fault(body=p.data[::-1]), PKG_SIZE, id="wrong-bytes"),
])
def test_package_refusals_delete_the_part(server: FaultServer, package: Package, dest: Path,
                                          fault: object, max_received: int) -> None:
    server.set_fault(package.relpath, fault(package))  # type: ignore[operator]
    with fetcher(server.url) as f, pytest.raises(LengthOrHashMismatchError) as info:
        f.fetch_package(package.relpath, dest, package.sha256, package.length)
    assert f.bytes_received <= max_received  # at most one byte past the signed length
    assert list(dest.iterdir()) == []
    assert_one_line_naming(info.value, server.url)


def test_resumed_range_from_a_longer_file_is_refused(repo: Path, server: FaultServer,
                                                     package: Package, dest: Path) -> None:
    """The 206's total names a file longer than the signed one: refused on that alone, even
    when Content-Length claims exactly the bytes still missing (and the body delivers just
    those, the signed ones): the server's file is not the release's."""
    (repo / package.relpath).write_bytes(package.data + b"trailing")
    server.set_fault(package.relpath, Fault(content_length=package.length - 1000))
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    with fetcher(server.url) as f, pytest.raises(LengthOrHashMismatchError):
        f.fetch_package(package.relpath, dest, package.sha256, package.length)
    assert f.bytes_received == 0  # refused on the headers
    assert list(dest.iterdir()) == []
    assert [r.status for r in server.log] == [206]


def test_http_error_keeps_the_part(server: FaultServer, package: Package, dest: Path) -> None:
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    server.set_fault(package.relpath, Fault(status=503))
    with pytest.raises(DownloadHTTPError) as info:
        get_package(server, package, dest)
    assert info.value.status_code == 503
    assert (dest / f"{package.sha256}.part").stat().st_size == 1000


def test_bad_sha256_argument_is_a_programming_error(server: FaultServer, dest: Path) -> None:
    with fetcher(server.url) as f, pytest.raises(ValueError):
        f.fetch_package("packages/x.zip", dest, "../../etc/passwd", 1)


def test_memory_stays_flat_in_package_size(repo: Path, server: FaultServer, dest: Path) -> None:
    big = add_package(repo, random.Random(2).randbytes(8 * 1024 * 1024))
    tracemalloc.start()
    try:
        get_package(server, big, dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The chunks queued for the hashing thread and a few more; never the 8 MiB package.
    assert peak < (HASH_QUEUE + 8) * CHUNK_SIZE


# --- progress -------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False, None])
def test_progress_bar_only_when_asked(server: FaultServer, package: Package, dest: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      progress: bool | None) -> None:
    with Fetcher(server.url, Timeouts(), progress=progress) as f:
        f.fetch_package(package.relpath, dest, package.sha256, package.length)
    out, err = capsys.readouterr()
    assert out == ""
    if progress:  # None: only on a terminal, and pytest's stderr is not one
        assert err.startswith("\r") and err.endswith("\n")
        assert "1.0 MiB / 1.0 MiB  100%" in err
    else:
        assert err == ""


# --- HTTPS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(repo: Path, tls_files: tuple[Path, Path]) -> Iterator[FaultServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    with FaultServer(repo, ssl_context=context) as srv:
        yield srv


def test_https_with_pinned_ca_bundle(tls_server: FaultServer,
                                     tls_files: tuple[Path, Path]) -> None:
    with fetcher(tls_server.url, ca_bundle=tls_files[0]) as f:
        assert f.fetch_metadata(META).body == META_BODY


def test_https_without_the_ca_is_refused(tls_server: FaultServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with fetcher(tls_server.url) as f, pytest.raises(DownloadError) as info:
        f.fetch_metadata(META)
    assert "certificate" in str(info.value)


def test_https_trickle_stops_at_the_deadline(tls_server: FaultServer,
                                             tls_files: tuple[Path, Path]) -> None:
    tls_server.set_fault(META, Fault(trickle=0.3))
    start = time.monotonic()
    with fetcher(tls_server.url, total=DEADLINE, ca_bundle=tls_files[0]) as f, \
            pytest.raises(SlowRetrievalError):
        f.fetch_metadata(META)
    assert time.monotonic() - start < DEADLINE + 5


# --- status reports -------------------------------------------------------------------------


def test_post_report_sends_json(server: FaultServer) -> None:
    assert post_report(f"{server.url}/report", {"last_result": "updated", "box_id": "b1"},
                       Timeouts())
    assert server.posted == [("/report", b'{"box_id": "b1", "last_result": "updated"}')]
    assert server.log[-1].headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("fault", "url"), [
    pytest.param(Fault(status=500), None, id="500"),
    pytest.param(Fault(delay=5), None, id="silent"),
    pytest.param(None, f"http://127.0.0.1:{free_port()}/report", id="refused"),
])
def test_post_report_failures_only_warn(server: FaultServer, fault: Fault | None,
                                        url: str | None,
                                        caplog: pytest.LogCaptureFixture) -> None:
    server.set_fault("/report", fault)
    ok = post_report(url or f"{server.url}/report", {"x": 1},
                     Timeouts(connect=1, read=0.5, total=10))
    assert ok is False
    assert "status report not sent" in caplog.text


# --- import cost ----------------------------------------------------------------------------


def test_fetcher_imports_no_heavy_modules() -> None:
    # DESIGN 7: the no-op check must cost about what `import requests` costs.
    code = ("import sys, opq_box_updater.fetcher; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('cryptography', 'debian', 'apt')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
