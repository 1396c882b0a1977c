"""``opq-box-publish serve`` and ``fleet``: a development server and the fleet table.

The server serves a repository as static files the way nginx would for the box: strong
ETag and Last-Modified, 304 for ``If-None-Match`` / ``If-Modified-Since``, one byte range
(206, or 416 when unsatisfiable, honouring ``If-Range``), HEAD. It never lists directories
and never serves anything outside the repository (``..``, symlinks pointing out) nor any
dotfile or file below a dot-directory (temp files, ``.reports``). Files are streamed, so a
1 GiB package costs no memory.

``POST /report`` takes a box's report through the collector's own code
(:func:`.reports.receive`: the same bounds, signature checks, rate limit and store), and
also takes unsigned reports, stored as such, for the demo and old boxes. The store is the
repository's default (``REPO/.reports/reports.db``, SQLite; see :mod:`.store`) or the one
``--db`` names; ``fleet`` prints it as a table. The production collector is
``collector.py`` under gunicorn.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast
from urllib.parse import unquote, urlsplit

from ..fsutil import utcnow
from ..text import printable
from .common import CHUNK, PublishError
from .reports import REPORT_MAX_BYTES, RateLimiter, receive
from .store import open_repo_store

#: Connections served at once; more are closed at once, so half-open connections cannot
#: make the server start unbounded threads (each holds one for up to ``timeout`` seconds).
MAX_CONNECTIONS = 64
DEFAULT_PORT = 8151
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_TYPES = {".json": "application/json", ".zip": "application/zip",
          ".deb": "application/vnd.debian.binary-package"}


class RepoServer(ThreadingHTTPServer):
    """A threaded server for one repository; request threads never block shutdown."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], repo: Path,
                 clock: Callable[[], datetime] = utcnow, log: TextIO | None = None,
                 max_connections: int = MAX_CONNECTIONS, store_url: str | None = None) -> None:
        self.repo = repo.resolve()
        self.clock = clock
        self.log = log
        self.store = open_repo_store(self.repo, store_url)
        self.limiter = RateLimiter()
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, RepoHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread only when a slot is free; otherwise close the connection now."""
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class RepoServer6(RepoServer):
    address_family = socket.AF_INET6


def make_server(repo: Path, bind: str = "127.0.0.1", port: int = DEFAULT_PORT,
                log: TextIO | None = None, store_url: str | None = None) -> RepoServer:
    """A bound server for ``repo`` (``port`` 0 picks a free port: see ``server_address``)."""
    if not repo.is_dir():
        raise PublishError(f"{repo} is not a directory")
    cls = RepoServer6 if ":" in bind else RepoServer
    try:
        return cls((bind, port), repo, log=log, store_url=store_url)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PublishError(f"cannot listen on {bind} port {port}: {reason}") from None


def server_url(server: RepoServer) -> str:
    host, port = server.server_address[:2]
    host = str(host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(repo: Path, bind: str = "127.0.0.1", port: int = DEFAULT_PORT,
          out: TextIO = sys.stdout, store_url: str | None = None) -> None:
    """Serve until interrupted; line 1 of ``out`` is ``serving REPO on URL`` (flushed)."""
    server = make_server(repo, bind, port, store_url=store_url)
    print(f"serving {repo} on {server_url(server)}", file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class RepoHandler(BaseHTTPRequestHandler):
    """Static files of the repository plus ``POST /report``."""

    protocol_version = "HTTP/1.1"
    server_version = "opq-box-publish"
    timeout = 30  # a client that stalls mid-request does not hold a thread forever

    @property
    def repo_server(self) -> RepoServer:
        return cast(RepoServer, self.server)

    # --- logging: exactly one line per request ---------------------------------------------

    def handle_one_request(self) -> None:
        # The status is remembered by log_request and the line written once the response is
        # complete, so it can carry the body length; a closed idle connection logs nothing.
        self._status: int | str | None = None
        self._sent: int | str = "-"
        super().handle_one_request()
        if self._status is not None:
            stream = self.repo_server.log or sys.stderr
            stream.write(f'{self.client_address[0]} "{printable(self.requestline)}" '
                         f"{self._status} {self._sent}\n")
            stream.flush()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = code.value if isinstance(code, HTTPStatus) else code

    def log_error(self, format: str, *args: Any) -> None:
        pass  # send_error() also calls log_request, which records the status

    def log_message(self, format: str, *args: Any) -> None:
        pass  # everything worth logging goes through handle_one_request

    # --- GET / HEAD ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve_file(head=False)

    def do_HEAD(self) -> None:
        self._serve_file(head=True)

    def _resolve(self) -> Path | None:
        """The regular file the request names inside the repository, or None (404)."""
        path = unquote(urlsplit(self.path).path)
        if "\x00" in path or "\\" in path:
            return None
        parts = [p for p in path.split("/") if p]
        # A leading dot covers ".", "..", dotfiles, dot-directories and our temp files.
        if not parts or any(p.startswith(".") for p in parts):
            return None
        root = self.repo_server.repo
        real = Path(os.path.realpath(root.joinpath(*parts)))
        if not real.is_relative_to(root) or real == root:
            return None  # a symlink pointing out of the repository
        if any(p.startswith(".") for p in real.relative_to(root).parts):
            return None  # a symlink pointing at a dotfile
        return real

    def _serve_file(self, head: bool) -> None:
        target = self._resolve()
        try:
            # O_NONBLOCK: opening a FIFO planted in the repository must not wait for a writer
            # (it used to block the thread forever); the type is checked right after.
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if target else -1
            handle = os.fdopen(fd, "rb") if fd >= 0 else None
        except OSError:
            handle = None
        if handle is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            os.set_blocking(handle.fileno(), True)
            self._respond(handle, st, head, cast(Path, target).suffix)

    def _respond(self, handle: BinaryIO, st: os.stat_result, head: bool, suffix: str) -> None:
        # Strong validator: a replaced file (os.replace) has a new inode and mtime.
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"'
        last_modified = formatdate(st.st_mtime, usegmt=True)
        validators = {"ETag": etag, "Last-Modified": last_modified}
        if self._not_modified(etag, int(st.st_mtime)):
            self._send_head(HTTPStatus.NOT_MODIFIED, validators, None)
            return
        size = st.st_size
        start, length, status = 0, size, HTTPStatus.OK
        headers = {**validators, "Accept-Ranges": "bytes",
                   "Content-Type": _TYPES.get(suffix, "application/octet-stream")}
        if "Range" in self.headers and self._if_range_holds(etag, int(st.st_mtime)):
            try:
                wanted = parse_range(self.headers["Range"], size)
            except RangeNotSatisfiableError:
                headers["Content-Range"] = f"bytes */{size}"
                self._send_head(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, headers, 0)
                return
            if wanted is not None:
                start, end = wanted
                length, status = end - start + 1, HTTPStatus.PARTIAL_CONTENT
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send_head(status, headers, length)
        if not head:
            handle.seek(start)
            _copy(handle, self.wfile, length)

    def _send_head(self, status: HTTPStatus, headers: dict[str, str],
                   length: int | None) -> None:
        self.send_response(status, None)
        for name, value in headers.items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
            self._sent = 0 if self.command == "HEAD" else length
        self.end_headers()

    def _not_modified(self, etag: str, mtime: int) -> bool:
        """RFC 9110 13.2.2: If-None-Match (weak comparison) wins over If-Modified-Since."""
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            tags = [t.strip().removeprefix("W/") for t in inm.split(",")]
            return "*" in tags or etag in tags
        ims = self.headers.get("If-Modified-Since")
        if ims is None:
            return False
        try:
            since = parsedate_to_datetime(ims)
        except (TypeError, ValueError, IndexError):
            return False
        return since.tzinfo is not None and mtime <= int(since.timestamp())

    def _if_range_holds(self, etag: str, mtime: int) -> bool:
        """If-Range: apply the range only when the validator still matches (strongly)."""
        value = self.headers.get("If-Range")
        if value is None:
            return True
        value = value.strip()
        if value.startswith(('"', "W/")):
            return value == etag
        try:
            return int(parsedate_to_datetime(value).timestamp()) == mtime
        except (TypeError, ValueError, IndexError):
            return False

    # --- POST /report ----------------------------------------------------------------------

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/report":
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.send_error(HTTPStatus.LENGTH_REQUIRED)
            return
        if not raw_length.isdigit():
            self.send_error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return
        if int(raw_length) > REPORT_MAX_BYTES:
            self.close_connection = True  # the body is not read: the connection is unusable
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"reports are limited to {REPORT_MAX_BYTES} bytes")
            return
        body = self.rfile.read(int(raw_length))
        server = self.repo_server
        try:
            answer = receive(server.store, body, self.client_address[0], server.clock(),
                             server.limiter, allow_unsigned=True)
        except PublishError as exc:  # the store failed (disk full, database down)
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, printable(str(exc)))
            return
        if answer.status == HTTPStatus.NO_CONTENT:
            self._send_head(HTTPStatus.NO_CONTENT, {}, None)  # 204 carries no Content-Length
        else:
            self.send_error(answer.status, printable(answer.message))


class RangeNotSatisfiableError(ValueError):
    """The range starts past the end of the file (answered 416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (first, last) inclusive, or None when the header is to be
    ignored (malformed, or several ranges: the whole file is served, as RFC 9110 allows).
    Raises :class:`RangeNotSatisfiableError` for a range past the end (416)."""
    match = _RANGE.fullmatch(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix: the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise RangeNotSatisfiableError(header)
        return max(0, size - count), size - 1
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiableError(header)
    return start, size - 1 if last == "" else min(int(last), size - 1)


def _copy(src: BinaryIO, dst: Any, length: int) -> None:
    remaining = length
    while remaining > 0:
        chunk = src.read(min(CHUNK, remaining))
        if not chunk:
            break  # the file shrank under us; the client sees a short body
        dst.write(chunk)
        remaining -= len(chunk)


