"""Both CLIs end to end: opq-box-publish builds, signs and serves; opq-box-updater updates."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Box

PUBLISH = [sys.executable, "-m", "opq_box_updater.publish.cli"]


def publish(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PUBLISH, *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    publish("init", repo, "--keys", keys)
    server = subprocess.Popen([*PUBLISH, "serve", str(repo), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        url = line.strip().split(" on ", 1)[1]
        yield repo, keys, url
    finally:
        server.terminate()
        server.wait(timeout=10)


def build_and_release(tmp: Path, repo: Path, keys: Path, version: int, marker: Path) -> None:
    script = tmp / f"update-{version}.sh"
    script.write_text(f"#!/bin/sh\necho {version} >> {marker}\n")
    out = tmp / f"pkg-{version}.zip"
    publish("build", out, "--run", script, "--version", str(version))
    publish("release", repo, out, "--keys", keys)


def test_publish_serve_check_run_status(tmp_path: Path, served: tuple[Path, Path, str],
                                        box_factory: object) -> None:
    repo, keys, url = served
    marker = tmp_path / "ran"
    build_and_release(tmp_path, repo, keys, 1, marker)
    box: Box = box_factory(url, repo / "root/1.root.json")  # type: ignore[operator]

    assert box.run("check").returncode == 100
    proc = box.run("run")
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "1\n"
    status = box.status()
    assert status["installed_version"] == 1 and status["last_result"] == "updated"
    assert status["root_version"] == 1 and status["failed_versions"] == []

    # Nothing new: one conditional GET answered 304.
    proc = box.run("-v", "check")
    assert proc.returncode == 0 and "304" in proc.stderr
    assert box.status()["last_result"] == "up-to-date"

    # Release 2 after a rotation of the release key: the box walks to root v2.
    publish("rotate", repo, "--keys", keys, "--role", "release")
    build_and_release(tmp_path, repo, keys, 2, marker)
    assert box.run("run").returncode == 0
    assert marker.read_text() == "1\n2\n"
    status = box.status()
    assert status["installed_version"] == 2 and status["root_version"] == 2

    # The operator's own check accepts everything release and rotate wrote.
    proc = publish("verify", repo)
    assert "ok" in proc.stdout
    # The box's log has the story.
    log = box.log_file.read_text()
    assert "verified release 2" in log and "accepted root v2" in log


def test_refresh_extends_expiry_and_box_accepts_it(tmp_path: Path,
                                                  served: tuple[Path, Path, str],
                                                  box_factory: object) -> None:
    repo, keys, url = served
    marker = tmp_path / "ran"
    build_and_release(tmp_path, repo, keys, 1, marker)
    box: Box = box_factory(url, repo / "root/1.root.json")  # type: ignore[operator]
    assert box.run("run").returncode == 0
    before = json.loads((repo / "version.json").read_text())["signed"]
    publish("refresh", repo, "--keys", keys, "--expires", "60d")
    after = json.loads((repo / "version.json").read_text())["signed"]
    assert after["version"] == before["version"] and after["expires"] > before["expires"]
    proc = box.run("run")
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "1\n"  # same release: nothing re-applied
