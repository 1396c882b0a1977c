"""Debian's nginx serving a directory with the shipped site configuration, for tests and benches.

::

    with Nginx(repo_dir, tmp_dir) as nginx:     # 127.0.0.1, an ephemeral port
        box = box_factory(nginx.url, ...)       # nginx.url is "http://127.0.0.1:<port>/"
        ...
        entries = nginx.access_log()            # one AccessEntry per answered request

The site is ``docs/nginx/opq-box-repo.conf`` exactly as shipped, with only its ``listen``
and ``root`` lines substituted, so what the tests prove holds for the configuration operators
install. Everything nginx writes (config, pid, error and access logs, temp dirs) lives under
``work_dir``; nothing under ``/etc/nginx`` or ``/var`` is touched (``/etc/nginx/mime.types``
is read when present). The server runs in the foreground as a child process and is stopped
(SIGTERM, then SIGKILL) when the context exits, also when the body raised.

The access log is written as JSON lines with the fields of :class:`AccessEntry`, so a test
can assert status codes (304, 206) and bytes on the wire without parsing nginx's default
format. This module needs neither pytest nor the product; :func:`require_nginx` (for tests)
imports pytest when called.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

PROJECT = Path(__file__).resolve().parent.parent
SITE_CONFIG = PROJECT / "docs" / "nginx" / "opq-box-repo.conf"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MIME_TYPES = Path("/etc/nginx/mime.types")

# One JSON object per request; every string is escaped by nginx (escape=json).
_LOG_FORMAT = (
    '{"method":"$request_method","uri":"$uri","status":$status,'
    '"body_bytes_sent":$body_bytes_sent,"bytes_sent":$bytes_sent,'
    '"request_length":$request_length,"range":"$http_range",'
    '"if_none_match":"$http_if_none_match","if_modified_since":"$http_if_modified_since",'
    '"user_agent":"$http_user_agent","request_time":$request_time}'
)


class NginxError(RuntimeError):
    """nginx is missing, or did not start (the message carries its error output)."""


class AccessEntry(NamedTuple):
    """One line of the access log. ``bytes_sent`` counts headers and body on the wire,
    ``request_length`` the request line, headers and body received."""

    method: str
    uri: str
    status: int
    body_bytes_sent: int
    bytes_sent: int
    request_length: int
    range: str
    if_none_match: str
    if_modified_since: str
    user_agent: str
    request_time: float


def find_nginx() -> str | None:
    """The nginx binary (``/usr/sbin`` is searched even when not on ``PATH``), or None."""
    return shutil.which("nginx") or shutil.which("nginx", path=SYSTEM_PATH)


def require_nginx() -> str:
    """For tests: the nginx binary; missing, the test fails under ``CI`` and skips otherwise
    (a skipped test proves nothing, but a developer without nginx can run the rest)."""
    import pytest

    path = find_nginx()
    if path is None:
        message = "nginx is not installed (apt-get install nginx-light)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def site_config(root: Path, port: int, source: Path = SITE_CONFIG,
                apt_dir: Path | None = None) -> str:
    """The shipped site with its ``listen`` and ``root`` set (and the apt repository's
    ``alias`` when ``apt_dir`` is given); fails loudly if a line changed shape (the
    substitution must never silently serve something else)."""
    site = source.read_text()
    if apt_dir is not None:
        site, aliases = re.subn(r"^(\s*)alias /srv/opq-box-apt/;",
                                lambda m: f"{m.group(1)}alias {apt_dir}/;", site,
                                flags=re.MULTILINE)
        if aliases != 1:
            raise NginxError(f"{source}: expected one 'alias /srv/opq-box-apt/;' line")
    site, listens = re.subn(r"^(\s*)listen 127\.0\.0\.1:\d+;", rf"\g<1>listen 127.0.0.1:{port};",
                            site, flags=re.MULTILINE)
    site, roots = re.subn(r"^(\s*)root /srv/opq-box-repo;", lambda m: f"{m.group(1)}root {root};",
                          site, flags=re.MULTILINE)
    if listens != 1 or roots != 1:
        raise NginxError(f"{source}: expected one 'listen 127.0.0.1:PORT;' and one "
                         f"'root /srv/opq-box-repo;' line, found {listens} and {roots}")
    return site


def free_port() -> int:
    """A port that was free a moment ago (the caller retries if someone takes it first)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Nginx:
    """nginx on 127.0.0.1 serving ``root`` with the shipped site, all files in ``work_dir``.

    ``worker_processes`` and ``worker_connections`` size it for a fleet test (the default,
    one worker with 1024 connections, is plenty for one box). ``http_extra`` is appended
    to the ``http`` block verbatim (e.g. ``"sendfile on;"`` for a benchmark). Start with
    ``with`` or :meth:`start` / :meth:`stop`. ``apt_dir`` is the directory served under
    ``/apt/`` (the operators' apt repository). ``site_filter`` rewrites the site after its
    substitutions (the collector's include).
    """

    start_timeout = 10.0

    def __init__(self, root: Path, work_dir: Path, *, worker_processes: int = 1,
                 worker_connections: int = 1024, http_extra: str = "",
                 binary: str | None = None, apt_dir: Path | None = None,
                 site_filter: Callable[[str], str] | None = None) -> None:
        self.root = root.resolve()
        self.apt_dir = apt_dir
        self.work_dir = work_dir.resolve()
        self.worker_processes = worker_processes
        self.worker_connections = worker_connections
        self.http_extra = http_extra
        self.binary = binary
        self.site_filter = site_filter
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # --- paths and URL -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, with a trailing slash (a box's ``server_url``)."""
        if self._proc is None:
            raise NginxError("nginx is not running")
        return f"http://127.0.0.1:{self.port}/"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "nginx.conf"

    @property
    def access_log_path(self) -> Path:
        return self.work_dir / "access.log"

    @property
    def error_log_path(self) -> Path:
        return self.work_dir / "error.log"

    @property
    def pid_path(self) -> Path:
        return self.work_dir / "nginx.pid"

    @property
    def stderr_path(self) -> Path:
        return self.work_dir / "nginx.stderr"

    # --- life cycle ----------------------------------------------------------------------

    def write_config(self, port: int) -> None:
        """Write ``nginx.conf`` and ``site.conf`` for ``port`` into ``work_dir``."""
        temp = self.work_dir / "temp"
        temp.mkdir(parents=True, exist_ok=True)
        site = site_config(self.root, port, apt_dir=self.apt_dir)
        (self.work_dir / "site.conf").write_text(
            self.site_filter(site) if self.site_filter else site)
        # As root, workers would run as nobody and could not read a 0700 test directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        mime = f"  include {MIME_TYPES};\n" if MIME_TYPES.exists() else ""
        temps = "".join(f"  {kind}_temp_path {temp}/{kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.config_path.write_text(
            f"{user}worker_processes {self.worker_processes};\n"
            f"pid {self.pid_path};\nerror_log {self.error_log_path} warn;\ndaemon off;\n"
            f"events {{ worker_connections {self.worker_connections}; }}\n"
            "http {\n" + mime
            + f"  log_format opq_json escape=json '{_LOG_FORMAT}';\n"
            + f"  access_log {self.access_log_path} opq_json;\n"
            + temps
            + (f"  {self.http_extra}\n" if self.http_extra else "")
            + f"  include {self.work_dir / 'site.conf'};\n}}\n")

    def start(self, attempts: int = 5) -> Nginx:
        """Start nginx on a free port; retries with another port if one was taken meanwhile
        (tests run in parallel). Raises :class:`NginxError` if it cannot start."""
        binary = self.binary or find_nginx()
        if binary is None:
            raise NginxError("nginx is not installed (apt-get install nginx-light)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        errors: list[str] = []
        for _ in range(attempts):
            port = free_port()
            self.write_config(port)
            self.error_log_path.unlink(missing_ok=True)
            self.pid_path.unlink(missing_ok=True)
            # -e: even the error log of the early start-up goes to work_dir, not /var/log.
            with self.stderr_path.open("wb") as stderr:
                proc = subprocess.Popen(
                    [binary, "-p", f"{self.work_dir}/", "-c", str(self.config_path),
                     "-e", str(self.error_log_path)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            error = self._wait_until_serving(proc, port)
            if error is None:
                self._proc, self.port = proc, port
                return self
            errors.append(error)
            if "Address already in use" not in error:
                break
        raise NginxError("nginx did not start: " + " | ".join(errors))

    def _wait_until_serving(self, proc: subprocess.Popen[bytes], port: int) -> str | None:
        """None once the master wrote its pid and the port accepts; else why not (the
        process is then gone)."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                return self._error_text(proc)
            if self.pid_path.exists():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return None
                except OSError:
                    pass
            if time.monotonic() > deadline:
                _terminate(proc)
                return f"not serving on port {port} after {self.start_timeout:g}s; " + \
                    self._error_text(proc)
            time.sleep(0.05)

    def _error_text(self, proc: subprocess.Popen[bytes]) -> str:
        text = "".join(path.read_text(errors="replace")
                       for path in (self.stderr_path, self.error_log_path) if path.exists())
        return " ".join(text.split())[-2000:] or f"exit status {proc.returncode}"

    def stop(self) -> None:
        """Stop nginx (fast shutdown, SIGKILL after 10 s); safe to call twice."""
        if self._proc is not None:
            _terminate(self._proc)
            self._proc = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- what it served ------------------------------------------------------------------

    def access_log(self, *, expect: int = 0, timeout: float = 5.0) -> list[AccessEntry]:
        """Every request logged so far, oldest first.

        nginx writes a line just after the response's last byte, so a client can be faster
        than the log: with ``expect``, wait (at most ``timeout`` s) until that many lines are
        there.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self._read_log()
            if len(entries) >= expect or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def requests_for(self, uri: str, **kwargs: Any) -> list[AccessEntry]:
        """The logged requests for one URI path (``/version.json``); ``expect`` (see
        :meth:`access_log`) counts requests for every path."""
        return [e for e in self.access_log(**kwargs) if e.uri == uri]

    def _read_log(self) -> list[AccessEntry]:
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        # Only complete lines: one being written has no newline yet.
        return [AccessEntry(**json.loads(line)) for line in text.splitlines(keepends=True)
                if line.endswith("\n")]


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
