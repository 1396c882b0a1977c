"""HTTP for the box: the only module that touches the network (DESIGN 3.1 steps 2, 3 and 6).

Guarantees, whatever the server does:

* **Deadline.** ``timeouts.total`` seconds after a :class:`Fetcher` is built, all of its network
  activity stops with :class:`SlowRetrievalError`, keep-alive or not (the watchdog of
  :mod:`~opq_box_updater.deadline` shuts down every socket it opened). Every read also
  re-checks the clock.
* **Bounded size.** Metadata is read to at most ``max_bytes + 1`` bytes and a package to at most
  ``length + 1`` bytes, whatever Content-Length says or does not say; more is refused with
  :class:`LengthOrHashMismatchError` (the "endless data" attack). Nothing is buffered whole:
  packages stream to disk in :data:`CHUNK_SIZE` pieces and are hashed as they arrive.
* **Honest bodies.** A body shorter than its declared Content-Length is a
  :class:`DownloadError` (urllib3 1.26 does not check this). ``Accept-Encoding: identity`` is
  sent and bodies are read raw: the bytes hashed are the bytes served.
* **Resumable packages.** A partial download survives in ``<sha256>.part`` and is resumed
  with a Range request; a package only appears as ``<sha256>.zip`` once its length and
  SHA-256 match (not fsynced: every later use hashes it again). Neither file is ever opened
  through a link planted in the download directory (:mod:`~opq_box_updater.partfile`).
* **Hostile headers.** Only valid, bounded validators are returned and sent; an invalid
  Content-Length or Location is a :class:`DownloadError` (:mod:`~opq_box_updater.httpcheck`).

Every failure is one line naming the URL, from the :class:`DownloadError` family (exit 4) or
:class:`LengthOrHashMismatchError` (exit 3). This module imports only the standard library
and requests: the no-op check must stay as cheap as ``import requests`` (DESIGN 7).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import requests
import urllib3

from . import __version__
from .config import Timeouts, join_url
from .deadline import DeadlineAdapter, Watchdog
from .errors import DownloadError, LengthOrHashMismatchError, SlowRetrievalError
from .httpcheck import (
    declared_length,
    describe,
    http_error,
    redirect_target,
    valid_etag,
    valid_last_modified,
)
from .partfile import CHUNK_SIZE, HashingThread, Progress, commit, hash_file, open_part, zip_matches
from .source import MetadataResponse

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
REPORT_DEADLINE = 10.0  # seconds; a status report is never worth holding a run

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

# Errors a request or a body read can raise; all of them mean "the transfer failed".
_TRANSFER_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                    http.client.HTTPException, OSError)


class _ConditionalFailed(Exception):
    """A conditional request failed before its answer's body (``error``): retry without
    validators, which a hostile or broken server may have poisoned (issue 13, 1.2)."""

    def __init__(self, error: DownloadError) -> None:
        super().__init__(str(error))
        self.error = error


class _StartOver(Exception):
    """The partial file cannot be resumed (416, a wrong range, a bad prefix): delete it, retry."""


# --- the fetcher ----------------------------------------------------------------------------


class Fetcher:
    """Fetches metadata and packages from one repository, within one overall deadline.

    The deadline is ``time.monotonic() + timeouts.total`` at construction and bounds all
    network activity of this object; each connect and each socket read is also bounded by
    ``timeouts.connect`` / ``timeouts.read``. Use as a context manager, or call :meth:`close`.
    ``bytes_received`` counts the body bytes read so far (for benchmarks and logs).
    """

    def __init__(self, base_url: str, timeouts: Timeouts, *, ca_bundle: Path | None = None,
                 progress: bool | None = None,
                 user_agent: str = f"opq-box-updater/{__version__}") -> None:
        self.deadline = time.monotonic() + timeouts.total
        self.bytes_received = 0
        self._base_url = base_url
        self._timeouts = timeouts
        # Passed with every request: a session-level verify would lose to REQUESTS_CA_BUNDLE.
        self._verify: str | bool = str(ca_bundle) if ca_bundle is not None else True
        if progress is None:
            progress = sys.stderr is not None and sys.stderr.isatty()
        self._progress = progress
        self._watchdog = Watchdog(self.deadline)
        self._session = requests.Session()
        self._session.headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
        adapter = DeadlineAdapter(self._watchdog)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        """Close all connections; the fetcher must not be used afterwards."""
        self._session.close()
        self._watchdog.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- metadata ---------------------------------------------------------------------------

    def fetch_metadata(self, relpath: str, max_bytes: int = 65536, *, etag: str | None = None,
                       last_modified: str | None = None) -> MetadataResponse:
        """GET ``relpath``, conditionally when a validator is given.

        Returns a 200 with at most ``max_bytes`` bytes, or a 304; its validators are valid
        (:mod:`~opq_box_updater.httpcheck`) or None. Validators that are not valid (stored by
        an older version) are never sent: the request is then unconditional, so the caller
        stores fresh ones. A conditional request that fails or is answered with an error
        status is retried once without validators. Raises
        :class:`LengthOrHashMismatchError` when Content-Length or the body exceeds
        ``max_bytes`` (no more than ``max_bytes + 1`` bytes are ever read),
        :class:`DownloadHTTPError` for any other status, :class:`SlowRetrievalError` past the
        deadline and :class:`DownloadError` for every other transfer failure, including a body
        shorter than its Content-Length.
        """
        url = join_url(self._base_url, relpath)
        headers: dict[str, str] = {}
        if etag is not None or last_modified is not None:
            if valid_etag(etag) != etag or valid_last_modified(last_modified) != last_modified:
                logger.warning("%s: stored validators are not valid HTTP; asking without them",
                               url)
            else:
                headers = {name: value for name, value in (("If-None-Match", etag),
                                                           ("If-Modified-Since", last_modified))
                           if value is not None}
        with self._watchdog.armed():
            if headers:
                try:
                    return self._metadata(url, headers, max_bytes)
                except _ConditionalFailed as failed:
                    logger.warning("%s; asking again without validators", failed.error)
            return self._metadata(url, {}, max_bytes)

    def _metadata(self, url: str, headers: dict[str, str], max_bytes: int) -> MetadataResponse:
        """One GET for :meth:`fetch_metadata`. When ``headers`` are conditional, a failure
        before a 200 or 304 status line arrives raises :class:`_ConditionalFailed`."""
        answered = False
        try:
            with self._get(url, headers) as resp:
                if resp.status_code == 304 and headers:
                    return MetadataResponse(
                        304, None, valid_etag(resp.headers.get("ETag")) or headers.get(
                            "If-None-Match"),
                        valid_last_modified(resp.headers.get("Last-Modified")) or headers.get(
                            "If-Modified-Since"))
                if resp.status_code != 200:
                    raise http_error(url, resp)
                answered = True
                return _metadata_body(self._read, url, resp, max_bytes)
        except DownloadError as exc:
            if headers and not answered and not isinstance(exc, SlowRetrievalError):
                raise _ConditionalFailed(exc) from exc
            raise

    # --- packages ---------------------------------------------------------------------------

    def fetch_package(self, relpath: str, dest_dir: Path, sha256: str, length: int) -> Path:
        """Download ``relpath`` into ``dest_dir/<sha256>.zip`` and return that path.

        The file exists only if its length and SHA-256 match; an existing one that matches is
        returned without any request. The download goes to ``<sha256>.part`` and resumes it
        when present. A transfer that ends early (:class:`DownloadError`,
        :class:`SlowRetrievalError`) keeps the ``.part`` for the next run; a response that
        declares or delivers more than ``length`` bytes, or wrong bytes, deletes it and raises
        :class:`LengthOrHashMismatchError`.
        """
        if not _SHA256_RE.fullmatch(sha256):
            raise ValueError(f"not a lowercase hex SHA-256: {sha256!r}")
        if length < 0:
            raise ValueError(f"negative package length: {length}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / f"{sha256}.zip"
        part = dest_dir / f"{sha256}.part"
        found = final.is_symlink() or final.exists()
        if zip_matches(final, sha256, length):
            logger.info("%s already downloaded and verified", final)
            return final
        if found:
            logger.warning("%s does not match its signed hash; downloading it again", final)
        url = join_url(self._base_url, relpath)
        with self._watchdog.armed():
            try:
                return self._download(url, part, final, sha256, length)
            except _StartOver as why:
                logger.warning("%s: %s; starting the download over", url, why)
                part.unlink(missing_ok=True)
            try:
                return self._download(url, part, final, sha256, length)
            except _StartOver as why:
                raise DownloadError(f"{url}: {why}") from None

    def _download(self, url: str, part: Path, final: Path, sha256: str, length: int) -> Path:
        """One attempt: resume or start ``part``, verify, rename to ``final``. Raises
        :class:`_StartOver` when the partial file turns out to be unusable."""
        hasher = hashlib.sha256()
        with open_part(part) as out:
            offset = os.fstat(out.fileno()).st_size
            if offset > length:
                raise _StartOver(f"partial file has {offset} bytes, more than the {length} "
                                 "signed")
            if offset:
                hash_file(out, hasher)
                if offset == length:
                    # A previous run got every byte but did not rename (crash, timeout on the
                    # one-byte-past check): no request needed.
                    if hasher.hexdigest() != sha256:
                        raise _StartOver("partial file is complete but its SHA-256 is wrong")
                    return commit(part, final)
                logger.info("%s: resuming at byte %d of %d", url, offset, length)
            try:
                with self._get(url, {"Range": f"bytes={offset}-"} if offset else {}) as resp:
                    self._receive(url, resp, out, part, hasher, offset, sha256, length)
            except BaseException:
                if out.tell() == 0:  # nothing to resume: leave no empty .part behind
                    part.unlink(missing_ok=True)
                raise
        return commit(part, final)

    def _receive(self, url: str, resp: requests.Response, out: IO[bytes], part: Path,
                 hasher: Any, offset: int, sha256: str, length: int) -> None:
        """Check the answer to a package request and write its body after ``offset`` bytes
        of ``out``; returns only when ``out`` then holds the whole package."""
        if offset and resp.status_code == 416:
            raise _StartOver("server refused to resume (416 Range Not Satisfiable)")
        if offset and resp.status_code == 206:
            _check_content_range(url, resp, offset, length, part)
        elif resp.status_code == 200:
            offset, hasher = 0, hashlib.sha256()  # no Range support: start over
            out.seek(0)
            out.truncate()
        else:
            raise http_error(url, resp)
        remaining = length - offset
        declared = declared_length(url, resp)
        if declared is not None and declared > remaining:
            part.unlink(missing_ok=True)
            raise LengthOrHashMismatchError(
                f"{url}: declares {declared} bytes, more than the {remaining} expected")
        received = _stream(self._read, url, resp, out, hasher, offset, length,
                           self._progress)
        if received > remaining:
            part.unlink()
            raise LengthOrHashMismatchError(
                f"{url}: delivers more than the signed length of {length} bytes")
        if declared is not None and received < declared:
            raise DownloadError(
                f"{url}: connection closed after {offset + received} of {length} bytes"
                " (the next run resumes)")
        if received < remaining:
            raise DownloadError(
                f"{url}: transfer ended after {offset + received} of {length} bytes"
                " (the next run resumes)")
        if hasher.hexdigest() != sha256:
            if offset:
                # The old prefix may be the bad part (a crash, an earlier broken server):
                # one fresh download decides.
                raise _StartOver("SHA-256 mismatch after resuming")
            part.unlink()
            raise LengthOrHashMismatchError(
                f"{url}: SHA-256 mismatch (got {hasher.hexdigest()}, signed {sha256})")

    # --- status reports ---------------------------------------------------------------------

    def post_json(self, url: str, payload: Mapping[str, Any]) -> None:
        """POST ``payload`` as JSON to the absolute ``url``; the response body is not read.
        Raises :class:`DownloadHTTPError` for a non-2xx answer (redirects are not followed)
        and the rest of the DownloadError family like the fetches."""
        body = json.dumps(payload, sort_keys=True).encode("utf-8")
        with self._watchdog.armed():
            resp = self._send(url, url, {"Content-Type": "application/json"}, "POST", body)
            with contextlib.closing(resp):
                if not 200 <= resp.status_code < 300:
                    raise http_error(url, resp)

    # --- HTTP plumbing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _get(self, url: str, headers: dict[str, str]) -> Iterator[requests.Response]:
        """A streamed GET of ``url`` with redirects followed by hand (at most
        :data:`MAX_REDIRECTS`, never reading a redirect's body: requests would read it whole,
        however long); the response is closed on exit."""
        target = url
        for _hop in range(MAX_REDIRECTS + 1):
            resp = self._send(url, target, headers)
            if resp.status_code not in REDIRECT_STATUSES:
                break
            resp.close()
            target = redirect_target(url, target, resp.headers.get("Location"),
                                     resp.status_code)
            logger.debug("%s: redirected to %s", url, target)
        else:
            raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)")
        try:
            yield resp
        finally:
            resp.close()

    def _send(self, url: str, target: str, headers: dict[str, str], method: str = "GET",
              data: bytes | None = None) -> requests.Response:
        """Send one request (no redirects); translate every failure into the DownloadError
        family."""
        remaining = self._watchdog.remaining()
        if remaining <= 0:
            raise self._slow(url)
        timeout = (min(self._timeouts.connect, remaining), min(self._timeouts.read, remaining))
        logger.debug("%s %s %s", method, target, headers)
        try:
            resp = self._session.request(method, target, headers=headers, data=data,
                                         stream=True, timeout=timeout, verify=self._verify,
                                         allow_redirects=False)
        except (*_TRANSFER_ERRORS, ValueError) as exc:  # ValueError: a URL requests refuses
            raise self._transfer_error(url, exc) from exc
        if self._watchdog.expired():  # the watchdog may have cut the headers short
            resp.close()
            raise self._slow(url)
        return resp

    def _read(self, url: str, resp: requests.Response, size: int) -> bytes:
        """Read up to ``size`` raw body bytes (b"" at the end); fails past the deadline.

        Bytes that arrived before the deadline are still returned (so a package keeps them in
        its ``.part``); the next call raises.
        """
        if self._watchdog.expired():
            raise self._slow(url)
        try:
            data = resp.raw.read(size, decode_content=False) or b""
        except _TRANSFER_ERRORS as exc:
            raise self._transfer_error(url, exc) from exc
        self.bytes_received += len(data)
        if not data and self._watchdog.expired():  # the watchdog's shutdown looks like an EOF
            raise self._slow(url)
        return data

    def _slow(self, url: str) -> SlowRetrievalError:
        return SlowRetrievalError(
            f"{url}: gave up, the overall deadline of {self._timeouts.total:g}s"
            " (timeouts.total) passed")

    def _transfer_error(self, url: str, exc: BaseException) -> DownloadError:
        if self._watchdog.expired():
            return self._slow(url)
        return DownloadError(f"{url}: {describe(exc, self._timeouts)}")


def post_report(url: str, payload: Mapping[str, Any], timeouts: Timeouts, *,
                ca_bundle: Path | None = None) -> bool:
    """Send a run's result to ``report_url`` (DESIGN 3.5); best effort, it never raises.

    Bounded by ``timeouts`` and at most :data:`REPORT_DEADLINE` seconds in all, so an
    unreachable collector cannot hold the box. Returns whether the server accepted it (2xx);
    a failure is logged as a warning and changes nothing else.
    """
    limits = Timeouts(connect=timeouts.connect, read=timeouts.read,
                      total=min(timeouts.total, REPORT_DEADLINE))
    try:
        with Fetcher(url, limits, ca_bundle=ca_bundle, progress=False) as fetcher:
            fetcher.post_json(url, payload)
    except (DownloadError, TypeError, ValueError) as exc:  # TypeError: payload not JSON
        logger.warning("status report not sent: %s", exc)
        return False
    return True


# --- helpers --------------------------------------------------------------------------------


def _metadata_body(read: Callable[[str, requests.Response, int], bytes], url: str,
                   resp: requests.Response, max_bytes: int) -> MetadataResponse:
    """Read a 200's body with ``read`` (the fetcher's deadline-bound read), at most
    ``max_bytes`` bytes (one more to find out)."""
    declared = declared_length(url, resp)
    if declared is not None and declared > max_bytes:
        raise LengthOrHashMismatchError(
            f"{url}: declares {declared} bytes, more than the limit of {max_bytes}")
    body = bytearray()
    while len(body) <= max_bytes:
        chunk = read(url, resp, min(CHUNK_SIZE, max_bytes + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > max_bytes:
        raise LengthOrHashMismatchError(
            f"{url}: more than {max_bytes} bytes (endless data?); refused")
    if declared is not None and len(body) < declared:
        raise DownloadError(
            f"{url}: connection closed after {len(body)} of {declared} bytes")
    return MetadataResponse(200, bytes(body), valid_etag(resp.headers.get("ETag")),
                            valid_last_modified(resp.headers.get("Last-Modified")))


def _stream(read: Callable[[str, requests.Response, int], bytes], url: str,
            resp: requests.Response, out: Any, hasher: Any, offset: int, length: int,
            progress: bool) -> int:
    """Copy the body into ``out`` and ``hasher`` with ``read`` (the fetcher's deadline-bound
    read); return the body bytes received.

    Reads at most one byte past ``length - offset`` (that byte is not written), so the
    caller can tell "exactly right" from "too long" without ever reading more.
    """
    limit = length - offset + 1
    received = 0
    bar = Progress(length) if progress else None
    background = HashingThread(hasher)
    try:
        while received < limit:
            chunk = read(url, resp, min(CHUNK_SIZE, limit - received))
            if not chunk:
                break
            received += len(chunk)
            if received == limit:
                chunk = chunk[:-1]
            out.write(chunk)
            background.update(chunk)
            if bar:
                bar.update(offset + min(received, limit - 1))
    finally:
        background.close()  # on return the hasher has seen every byte written
        if bar:
            bar.finish(offset + min(received, limit - 1))
    return received


def _check_content_range(url: str, resp: requests.Response, offset: int, length: int,
                         part: Path) -> None:
    """Accept a 206 only if it continues exactly at ``offset`` of a ``length``-byte file."""
    header = resp.headers.get("Content-Range", "")
    match = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if not match or int(match.group(1)) != offset:
        raise _StartOver(f"server answered the wrong range ({header!r}, asked from {offset})")
    total = match.group(3)
    if total != "*" and int(total) != length:
        part.unlink(missing_ok=True)
        raise LengthOrHashMismatchError(
            f"{url}: server's file has {total} bytes, the release says {length}")
