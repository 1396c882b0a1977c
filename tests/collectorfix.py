"""The report collector as operators run it, for tests and the benchmark: Debian's gunicorn
serving ``opq_box_updater.publish.collector:application`` on a Unix socket, and the shipped
nginx site with the shipped collector snippet (``docs/nginx/opq-box-collector.conf``)
included, its socket path the only substitution.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

PROJECT = Path(__file__).resolve().parent.parent
SNIPPET = PROJECT / "docs" / "nginx" / "opq-box-collector.conf"
UNIT = PROJECT / "debian" / "opq-box-publisher.opq-box-collector.service"
SHIPPED_SOCKET = "/run/opq-box-collector/gunicorn.sock"
INCLUDE = "#include /etc/nginx/snippets/opq-box-collector.conf;"
APP = "opq_box_updater.publish.collector:application"


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A short directory in /tmp for a Unix socket (a socket path has at most 107 bytes;
    pytest's and the benchmark's scratch paths can be longer), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="opq-g-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unit_command(sock: Path) -> list[str]:
    """The shipped unit's ``ExecStart`` with ``sock`` for its socket: the tests and the
    benchmark run exactly the command systemd runs."""
    text = UNIT.read_text()
    found = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{UNIT}: no ExecStart line")
    argv = shlex.split(found.group(1).replace("\\\n", " "))
    bind = f"unix:{SHIPPED_SOCKET}"
    if argv.count(bind) != 1 or argv[-1] != APP or not argv[0].endswith("/gunicorn"):
        raise RuntimeError(f"{UNIT}: ExecStart changed shape: {argv}")
    return [f"unix:{sock}" if arg == bind else arg for arg in argv]


def find_gunicorn() -> str | None:
    return shutil.which("gunicorn") or shutil.which("gunicorn", path="/usr/bin:/bin")


def collector_site(sock: Path, snippet_copy: Path) -> Callable[[str], str]:
    """A ``site_filter`` for :class:`nginxfix.Nginx`: the snippet, with ``sock`` for the
    shipped socket path, written to ``snippet_copy`` and included where the shipped site
    has the commented include. Fails loudly when either file changed shape."""
    text = SNIPPET.read_text()
    if SHIPPED_SOCKET not in text:  # /report and the fleet page's /fleet/
        raise RuntimeError(f"{SNIPPET}: expected the socket {SHIPPED_SOCKET}")
    snippet_copy.write_text(text.replace(SHIPPED_SOCKET, str(sock)))

    def site_filter(site: str) -> str:
        if site.count(INCLUDE) != 1:
            raise RuntimeError(f"the shipped site lost its line {INCLUDE!r}")
        return site.replace(INCLUDE, f"include {snippet_copy};")
    return site_filter


class Gunicorn:
    """gunicorn with the collector on ``sock``, its store ``db_url``; output in ``log``."""

    def __init__(self, sock: Path, db_url: str, log: Path, *, workers: int = 2,
                 extra_env: dict[str, str] | None = None) -> None:
        self.sock, self.db_url, self.log, self.workers = sock, db_url, log, workers
        self.extra_env = extra_env or {}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Gunicorn:
        binary = find_gunicorn()
        if binary is None:
            raise FileNotFoundError("gunicorn is not installed (apt-get install gunicorn)")
        # The unit's settings, as systemd passes them: GUNICORN_CMD_ARGS for the workers.
        env = {**os.environ, "OPQ_COLLECTOR_DB": self.db_url, "PYTHONPATH": str(PROJECT),
               "GUNICORN_CMD_ARGS": f"--workers={self.workers}", **self.extra_env}
        argv = unit_command(self.sock)
        argv[0] = binary
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out, env=env, cwd=self.log.parent)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError("gunicorn exited: " + self.log.read_text()[-2000:])
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.sock))
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("gunicorn did not listen: " + self.log.read_text()[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
