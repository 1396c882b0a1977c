"""What the box accepts from a server's HTTP headers (DESIGN 6: validator poisoning, hostile
headers): pure functions over header values, used by :mod:`opq_box_updater.fetcher`.

Anything a hostile server can put in a header ends as ``None`` (not stored, not used) or as
:class:`DownloadError` (exit 4), never as an unexpected exception (exit 1):

* **Validators** are kept only when RFC 9110-valid visible ASCII of at most
  :data:`MAX_VALIDATOR` bytes: an ``ETag`` (``"..."`` or ``W/"..."`` of etagc characters) and
  a ``Last-Modified`` HTTP-date. Everything else (obs-folded, NUL, 10 KB) would be stored in
  ``state.json`` and sent back on every later run, which requests refuses or servers answer
  400: the box would be locked out after the attacker is gone.
* **Content-Length** is ASCII digits (``str.isdigit`` also accepts ``²``), of a sane length.
* **Location** is visible ASCII and parses as an http(s) URL.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from typing import cast
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .config import Timeouts
from .errors import DownloadError, DownloadHTTPError
from .text import printable

MAX_VALIDATOR = 256  # bytes; a real ETag or HTTP-date is far shorter

_ETAG_RE = re.compile(r'(?:W/)?"[\x21\x23-\x7e]*"')
_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = "(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = "(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = "[0-2][0-9]:[0-5][0-9]:[0-6][0-9]"
_HTTP_DATE_RE = re.compile(
    f"{_DAY}, [0-3][0-9] {_MONTH} [0-9]{{4}} {_TIME} GMT"  # IMF-fixdate
    f"|{_LONG_DAY}, [0-3][0-9]-{_MONTH}-[0-9]{{2}} {_TIME} GMT"  # obsolete RFC 850
    f"|{_DAY} {_MONTH} [ 1-3][0-9] {_TIME} [0-9]{{4}}")  # obsolete asctime
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")  # below 10**18: int() can never fail
_VISIBLE_ASCII_RE = re.compile(r"[\x21-\x7e]+")


def valid_etag(value: str | None) -> str | None:
    """``value`` if it is an RFC 9110 entity-tag of visible ASCII and bounded length."""
    if value is None or len(value) > MAX_VALIDATOR or not _ETAG_RE.fullmatch(value):
        return None
    return value


def valid_last_modified(value: str | None) -> str | None:
    """``value`` if it is an RFC 9110 HTTP-date (any of its three forms)."""
    if value is None or len(value) > MAX_VALIDATOR or not _HTTP_DATE_RE.fullmatch(value):
        return None
    return value


def declared_length(url: str, resp: requests.Response) -> int | None:
    """The body length the server declared, or None (no Content-Length, or chunked, where
    RFC 9112 says Content-Length is ignored). Raises :class:`DownloadError` when it is not
    one number of ASCII digits (repeats of the same number are allowed, RFC 9110 8.6)."""
    if "Transfer-Encoding" in resp.headers:
        return None
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    values = {v.strip(" \t") for v in value.split(",")}
    if len(values) != 1 or not _CONTENT_LENGTH_RE.fullmatch(number := values.pop()):
        raise DownloadError(f"{url}: invalid Content-Length {value[:80]!r}")
    return int(number)


def redirect_target(url: str, current: str, location: str | None, status: int) -> str:
    """The absolute http(s) URL a redirect from ``current`` to ``location`` leads to, or
    :class:`DownloadError` (``url`` is the one the caller asked for, named in the error)."""
    if not location:
        raise DownloadError(f"{url}: redirect ({status}) without a Location")
    if len(location) > 8192 or not _VISIBLE_ASCII_RE.fullmatch(location):
        raise DownloadError(f"{url}: redirected to an invalid URL {location[:200]!r}")
    try:
        target = urljoin(current, location)
        parts = urlsplit(target)
        port = parts.port  # raises for a port that is no number or out of range
    except ValueError:
        raise DownloadError(f"{url}: redirected to an invalid URL {location[:200]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise DownloadError(f"{url}: redirected to a non-HTTP URL {target[:200]!r}")
    return target


def http_error(url: str, resp: requests.Response) -> DownloadHTTPError:
    reason = printable(" ".join(str(resp.reason or "").split())[:80])
    return DownloadHTTPError(f"{url}: server answered HTTP {resp.status_code} {reason}".rstrip(),
                             resp.status_code)


def describe(exc: BaseException, timeouts: Timeouts) -> str:
    """One line saying why a transfer failed, from the innermost cause that explains it."""
    causes: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(causes) < 20:
        current = todo.pop(0)
        if any(current is seen for seen in causes):
            continue
        causes.append(current)
        linked = [getattr(current, "reason", None), current.__cause__, current.__context__,
                  *current.args]
        todo.extend(e for e in linked if isinstance(e, BaseException))

    def has(*kinds: type[BaseException]) -> BaseException | None:
        return next((c for c in causes if isinstance(c, kinds)), None)

    if (cause := has(socket.gaierror)) is not None:
        return f"cannot resolve the host name ({cast(OSError, cause).strerror})"
    if has(ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if has(requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError):
        return f"no connection within {timeouts.connect:g}s (timeouts.connect)"
    if has(requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError):
        return f"no data for {timeouts.read:g}s (timeouts.read)"
    if (cause := has(ssl.SSLCertVerificationError)) is not None:
        why = cast(ssl.SSLCertVerificationError, cause).verify_message
        return f"TLS certificate verification failed ({why}; check ca_bundle)"
    if has(ConnectionResetError):
        return "connection reset by the server"
    if has(http.client.IncompleteRead, http.client.RemoteDisconnected):
        return "the server closed the connection early"
    text = printable(" ".join(str(exc).split()))
    return f"transfer failed ({text[:200]})" if text else f"transfer failed ({type(exc).__name__})"
