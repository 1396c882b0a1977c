"""Shared fixtures: a sandboxed box (config, state, dpkg root) and helpers to run the CLIs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable


def require_tool(name: str) -> str:
    """The path of ``name``; fails when CI is set (a skipped test proves nothing), else skips."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but not installed")
        pytest.skip(f"{name} not installed")
    return path


def tree_digest(*roots: Path, exclude: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file and directory under ``roots`` with its sha256, for 'nothing changed' checks."""
    out: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if any(path == ex or ex in path.parents for ex in exclude):
                continue
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = "dir"
    return out


@dataclass
class Box:
    """A box in a temporary directory; ``run`` calls the real CLI in a subprocess."""

    base: Path
    server_url: str
    trust_root: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.base / "updater_config.json"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def download_dir(self) -> Path:
        return self.base / "cache"

    @property
    def hooks_dir(self) -> Path:
        return self.base / "hooks"

    @property
    def dpkg_root(self) -> Path:
        return self.base / "root"

    @property
    def log_file(self) -> Path:
        return self.base / "log" / "box_updater.log"

    def write_config(self, **over: Any) -> None:
        self.extra.update(over)
        doc = {
            "server_url": self.server_url,
            "trust_root": str(self.trust_root),
            "download_dir_path": str(self.download_dir) + "/",
            "state_dir": str(self.state_dir) + "/",
            "log_file": str(self.log_file),
            "hooks_dir": str(self.hooks_dir) + "/",
            "dpkg_root": str(self.dpkg_root),
            "box_id": "test-box",
            "timeouts": {"connect": 5, "read": 5, "total": 30},
            **self.extra,
        }
        self.config_path.write_text(json.dumps(doc, indent=2))

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "opq_box_updater.cli", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})})

    def status(self) -> dict[str, Any]:
        proc = self.run("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    def digest(self) -> dict[str, str]:
        """What must not change when a run is refused: state (less bookkeeping and the lock),
        the dpkg root, the hooks and everything else under the box but the download dir."""
        return tree_digest(self.base, exclude=(
            self.download_dir, self.state_dir / "last_run.json", self.state_dir / "lock",
            self.log_file.parent, self.config_path))


@pytest.fixture
def box_factory(tmp_path: Path) -> Iterator[Any]:
    def make(server_url: str, trust_root: Path, name: str = "box", **over: Any) -> Box:
        base = tmp_path / name
        base.mkdir()
        box = Box(base, server_url, trust_root)
        for sub in ("info", "updates", "triggers"):
            (box.dpkg_root / "var/lib/dpkg" / sub).mkdir(parents=True)
        for sub in ("status", "available"):
            (box.dpkg_root / "var/lib/dpkg" / sub).touch()
        (box.dpkg_root / "var/log").mkdir(parents=True)
        box.write_config(**over)
        return box

    yield make


# --- a real PostgreSQL for the report store (issue 10) -------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One throw-away PostgreSQL cluster for the whole session (tests/pgfix.py); each test
    that uses it resets the database it needs."""
    from pgfix import pg_bindir, postgres

    if pg_bindir() is None:
        require_tool("initdb")  # fails under CI, skips elsewhere
    require_tool("runuser")
    with postgres() as server:
        yield server


# --- no silent skips in CI (issue 9) ---------------------------------------------------------

_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``CI`` set, a skipped test fails the run: a missing tool (nginx, faketime,
    mmdebstrap, mount) must not turn into a quiet pass. Deselected tests do not count."""
    if os.environ.get("CI") and _SKIPPED and exitstatus == 0:
        print(f"\nCI is set and {len(_SKIPPED)} test(s) were skipped; failing the run:",
              *_SKIPPED, sep="\n  ", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
