"""httpcheck's rules at their edges, as pure functions (no server): each test here fails when
the bound or check it names is changed in httpcheck.py (make mutate, issue 9)."""

from __future__ import annotations

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from opq_box_updater.config import Timeouts
from opq_box_updater.errors import DownloadError
from opq_box_updater.httpcheck import declared_length, describe, http_error, redirect_target

URL = "http://127.0.0.1:1/version.json"


def response(headers: dict[str, str], status: int = 200, reason: str | None = "OK"
             ) -> requests.Response:
    resp = requests.Response()
    resp.headers = CaseInsensitiveDict(headers)
    resp.status_code = status
    resp.reason = reason  # type: ignore[assignment]
    return resp


# --- Content-Length --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "want"), [
    ("5", 5), ("5, 5", 5), ("5,5", 5), (" 5\t", 5), ("5 ,\t5", 5), ("0", 0),
])
def test_content_length_repeats_and_blanks_of_one_number(value: str, want: int) -> None:
    """RFC 9110 8.6: a list of one repeated number is that number; only SP and HTAB are
    optional whitespace around its elements."""
    assert declared_length(URL, response({"Content-Length": value})) == want


@pytest.mark.parametrize("value", ["5\x0b", "\x0c5", "5\r", "5X", "X5", "5 5", "5, 6", "", ","])
def test_content_length_with_other_blanks_or_letters_is_refused(value: str) -> None:
    with pytest.raises(DownloadError, match="invalid Content-Length"):
        declared_length(URL, response({"Content-Length": value}))


def test_chunked_transfer_ignores_content_length() -> None:
    """RFC 9112 6.3: with Transfer-Encoding the Content-Length is ignored, even a bad one."""
    resp = response({"Transfer-Encoding": "chunked", "Content-Length": "12abc"})
    assert declared_length(URL, resp) is None
    assert declared_length(URL, response({})) is None


# --- redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize(("location", "want"), [
    ("https://mirror.example/v.json", "https://mirror.example/v.json"),
    ("http://mirror.example:1/v.json", "http://mirror.example:1/v.json"),
    ("http://mirror.example:65535/v", "http://mirror.example:65535/v"),
    ("/" + "a" * 8191, "http://127.0.0.1:1/" + "a" * 8191),  # 8192 characters: the longest
])
def test_redirects_the_box_follows(location: str, want: str) -> None:
    assert redirect_target(URL, URL, location, 302) == want


@pytest.mark.parametrize("location", [
    "ftp://mirror.example/v.json", "file:///etc/passwd", "http://:80/v.json", "https:///v.json",
    "http://mirror.example:0/v.json", "http://mirror.example:65536/v.json",
    "http://mirror.example:99999/v.json", "http://mirror.example:x/v.json",
    "/" + "a" * 8192,  # 8193 characters
    "/a b", "", None,
])
def test_redirects_the_box_refuses(location: str | None) -> None:
    with pytest.raises(DownloadError) as info:
        redirect_target(URL, URL, location, 302)
    assert URL in str(info.value)


# --- error messages --------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "want"), [
    ("Not  Found\r\n", "HTTP 404 Not Found"),
    (None, "HTTP 404"),
    ("", "HTTP 404"),
    ("x" * 100, "HTTP 404 " + "x" * 80),
])
def test_http_error_names_the_status_and_a_bounded_one_line_reason(reason: str | None,
                                                                  want: str) -> None:
    error = http_error(URL, response({}, 404, reason))
    assert str(error) == f"{URL}: server answered {want}"
    assert error.status_code == 404


def test_describe_names_the_type_of_an_exception_without_text() -> None:
    assert describe(ValueError(), Timeouts()) == "transfer failed (ValueError)"
    assert describe(ValueError("a\n  b"), Timeouts()) == "transfer failed (a b)"


def test_describe_looks_at_most_20_causes_deep() -> None:
    """The cause walk is bounded (a hostile or cyclic chain must not loop): an explanation
    found as the 20th cause is used, one found as the 21st is not."""
    def chain(depth: int) -> BaseException:
        exc: BaseException = ConnectionRefusedError()
        for _ in range(depth):
            exc = OSError(exc)
        return exc

    assert describe(chain(19), Timeouts()).startswith("connection refused")
    assert describe(chain(20), Timeouts()).startswith("transfer failed")
