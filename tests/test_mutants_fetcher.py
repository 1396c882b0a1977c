"""The package download's checks that mutation testing (make mutate) showed untested: each
test here fails when the check it names is deleted from fetcher.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import test_fetcher
from faultserver import Fault, FaultServer
from test_fetcher import META, META_BODY, Package, add_package, fetcher, get_package

from opq_box_updater import fetcher as fetcher_module
from opq_box_updater.config import Timeouts
from opq_box_updater.deadline import DeadlineAdapter
from opq_box_updater.errors import (
    DownloadError,
    DownloadHTTPError,
    LengthOrHashMismatchError,
    SlowRetrievalError,
)
from opq_box_updater.fetcher import Fetcher, post_report

# test_fetcher's fixtures: a repository served on 127.0.0.1, its package, a download dir.
repo, server, package, dest = (test_fetcher.repo, test_fetcher.server, test_fetcher.package,
                               test_fetcher.dest)
tls_files, tls_server = test_fetcher.tls_files, test_fetcher.tls_server


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



def test_206_without_content_range_starts_over(server: FaultServer, package: Package,
                                               dest: Path) -> None:
    """A 206 that does not say which bytes it holds is not appended (and is no crash)."""
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    server.set_fault(package.relpath, Fault(headers={"Content-Range": None}, times=1))
    assert get_package(server, package, dest).read_bytes() == package.data
    assert sorted(str(r.headers.get("Range")) for r in server.log) == ["None", "bytes=1000-"]


def test_206_of_a_file_of_unknown_total_is_resumed(server: FaultServer, package: Package,
                                                   dest: Path) -> None:
    """``bytes a-b/*`` (RFC 9110: total unknown) is a valid continuation: resumed, no restart."""
    dest.mkdir()
    (dest / f"{package.sha256}.part").write_bytes(package.data[:1000])
    server.set_fault(package.relpath, Fault(
        headers={"Content-Range": f"bytes 1000-{package.length - 1}/*"}))
    assert get_package(server, package, dest).read_bytes() == package.data
    assert [r.headers.get("Range") for r in server.log] == ["bytes=1000-"]


def test_a_failed_first_request_leaves_no_empty_part(server: FaultServer, package: Package,
                                                     dest: Path) -> None:
    server.set_fault(package.relpath, Fault(status=503))
    with pytest.raises(DownloadHTTPError):
        get_package(server, package, dest)
    assert list(dest.iterdir()) == []


def test_a_close_delimited_package_is_accepted(server: FaultServer, package: Package,
                                               dest: Path) -> None:
    """No Content-Length (an HTTP/1.0-style body ended by closing): the signed length and
    hash alone decide."""
    server.set_fault(package.relpath, Fault(headers={"Content-Length": None},
                                            connection_close=True))
    assert get_package(server, package, dest).read_bytes() == package.data


def test_bytes_are_hashed_as_served_never_decoded(repo: Path, server: FaultServer,
                                                  dest: Path) -> None:
    """A package whose signed bytes are gzip data, served with Content-Encoding: gzip, is
    stored as served: decoding would hash other bytes than the signed ones."""
    package = add_package(repo, gzip.compress(b"payload " * 5000))
    server.set_fault(package.relpath, Fault(headers={"Content-Encoding": "gzip"}))
    assert get_package(server, package, dest).read_bytes() == package.data


def test_an_empty_package_into_a_directory_still_to_be_made(repo: Path, server: FaultServer,
                                                            tmp_path: Path) -> None:
    """Length 0 is a length (the fetcher refuses only negative ones); the download directory
    is made with its parents."""
    package = add_package(repo, b"")
    dest = tmp_path / "a" / "b" / "downloads"
    assert get_package(server, package, dest).read_bytes() == b""
    assert hashlib.sha256(b"").hexdigest() == package.sha256


def test_a_corrupt_downloaded_package_is_named_and_fetched_again(
        server: FaultServer, package: Package, dest: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    dest.mkdir()
    (dest / f"{package.sha256}.zip").write_bytes(b"planted")
    with caplog.at_level(logging.WARNING, "opq_box_updater.fetcher"):
        assert get_package(server, package, dest).read_bytes() == package.data
    assert "does not match its signed hash" in caplog.text


# --- metadata --------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "ok"), [(65536, True), (65537, False)])
def test_metadata_cap_defaults_to_64_kib(server: FaultServer, size: int, ok: bool) -> None:
    """The updater fetches version files with the default cap: 64 KiB exactly."""
    server.set_fault(META, Fault(body=b"x" * size))
    with fetcher(server.url) as f:
        if ok:
            assert f.fetch_metadata(META).body == b"x" * size
        else:
            with pytest.raises(LengthOrHashMismatchError):
                f.fetch_metadata(META)


def test_a_conditional_200_cut_short_is_not_retried(server: FaultServer) -> None:
    """Validators are dropped and the request retried only when no answer came; a 200 whose
    body then fails is that failure (asking again would double a hostile server's load)."""
    with fetcher(server.url) as f:
        etag = f.fetch_metadata(META).etag
    server.set_fault(META, Fault(body=META_BODY, truncate_after=10))
    with fetcher(server.url) as f, pytest.raises(DownloadError):
        f.fetch_metadata(META, etag=etag)
    assert len(server.log) == 2  # the first, unconditional fetch and this one


def test_a_304_without_its_own_date_keeps_the_one_sent(server: FaultServer) -> None:
    with fetcher(server.url) as f:
        last_modified = f.fetch_metadata(META).last_modified
    server.set_fault(META, Fault(headers={"Last-Modified": "yesterday"}))
    with fetcher(server.url) as f:
        resp = f.fetch_metadata(META, last_modified=last_modified)
    assert (resp.status, resp.last_modified) == (304, last_modified)


def test_the_retry_without_validators_names_the_first_failure(
        server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    server.set_fault(META, Fault(status=500, times=1))
    with caplog.at_level(logging.WARNING, "opq_box_updater.fetcher"), fetcher(server.url) as f:
        assert f.fetch_metadata(META, etag='"x"').body == META_BODY
    assert "HTTP 500" in caplog.text and "asking again without validators" in caplog.text


def test_less_than_a_second_left_is_still_time_to_ask(server: FaultServer) -> None:
    with fetcher(server.url, total=0.99) as f:
        assert f.fetch_metadata(META).body == META_BODY


# --- the fetcher's plumbing ------------------------------------------------------------------


def test_every_connection_goes_through_the_watchdogs_adapter(server: FaultServer) -> None:
    """The watchdog can only shut down sockets it was told of: both schemes use its adapter."""
    with fetcher(server.url) as f:
        session = f._session
        assert isinstance(session.get_adapter("http://127.0.0.1/"), DeadlineAdapter)
        assert isinstance(session.get_adapter("https://127.0.0.1/"), DeadlineAdapter)


def test_without_a_ca_bundle_the_environment_one_is_used(
        tls_server: FaultServer, tls_files: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No ca_bundle: the system's trust (requests honours REQUESTS_CA_BUNDLE then)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_files[0]))
    with fetcher(tls_server.url) as f:
        assert f.fetch_metadata(META).body == META_BODY


def test_progress_is_drawn_only_on_a_terminal(server: FaultServer, package: Package, dest: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Fetcher(server.url, Timeouts(connect=5, read=10, total=20)) as f:
        f.fetch_package(package.relpath, dest, package.sha256, package.length)
    assert "MiB" in terminal.getvalue() and terminal.getvalue().endswith("100%\n")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Fetcher(server.url, Timeouts(connect=5, read=10, total=20)) as f:
        assert f.fetch_metadata(META).body == META_BODY
        assert f._progress is False


class _Raw:
    """A response body whose read runs ``effect`` (to move the clock) first."""

    def __init__(self, data: bytes, effect: Any) -> None:
        self.data, self.effect = data, effect

    def read(self, size: int, decode_content: bool = True) -> bytes:
        self.effect()
        return self.data[:size]


def test_bytes_read_in_time_are_kept_then_the_next_read_is_too_late() -> None:
    """A read that returns data as the deadline passes keeps it (the .part keeps it); an
    empty read past the deadline is the watchdog's shutdown, not an end of body."""
    with fetcher("http://127.0.0.1:1", total=30) as f:
        def expire() -> None:
            f._watchdog.deadline = time.monotonic() - 1

        resp = requests.Response()
        resp.raw = _Raw(b"abc", expire)
        assert f._read("u", resp, 10) == b"abc"
        with pytest.raises(SlowRetrievalError):
            f._read("u", resp, 10)
    with fetcher("http://127.0.0.1:1", total=30) as f:
        resp.raw = _Raw(b"", expire)
        with pytest.raises(SlowRetrievalError):
            f._read("u", resp, 10)


def test_stream_writes_at_most_the_signed_length_and_reads_one_byte_past() -> None:
    """_stream's guarantee, whatever the server sends: it reads up to one byte past the
    signed length, writes none of that byte, and never reads again after it (a further read,
    even of 0 bytes, may wait for a hostile chunked body's next chunk header)."""
    source = bytes(range(256))
    offset, length = 10, 100
    served: list[int] = []  # bytes returned by each read, at most 7 at a time

    def read(url: str, resp: Any, size: int) -> bytes:
        assert sum(served) < length - offset + 1, "read again after the byte past the end"
        start = offset + sum(served)
        served.append(min(size, 7))
        return source[start:start + served[-1]]

    out, hasher = io.BytesIO(), hashlib.sha256()
    received = fetcher_module._stream(read, "u", requests.Response(), out, hasher, offset,
                                      length, False)
    assert received == length - offset + 1
    assert out.getvalue() == source[offset:length]
    assert hasher.hexdigest() == hashlib.sha256(source[offset:length]).hexdigest()


# --- status reports --------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "accepted"), [(200, True), (299, True), (300, False)])
def test_a_report_is_accepted_on_any_2xx_only(server: FaultServer, status: int,
                                              accepted: bool) -> None:
    server.set_fault("/report", Fault(status=status))
    assert post_report(f"{server.url}/report", {"a": 1}, Timeouts()) is accepted


def test_a_report_is_bounded_by_the_box_timeouts_and_ten_seconds(
        server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Timeouts, Path | None]] = []

    class Recording(Fetcher):
        def __init__(self, base_url: str, timeouts: Timeouts, **kwargs: Any) -> None:
            seen.append((timeouts, kwargs.get("ca_bundle")))
            super().__init__(base_url, timeouts, **kwargs)

    monkeypatch.setattr(fetcher_module, "Fetcher", Recording)
    assert post_report(f"{server.url}/report", {"a": 1},
                       Timeouts(connect=3, read=4, total=600), ca_bundle=Path("/ca.pem"))
    assert seen == [(Timeouts(connect=3, read=4, total=10.0), Path("/ca.pem"))]


def test_a_report_over_https_uses_the_ca_bundle(tls_server: FaultServer,
                                                tls_files: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert post_report(f"{tls_server.url}/report", {"a": 1}, Timeouts(),
                       ca_bundle=tls_files[0])
    assert not post_report(f"{tls_server.url}/report", {"a": 1}, Timeouts())
