"""The box CLI's contract: names, exit codes, one-line errors, logging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opq_box_updater import __version__
from opq_box_updater.cli import EXIT_CODES, exit_code_for
from opq_box_updater.errors import (
    ApplyError,
    ConfigError,
    DownloadError,
    ExpiredMetadataError,
    LockError,
    SlowRetrievalError,
    StateError,
    UnsafePackageError,
)


def cli(*args: str, stderr_to: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "opq_box_updater.cli", *args]
    if stderr_to is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    with stderr_to.open("a") as err:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=60)


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("x"), 2), (ExpiredMetadataError("x"), 3), (UnsafePackageError("x"), 3),
    (SlowRetrievalError("x"), 4), (DownloadError("x"), 4), (ApplyError("x"), 5),
    (LockError("x"), 6), (StateError("x"), 1), (KeyError("x"), 1),
])
def test_exit_code_map(exc: BaseException, code: int) -> None:
    assert exit_code_for(exc) == code
    assert len({kind for kind, _ in EXIT_CODES}) == len(EXIT_CODES)


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_usage_error_is_exit_2() -> None:
    assert cli("frobnicate").returncode == 2
    assert cli().returncode == 2


def config(tmp_path: Path, **over: object) -> Path:
    doc = {"server_url": "http://127.0.0.1:9/", "trust_root": str(tmp_path / "root.json"),
           "state_dir": str(tmp_path / "state"), "download_dir_path": str(tmp_path / "cache"),
           "log_file": str(tmp_path / "log/box_updater.log"), "box_id": "b", **over}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    return path


def test_bad_config_value_names_key_and_file(tmp_path: Path) -> None:
    path = config(tmp_path, timeouts={"read": "slow"})
    proc = cli("--config", str(path), "run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "timeouts.read" in lines[0] and str(path) in lines[0]


def test_missing_trust_anchor_says_how_to_provide_one(tmp_path: Path) -> None:
    proc = cli("--config", str(config(tmp_path)), "check")
    assert proc.returncode == 2
    assert "trust anchor" in proc.stderr and "TRUST_ROOT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_key_warns_in_log_only(tmp_path: Path) -> None:
    path = config(tmp_path, colour="blue")
    proc = cli("--config", str(path), "check")
    assert "colour" not in proc.stderr
    assert "unknown key 'colour'" in (tmp_path / "log/box_updater.log").read_text()
    proc = cli("--config", str(path), "-v", "check")
    assert "colour" in proc.stderr


def test_status_before_any_run(tmp_path: Path) -> None:
    proc = cli("--config", str(config(tmp_path)), "status", "--json")
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert doc["installed_version"] == 0 and doc["last_run"] is None
    assert doc["failed_versions"] == [] and doc["last_result"] is None


def test_stderr_into_the_log_file_is_written_once(tmp_path: Path) -> None:
    """cron appends stderr to the log file the updater writes itself: no double lines."""
    path = config(tmp_path)
    log = tmp_path / "log/box_updater.log"
    log.parent.mkdir()
    cli("--config", str(path), "-q", "check", stderr_to=log)
    lines = [line for line in log.read_text().splitlines() if "trust anchor" in line]
    assert len(lines) == 1, lines


def test_network_error_one_line(tmp_path: Path) -> None:
    from reposim import RepoSim

    sim = RepoSim(tmp_path / "repo")
    path = config(tmp_path, trust_root=str(sim.anchor), server_url="http://127.0.0.1:9/",
                  timeouts={"connect": 2, "read": 2, "total": 5})
    proc = cli("--config", str(path), "run")
    assert proc.returncode == 4
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "127.0.0.1:9" in proc.stderr
    assert os.path.exists(tmp_path / "state" / "last_run.json")


def test_missing_trust_anchor_is_recorded_for_status(tmp_path: Path) -> None:
    path = config(tmp_path)
    assert cli("--config", str(path), "run").returncode == 2
    doc = json.loads(cli("--config", str(path), "status", "--json").stdout)
    assert doc["last_result"] == "config-error" and "trust anchor" in doc["last_message"]


def test_status_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    path = config(tmp_path)
    proc = subprocess.run(
        f"sleep 0 | {sys.executable} -m opq_box_updater.cli --config {path} status | true",
        shell=True, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
