"""A real, throw-away PostgreSQL server for tests and the benchmark (never mocked).

Debian's ``postgresql`` binaries, a cluster made by ``initdb`` in a temporary directory
(as the ``postgres`` user when we are root: initdb refuses root), listening only on a Unix
socket in that directory (no TCP port at all), stopped and removed afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def pg_bindir() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/N/bin`` that has initdb, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


class Postgres:
    """A running cluster; :attr:`dsn` connects to its database ``opq`` over the socket."""

    def __init__(self, bindir: Path, base: Path, *, durable: bool = False) -> None:
        self.bindir = bindir
        self.base = base
        self.durable = durable
        self.data = base / "data"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    @property
    def dsn(self) -> str:
        return f"host={self.base} dbname=opq user={self.user}"

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self.base.chmod(0o700)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                  "--auth=trust", "-E", "UTF8", *([] if self.durable else ["--no-sync"]))
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                  str(self.base / "log"), "-o", self._options(), "start")
        self._run(str(self.bindir / "createdb"), "-h", str(self.base), "-U", self.user, "opq")

    def _options(self) -> str:
        """Only a Unix socket in the cluster's directory, no TCP port at all."""
        return (f"-k {self.base} -c listen_addresses='' -c max_connections=200"
                + ("" if self.durable else " -c fsync=off"))

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                      "-w", "stop")

    def restart(self) -> None:
        """Stop the server at once (as a crash would, ``-m immediate``) and start it again:
        every open connection is broken."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                  "-w", "stop")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                  str(self.base / "log"), "-o", self._options(), "start")

    def reset(self) -> None:
        """Drop and recreate the database: a fresh, empty store for the next test."""
        for command in ("dropdb", "createdb"):
            self._run(str(self.bindir / command), "-h", str(self.base), "-U", self.user, "opq")


@contextlib.contextmanager
def postgres(*, durable: bool = False, parent: Path | None = None) -> Iterator[Postgres]:
    """A started cluster, stopped and deleted on exit. Tests run it with ``fsync=off``
    (nothing to keep); ``durable`` keeps PostgreSQL's defaults (the benchmark)."""
    bindir = pg_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="opq-pg-", dir=parent))
    server = Postgres(bindir, base, durable=durable)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
