"""A fault-injecting static HTTP server for tests (no network beyond 127.0.0.1).

It serves the files under a directory like a well-behaved static server (ETag, Last-Modified,
304 for If-None-Match / If-Modified-Since, single Range requests with 206 / 416, If-Range),
and a test can make any path misbehave with a :class:`Fault`::

    with FaultServer(repo_dir) as server:
        server.set_fault("/packages/x.zip", Fault(truncate_after=1000, times=1))
        ...  # server.url is "http://127.0.0.1:<port>"
        assert server.log[-1].headers["Range"] == "bytes=1000-"

Every answered request is appended to :attr:`FaultServer.log` as a :class:`LoggedRequest`
(method, path, headers, status, body bytes sent), also when the client went away mid-body.
POST bodies (status reports) are kept in :attr:`FaultServer.posted` and answered 204 (or the
path's ``Fault.status``). Pass an ``ssl.SSLContext`` to serve HTTPS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import ipaddress
import socket
import ssl
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024


@dataclass
class Fault:
    """How to misbehave on one path. Fields combine where that makes sense."""

    status: int | None = None  # answer this status (404, 500, ...) with a short body
    reason: str | None = None  # the status line's reason phrase, raw (default: the standard)
    delay: float = 0.0  # sleep this long before answering (read-timeout tests)
    trickle: float | None = None  # send the body one byte every `trickle` seconds
    trickle_headers: bool = False  # with `trickle`: the status line and headers too
    reset_after: int | None = None  # send this many body bytes, then a TCP RST
    truncate_after: int | None = None  # declare the full length, send this many bytes, FIN
    content_length: int | None = None  # declare this Content-Length, whatever is sent
    body: bytes | None = None  # serve these bytes instead of the file (no validators)
    endless: bool = False  # stream b"x" forever, no Content-Length
    redirect_to: str | None = None  # 302 to this URL or path
    redirect_loop: bool = False  # 302 to the same path, forever
    ignore_range: bool = False  # answer 200 with the whole file to Range requests
    connection_close: bool = False  # answer with `Connection: close` (the socket goes with
    #                                 the response in http.client: the deadline's hard case)
    http10: bool = False  # answer as an HTTP/1.0 server (no keep-alive either)
    headers: Mapping[str, str | None] | None = None  # set or replace these response headers,
    #                                            raw; None drops one (Content-Length: None
    #                                            with connection_close: a close-delimited body)
    times: int | None = None  # misbehave for the first `times` requests only (None: always)


class LoggedRequest(NamedTuple):
    """One answered request; ``bytes_sent`` counts body bytes only."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    bytes_sent: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a trickling handler must never keep the test process alive
    owner: FaultServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body is the point of most tests: no tracebacks


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _status = 0  # what the log records for this request
    _sent = 0
    _trickle_headers: float | None = None  # seconds per header byte, or None
    _fault: Fault | None = None  # the fault of the request being answered
    _headers_buffer: list[bytes]  # http.server's own buffer of the status line and headers

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            # Handshake here, in this request's thread, not in the accept loop.
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)

    def do_GET(self) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        self._status, self._sent, self._trickle_headers, self._fault = 0, 0, None, None
        seq = owner.begin()
        try:
            if not self._refuse_bad_headers():
                self._answer(path, self._take(path))
        except OSError:
            self.close_connection = True  # the client went away (or we reset it)
        finally:
            owner.record(seq, LoggedRequest(self.command, path, dict(self.headers.items()),
                                            self._status, self._sent))

    def do_POST(self) -> None:
        """Store the body in :attr:`FaultServer.posted`; answer 204 or the fault's status."""
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        self._status, self._sent, self._trickle_headers, self._fault = 0, 0, None, None
        seq = owner.begin()
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            owner.posted.append((path, body))
            fault = self._take(path)
            if fault.delay and owner.stopping.wait(fault.delay):
                return
            if fault.trickle_headers:
                self._trickle_headers = fault.trickle
            self._head(fault.status or 204, {"Content-Length": "0"})
        except OSError:
            self.close_connection = True
        finally:
            owner.record(seq, LoggedRequest(self.command, path, dict(self.headers.items()),
                                            self._status, self._sent))

    def _refuse_bad_headers(self) -> bool:
        """Answer 400 to a request header nginx refuses (a NUL, a line above 8 KiB), as a
        real server in front of a box would; True if it did."""
        if all("\x00" not in value and len(name) + len(value) < 8190
               for name, value in self.headers.items()):
            return False
        self.close_connection = True
        self._head(400, {"Content-Length": "0", "Connection": "close"})
        return True

    def _take(self, path: str) -> Fault:
        """This request's fault; sets up the protocol version it asks for."""
        self._fault = fault = self.server.owner.take_fault(path)
        self.protocol_version = "HTTP/1.0" if fault.http10 else "HTTP/1.1"
        if fault.http10 or fault.connection_close:
            self.close_connection = True
        return fault

    def _answer(self, path: str, fault: Fault) -> None:
        if fault.delay and self.server.owner.stopping.wait(fault.delay):
            return
        if fault.trickle_headers:
            self._trickle_headers = fault.trickle
        if fault.redirect_to is not None or fault.redirect_loop:
            self._head(302, {"Location": fault.redirect_to or path, "Content-Length": "0"})
            return
        if fault.status is not None:
            body = f"fault: {fault.status}\n".encode()
            self._head(fault.status, {"Content-Length": str(len(body))})
            self._send(iter([body]), fault)
            return
        if fault.endless:
            self.close_connection = True
            self._head(200, {"Connection": "close"})
            self._send(self._endless(), fault)
            return
        if fault.body is not None:
            self._serve(fault, fault.body, len(fault.body), {})
            return
        file = self.server.owner.root / path.lstrip("/")
        if ".." in Path(path).parts or not file.is_file():
            self._head(404, {"Content-Length": "0"})
            return
        stat = file.stat()
        validators = {"ETag": f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"',
                      "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True)}
        if self._not_modified(validators, int(stat.st_mtime)):
            self._head(304, validators)
            return
        self._serve(fault, file, stat.st_size, validators)

    def _not_modified(self, validators: dict[str, str], mtime: int) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm is not None:  # RFC 9110: If-Modified-Since is ignored when this is present
            return inm.strip() == "*" or validators["ETag"] in [t.strip() for t in inm.split(",")]
        ims = self.headers.get("If-Modified-Since")
        if ims is None:
            return False
        try:
            return mtime <= int(email.utils.parsedate_to_datetime(ims).timestamp())
        except (TypeError, ValueError):
            return False

    def _serve(self, fault: Fault, source: Path | bytes, size: int,
               validators: dict[str, str]) -> None:
        """Answer 200, 206 or 416 for ``source`` (a file or bytes) of ``size`` bytes."""
        start, status, headers = 0, 200, dict(validators)
        wanted = self._range(size, validators) if not fault.ignore_range else None
        if wanted == (-1, -1):
            self._head(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            return
        end = size
        if wanted is not None:
            start, end = wanted
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        declared = fault.content_length if fault.content_length is not None else end - start
        headers["Content-Length"] = str(declared)
        if declared != end - start or fault.truncate_after is not None:
            self.close_connection = True  # the byte stream is out of step: never reuse it
        self._head(status, headers)
        self._send(self._chunks(source, start, end), fault)

    def _range(self, size: int, validators: dict[str, str]) -> tuple[int, int] | None:
        """(start, end) of a satisfiable single ``Range``, (-1, -1) if unsatisfiable, None
        for a whole-file answer (no Range, a multi-range, or a stale If-Range)."""
        header = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if not header.startswith("bytes=") or "," in header:
            return None
        if if_range is not None and if_range not in validators.values():
            return None
        first, _, last = header[len("bytes="):].partition("-")
        try:
            if not first:  # suffix range: the last N bytes
                return (max(size - int(last), 0), size) if int(last) > 0 else (-1, -1)
            start = int(first)
            end = min(int(last) + 1, size) if last else size
        except ValueError:
            return None
        return (start, end) if start < size and start < end else (-1, -1)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        fault = self._fault or Fault()
        headers = {name: value for name, value in {**headers, **(fault.headers or {})}.items()
                   if value is not None}
        if fault.connection_close:
            headers["Connection"] = "close"
        self.send_response(status, fault.reason)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def flush_headers(self) -> None:
        # http.server buffers the status line and headers until end_headers() calls this.
        data = b"".join(getattr(self, "_headers_buffer", []))
        self._headers_buffer = []
        if self._trickle_headers is None:
            self.wfile.write(data)
            return
        for i in range(len(data)):
            if self.server.owner.stopping.wait(self._trickle_headers):
                raise ConnectionAbortedError("server stopping")
            self.wfile.write(data[i:i + 1])

    def _send(self, chunks: Iterator[bytes], fault: Fault) -> None:
        """Write the body, applying trickle, truncation and reset."""
        stop = self.server.owner.stopping
        limits = [n for n in (fault.reset_after, fault.truncate_after) if n is not None]
        limit = min(limits) if limits else None
        for chunk in chunks:
            if limit is not None:
                chunk = chunk[:limit - self._sent]
            if fault.trickle is not None:
                for i in range(len(chunk)):
                    if stop.wait(fault.trickle):
                        return
                    self.wfile.write(chunk[i:i + 1])
                    self._sent += 1
            else:
                self.wfile.write(chunk)
                self._sent += len(chunk)
            if (limit is not None and self._sent >= limit) or stop.is_set():
                break
        if fault.reset_after is not None and self._sent >= fault.reset_after:
            # Give loopback a moment to deliver what was sent, then close with SO_LINGER 0:
            # the kernel answers with RST instead of FIN ("connection reset by peer").
            stop.wait(0.1)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif fault.truncate_after is not None:
            self.close_connection = True  # FIN after a short body

    def _chunks(self, source: Path | bytes, start: int, end: int) -> Iterator[bytes]:
        if isinstance(source, bytes):
            for pos in range(start, end, CHUNK):
                yield source[pos:min(pos + CHUNK, end)]
            return
        with source.open("rb") as f:  # streamed: big packages keep the server's memory flat
            f.seek(start)
            pos = start
            while pos < end and (chunk := f.read(min(CHUNK, end - pos))):
                pos += len(chunk)
                yield chunk

    def _endless(self) -> Iterator[bytes]:
        block = b"x" * CHUNK
        while not self.server.owner.stopping.is_set():
            yield block


class FaultServer:
    """A threaded HTTP(S) server on 127.0.0.1 with an ephemeral port serving ``root``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Faults are keyed by URL
    path (``"/version.json"``); they and the log are safe to use from the test's thread.
    """

    settle = 2.0

    def __init__(self, root: Path, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.root = root
        self.stopping = threading.Event()
        self._ssl_context = ssl_context
        self._lock = threading.Condition()
        self._active = 0  # requests being answered right now
        self._faults: dict[str, Fault] = {}
        self._log: list[tuple[int, LoggedRequest]] = []  # (order of arrival, request)
        self._arrived = 0
        self.posted: list[tuple[str, bytes]] = []  # (path, body) of every POST
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        if self._httpd is None:
            raise RuntimeError("FaultServer is not started")
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def log(self) -> list[LoggedRequest]:
        """The requests answered so far, oldest first.

        A client can see the end of a response before its handler has logged it, so this
        first waits (at most :attr:`settle` seconds) until no request is being answered.
        """
        with self._lock:
            self._lock.wait_for(lambda: self._active == 0, timeout=self.settle)
            return [entry for _, entry in sorted(self._log, key=lambda pair: pair[0])]

    def requests_for(self, path: str) -> list[LoggedRequest]:
        """The logged requests for one URL path."""
        return [r for r in self.log if r.path == _norm(path)]

    def set_fault(self, path: str, fault: Fault | None) -> None:
        """Make ``path`` misbehave (``None``: behave again)."""
        with self._lock:
            if fault is None:
                self._faults.pop(_norm(path), None)
            else:  # a copy: `times` counts down here, not in the test's object
                self._faults[_norm(path)] = dataclasses.replace(fault)

    def clear_faults(self) -> None:
        """Every path behaves again."""
        with self._lock:
            self._faults.clear()

    def clear_log(self) -> None:
        """Forget the requests answered so far (once none is being answered)."""
        with self._lock:
            self._lock.wait_for(lambda: self._active == 0, timeout=self.settle)
            self._log.clear()

    def take_fault(self, path: str) -> Fault:
        """The fault for one request to ``path`` (a harmless one if none); counts ``times``."""
        with self._lock:
            fault = self._faults.get(path)
            if fault is None:
                return Fault()
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[path]
            return fault

    def begin(self) -> int:
        """A handler starts answering a request (see :attr:`log`); returns its place in the
        order of arrival. The log is kept in that order, not in the order handlers finish:
        a client's next request can be answered before the handler of its previous one has
        logged it (one CI run saw a retry logged before the 400 it followed)."""
        with self._lock:
            self._active += 1
            self._arrived += 1
            return self._arrived

    def record(self, seq: int, entry: LoggedRequest) -> None:
        """A handler has finished answering request number ``seq``."""
        with self._lock:
            self._log.append((seq, entry))
            self._active -= 1
            self._lock.notify_all()

    def start(self) -> FaultServer:
        self.stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        if self._ssl_context is not None:
            self._httpd.socket = self._ssl_context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; trickling and endless handlers end within a moment."""
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _norm(path: str) -> str:
    return "/" + path.lstrip("/")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key into ``directory``; return
    their paths (cert, key). cryptography is imported here only: test-only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class TrickleProxy:
    """A TCP proxy on 127.0.0.1 that passes the client's bytes on at once and the server's
    back one byte every ``delay`` seconds: a slow link under everything, the TLS handshake
    included. Use as a context manager; ``port`` is where clients connect."""

    def __init__(self, target_port: int, delay: float) -> None:
        self._target = ("127.0.0.1", target_port)
        self._delay = delay
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TrickleProxy:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(self._target)
            for args in ((client, upstream, 0.0), (upstream, client, self._delay)):
                threading.Thread(target=self._pipe, args=args, daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while not self._stopping.is_set() and (data := src.recv(CHUNK)):
                for i in range(0, len(data), 1 if delay else len(data)):
                    if delay and self._stopping.wait(delay):
                        return
                    dst.sendall(data[i:i + 1] if delay else data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
