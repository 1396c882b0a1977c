"""The box CLI's contract: names, exit codes, one-line errors, logging."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import opq_box_updater
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


# --- messages, the log file and its directory (issue 13, 4 and 2) ------------------------


@pytest.fixture
def root_box(tmp_path: Path) -> Iterator[Path]:
    """A box laid out as the package leaves it, in a directory other users may traverse:
    config 0644, state 0700 with a lock 0600, log directory 0755 with a log 0640."""
    from reposim import RepoSim

    base = Path(tempfile.mkdtemp(prefix="opq-cli-"))
    base.chmod(0o755)
    anchor = base / "root.json"
    anchor.write_bytes(RepoSim(tmp_path / "repo").anchor_bytes)
    anchor.chmod(0o644)
    (base / "state").mkdir(mode=0o700)
    (base / "state/lock").touch(mode=0o600)
    (base / "log").mkdir(mode=0o755)
    (base / "log/box_updater.log").touch(mode=0o640)
    path = config(base, trust_root=str(anchor))
    path.chmod(0o644)
    # The user must be able to read the code: the work tree may be in root's 0700 home.
    shutil.copytree(Path(opq_box_updater.__file__).parent, base / "src/opq_box_updater",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for item in (base / "src").rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)
    (base / "src").chmod(0o755)
    yield path
    shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as nobody")
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["check"], ["run"]])
def test_a_user_is_told_that_the_command_needs_root(root_box: Path, command: list[str]) -> None:
    before = {p: p.read_bytes() for p in root_box.parent.rglob("*") if p.is_file()
              and "src" not in p.relative_to(root_box.parent).parts}
    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         os.path.realpath(sys.executable), "-m", "opq_box_updater.cli", "--config",
         str(root_box), *command],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": os.defpath, "PYTHONPATH": str(root_box.parent / "src")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0], proc.stderr
    assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in root_box.parent.rglob("*") if p.is_file()
            and "src" not in p.relative_to(root_box.parent).parts} == before


def test_an_error_is_logged_once_without_a_doubled_error_word(tmp_path: Path) -> None:
    from reposim import RepoSim

    path = config(tmp_path, trust_root=str(RepoSim(tmp_path / "repo").anchor),
                  timeouts={"connect": 2, "read": 2, "total": 5})
    proc = cli("--config", str(path), "run")
    assert proc.returncode == 4
    assert proc.stderr.startswith("error: "), proc.stderr
    log = (tmp_path / "log/box_updater.log").read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "ERROR error" not in log and "127.0.0.1:9" in errors[0], log


def test_the_log_is_created_root_adm_0640_as_logrotate_does(tmp_path: Path) -> None:
    cli("--config", str(config(tmp_path)), "check")
    st = (tmp_path / "log/box_updater.log").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, grp.getgrnam("adm").gr_gid)


def test_a_log_created_0644_by_crons_redirect_is_brought_to_0640(tmp_path: Path) -> None:
    log = tmp_path / "log/box_updater.log"
    log.parent.mkdir()
    log.write_text("")
    log.chmod(0o644)
    cli("--config", str(config(tmp_path)), "check")
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_the_log_is_never_written_through_a_link_or_into_a_fifo(tmp_path: Path,
                                                                kind: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root-only secret\n")
    victim.chmod(0o600)
    log = tmp_path / "log/box_updater.log"
    log.parent.mkdir()
    if kind == "symlink":
        log.symlink_to(victim)
    else:
        os.mkfifo(log)
    proc = cli("--config", str(config(tmp_path)), "check")
    assert proc.returncode == 2 and "trust anchor" in proc.stderr, proc.stderr  # still runs
    assert "cannot write the log file" in proc.stderr
    assert victim.read_text() == "root-only secret\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_log_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    from reposim import RepoSim

    path = config(tmp_path, trust_root=str(RepoSim(tmp_path / "repo").anchor))
    logs = tmp_path / "log"
    logs.mkdir()
    logs.chmod(mode)
    proc = cli("--config", str(path), "check")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"log directory {logs}" in lines[0] and "chmod" in lines[0]
    assert list(logs.iterdir()) == []
    assert not (tmp_path / "state").exists()


def test_a_box_without_an_id_reports_one_generated_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """No box_id in the config, no /etc/machine-id: one id, generated by the first run,
    kept in the state dir and reported by status (not 'unknown' for every such box)."""
    from reposim import RepoSim

    from opq_box_updater import config as config_module
    from opq_box_updater.cli import logger, main

    monkeypatch.setattr(config_module, "MACHINE_ID", tmp_path / "no-machine-id")
    path = config(tmp_path, trust_root=str(RepoSim(tmp_path / "repo").anchor),
                  timeouts={"connect": 2, "read": 2, "total": 5})
    doc = json.loads(path.read_text())
    del doc["box_id"]
    path.write_text(json.dumps(doc))
    handlers = list(logger.handlers)
    try:
        assert main(["--config", str(path), "-q", "check"]) == 4
        stored = (tmp_path / "state/box_id").read_text().strip()
        capsys.readouterr()
        assert main(["--config", str(path), "status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["box_id"] == stored
        assert main(["--config", str(path), "-q", "check"]) == 4
        assert (tmp_path / "state/box_id").read_text().strip() == stored
    finally:
        for handler in logger.handlers[len(handlers):]:
            logger.removeHandler(handler)
            handler.close()


def test_every_log_line_has_a_timestamp_multi_line_messages_included(tmp_path: Path) -> None:
    """docs/operations.md: a line without a timestamp means a crash; the dry-run plan is
    several lines and must not look like one."""
    import re

    from opq_box_updater.cli import add_log_file, logger

    log = tmp_path / "log/box_updater.log"
    before, level = list(logger.handlers), logger.level
    logger.setLevel("INFO")  # other in-process tests may leave the shared logger quieter
    try:
        add_log_file(log)
        logger.info("dry run: would install release 3\n  debs: a_1_all.deb\n  run script: u.sh")
    finally:
        logger.setLevel(level)
        for handler in logger.handlers[len(before):]:
            logger.removeHandler(handler)
            handler.close()
    lines = log.read_text().splitlines()
    assert len(lines) == 3
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ")
    assert all(stamp.match(line) for line in lines), lines
    assert lines[1].endswith("INFO     debs: a_1_all.deb"), lines


def test_publisher_main_in_process_leaves_the_box_logging_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The publisher's CLI configures the shared ``opq_box_updater`` logger for its own lines;
    called in-process (tests, a bridge) it must hand the logger back as it found it: no
    lower-case level names for the box's log file, no handler on a stream that is gone."""
    import logging

    from opq_box_updater.cli import add_log_file, logger
    from opq_box_updater.publish import cli as publish_cli

    state = (list(logger.handlers), logger.level, logger.propagate)
    names = (logging.getLevelName(logging.INFO), logging.getLevelName(logging.WARNING))
    assert publish_cli.main(["init", str(tmp_path / "repo"), "--keys", str(tmp_path / "k")]) == 0
    assert "opq-box-publish: warning: no passphrase" in capsys.readouterr().err
    assert (list(logger.handlers), logger.level, logger.propagate) == state
    assert (logging.getLevelName(logging.INFO), logging.getLevelName(logging.WARNING)) == names
    log = tmp_path / "box_updater.log"
    logger.setLevel("INFO")
    try:
        add_log_file(log)
        logger.warning("the box's own line")
    finally:
        logger.setLevel(state[1])
        for handler in logger.handlers[len(state[0]):]:
            logger.removeHandler(handler)
            handler.close()
    assert " WARNING " in log.read_text() and " warning " not in log.read_text()
