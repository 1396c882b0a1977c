"""What the fetcher makes of hostile headers (issue 13, 1.2 and 1.4), against a real server.

* Validators (ETag, Last-Modified) are returned for storing only when RFC 9110-valid visible
  ASCII of at most 256 bytes; invalid stored ones are never sent; a conditional request that
  fails or is answered with an error status is retried once without validators.
* A Content-Length that is not ASCII digits, and a redirect to an unparseable URL, are a
  :class:`DownloadError` (exit 4), never an unexpected exception (exit 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import Fault, FaultServer

from opq_box_updater.config import Timeouts
from opq_box_updater.errors import DownloadError, DownloadHTTPError
from opq_box_updater.fetcher import Fetcher
from opq_box_updater.httpcheck import valid_etag, valid_last_modified

META = "version.json"
BODY = b'{"signed": {}}'
DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
PACKAGE = bytes(range(256)) * 64

BAD_ETAGS = {
    "folded": '"abc"\r\n "def"',
    "nul": '"a\x00b"',
    "10k": '"' + "a" * 10240 + '"',
    "257-bytes": '"' + "a" * 255 + '"',
    "unquoted": "abc",
    "inner-quote": '"a"b"',
    "space": '"a b"',
    "non-ascii": '"caf\xe9"',
    "lowercase-weak": 'w/"abc"',
}
GOOD_ETAGS = ['"abc"', 'W/"abc"', '""', '"' + "a" * 254 + '"', '"!#$%&()*+,-./~"']
BAD_DATES = {
    "folded": f"{DATE}\r\n x",
    "nul": DATE.replace(" GMT", "\x00GMT"),
    "10k": DATE + " " * 10240,
    "not-gmt": DATE.replace("GMT", "UTC"),
    "garbage": "yesterday",
    "no-weekday": DATE[5:],
}
GOOD_DATES = [DATE, "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultServer]:
    (tmp_path / META).write_bytes(BODY)
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "p.zip").write_bytes(PACKAGE)
    with FaultServer(tmp_path) as srv:
        yield srv


def fetcher(url: str) -> Fetcher:
    return Fetcher(url, Timeouts(connect=3, read=1, total=30), progress=False)


# --- validators: the pure checks ------------------------------------------------------------


@pytest.mark.parametrize("value", GOOD_ETAGS)
def test_valid_etags_are_kept(value: str) -> None:
    assert valid_etag(value) == value


@pytest.mark.parametrize("value", BAD_ETAGS.values(), ids=BAD_ETAGS)
def test_invalid_etags_are_dropped(value: str) -> None:
    assert valid_etag(value) is None


@pytest.mark.parametrize("value", GOOD_DATES)
def test_valid_http_dates_are_kept(value: str) -> None:
    assert valid_last_modified(value) == value


@pytest.mark.parametrize("value", BAD_DATES.values(), ids=BAD_DATES)
def test_invalid_http_dates_are_dropped(value: str) -> None:
    assert valid_last_modified(value) is None


# --- validators: over the wire --------------------------------------------------------------


@pytest.mark.parametrize("etag", ["folded", "nul", "10k"])
def test_a_poisoned_etag_is_not_returned_for_storing(server: FaultServer, etag: str) -> None:
    server.set_fault(META, Fault(body=BODY, headers={"ETag": BAD_ETAGS[etag],
                                                     "Last-Modified": BAD_DATES[etag]}))
    with fetcher(server.url) as f:
        resp = f.fetch_metadata(META)
    assert (resp.status, resp.body, resp.etag, resp.last_modified) == (200, BODY, None, None)


@pytest.mark.parametrize(("etag", "last_modified"), [
    pytest.param(BAD_ETAGS["folded"], None, id="folded-etag"),
    pytest.param(BAD_ETAGS["nul"], None, id="nul-etag"),
    pytest.param(BAD_ETAGS["10k"], None, id="10k-etag"),
    pytest.param(None, BAD_DATES["folded"], id="folded-date"),
    pytest.param('"fine"', BAD_DATES["10k"], id="good-etag-bad-date"),
])
def test_stored_invalid_validators_are_never_sent(server: FaultServer, etag: str | None,
                                                  last_modified: str | None) -> None:
    """A state.json poisoned by an older version: the request goes out unconditional (so
    the caller stores fresh validators), and succeeds."""
    with fetcher(server.url) as f:
        resp = f.fetch_metadata(META, etag=etag, last_modified=last_modified)
    assert (resp.status, resp.body) == (200, BODY)
    assert resp.etag is not None and valid_etag(resp.etag) == resp.etag
    [request] = server.log
    assert "If-None-Match" not in request.headers
    assert "If-Modified-Since" not in request.headers


@pytest.mark.parametrize("status", [400, 412, 500])
def test_a_conditional_request_answered_with_an_error_is_retried_unconditionally(
        server: FaultServer, status: int) -> None:
    server.set_fault(META, Fault(status=status, times=1))
    with fetcher(server.url) as f:
        resp = f.fetch_metadata(META, etag='"some-etag"', last_modified=DATE)
    assert (resp.status, resp.body) == (200, BODY)
    first, second = server.log
    assert (first.status, first.headers["If-None-Match"]) == (status, '"some-etag"')
    assert second.status == 200
    assert "If-None-Match" not in second.headers and "If-Modified-Since" not in second.headers


def test_a_conditional_request_that_fails_is_retried_unconditionally(
        server: FaultServer) -> None:
    server.set_fault(META, Fault(delay=2, times=1))  # read timeout is 1 s
    with fetcher(server.url) as f:
        assert f.fetch_metadata(META, etag='"some-etag"').body == BODY
    log = server.log  # the silent answer is logged last, when its handler ends
    assert sorted(("If-None-Match" in r.headers) for r in log) == [False, True], log


def test_the_retry_happens_once_and_its_error_is_the_one_raised(server: FaultServer) -> None:
    server.set_fault(META, Fault(status=503))
    with fetcher(server.url) as f, pytest.raises(DownloadHTTPError) as info:
        f.fetch_metadata(META, etag='"some-etag"')
    assert info.value.status_code == 503
    assert len(server.log) == 2


def test_an_unconditional_error_is_not_retried(server: FaultServer) -> None:
    server.set_fault(META, Fault(status=503))
    with fetcher(server.url) as f, pytest.raises(DownloadHTTPError):
        f.fetch_metadata(META)
    assert len(server.log) == 1


def test_a_304_repeating_a_poisoned_etag_keeps_the_one_sent(server: FaultServer) -> None:
    with fetcher(server.url) as f:
        first = f.fetch_metadata(META)
    assert first.etag is not None
    server.set_fault(META, Fault(headers={"ETag": BAD_ETAGS["folded"]}))
    with fetcher(server.url) as f:
        again = f.fetch_metadata(META, etag=first.etag)
    assert (again.status, again.etag) == (304, first.etag)


# --- hostile headers: exit 4, never 1 -------------------------------------------------------


CONTENT_LENGTHS = {
    "superscript-two": "\xb2",
    "superscript-digits": "1\xb2\xb3",
    "thirty-digits": "9" * 30,
    "five-thousand-digits": "9" * 5000,  # int() refuses more than 4300 digits
    "negative": "-1",
    "hex": "0x10",
    "two-numbers": "5, 6",  # urllib3 refuses this one itself
}


@pytest.mark.parametrize("value", CONTENT_LENGTHS.values(), ids=CONTENT_LENGTHS)
def test_a_content_length_that_is_not_ascii_digits_is_a_download_error(
        server: FaultServer, value: str) -> None:
    server.set_fault(META, Fault(headers={"Content-Length": value}, connection_close=True))
    with fetcher(server.url) as f, pytest.raises(DownloadError) as info:
        f.fetch_metadata(META)
    assert type(info.value) is DownloadError and "Content-Length" in str(info.value)


def test_a_package_with_a_superscript_content_length_is_a_download_error(
        server: FaultServer, tmp_path: Path) -> None:
    server.set_fault("packages/p.zip", Fault(headers={"Content-Length": "\xb2"},
                                             connection_close=True))
    sha = hashlib.sha256(PACKAGE).hexdigest()
    with fetcher(server.url) as f, pytest.raises(DownloadError, match="invalid Content-Length"):
        f.fetch_package("packages/p.zip", tmp_path / "dl", sha, len(PACKAGE))


LOCATIONS = {
    "unclosed-ipv6": "http://[::1",
    "not-an-ip-in-brackets": "http://[zzz]/",
    "non-utf-8": "/\xff\xfe.json",
    "bad-port": "http://127.0.0.1:99999/x",
    "space": "/a b",
    "ftp": "ftp://127.0.0.1/version.json",
}


@pytest.mark.parametrize("location", LOCATIONS.values(), ids=LOCATIONS)
def test_a_redirect_to_an_unparseable_location_is_a_download_error(
        server: FaultServer, location: str) -> None:
    server.set_fault(META, Fault(redirect_to=location))
    with fetcher(server.url) as f, pytest.raises(DownloadError) as info:
        f.fetch_metadata(META)
    assert type(info.value) is DownloadError
    assert str(info.value).startswith(server.url) and "\n" not in str(info.value)
