"""The box against Debian's nginx running the shipped site configuration (DESIGN 6, issue 5.1).

The repository is a real one (RepoSim: the publishing library's init and release); nginx is
started on an ephemeral port by :mod:`nginxfix`, and its access log is the witness: a daily
check with nothing new is one conditional GET answered 304, an interrupted download resumes
with a Range request answered 206, and a full update (root walk, package, run script) works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Box
from nginxfix import Nginx, NginxError, require_nginx
from reposim import RepoSim

pytestmark = pytest.mark.slow

PACKAGE_PAYLOAD = 1024 * 1024  # incompressible bytes in the package, so halves mean halves


@pytest.fixture
def sim(tmp_path: Path) -> RepoSim:
    return RepoSim(tmp_path / "repo")


@pytest.fixture
def nginx(tmp_path: Path, sim: RepoSim) -> Iterator[Nginx]:
    binary = require_nginx()
    try:
        with Nginx(sim.path, tmp_path / "nginx", binary=binary) as server:
            yield server
    except NginxError as exc:
        pytest.fail(str(exc))


def marker_script(marker: Path, version: int) -> bytes:
    return f"#!/bin/sh\necho {version} >> {marker}\n".encode()


def big_release(sim: RepoSim, version: int, marker: Path) -> tuple[str, int]:
    """Publish ``version`` with a package of about PACKAGE_PAYLOAD random bytes; returns the
    package's URI and length."""
    package = sim.make_package(version, run=marker_script(marker, version),
                               members={"payload.bin": os.urandom(PACKAGE_PAYLOAD)})
    sim.publish(version, package=package)
    ref = sim.current()
    assert ref is not None
    return "/" + ref.package.path, ref.package.length


def run_ok(box: Box, *args: str) -> str:
    proc = box.run(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_daily_check_is_one_conditional_get_answered_304(
        tmp_path: Path, sim: RepoSim, nginx: Nginx, box_factory: object) -> None:
    marker = tmp_path / "ran"
    sim.release(1, run=marker_script(marker, 1))
    box: Box = box_factory(nginx.url, sim.anchor)  # type: ignore[operator]
    run_ok(box, "run")
    assert box.status()["installed_version"] == 1
    first = nginx.access_log(expect=2)

    run_ok(box, "run")  # the next day: nothing new
    run_ok(box, "check")
    later = nginx.access_log(expect=len(first) + 2)[len(first):]

    assert [(e.uri, e.status) for e in first] == [
        ("/version.json", 200), ("/" + sim.current().package.path, 200)]  # type: ignore[union-attr]
    assert [(e.uri, e.status) for e in later] == [("/version.json", 304)] * 2
    for entry in later:
        assert entry.if_none_match and entry.body_bytes_sent == 0
        # DESIGN 7: a no-op daily check costs under 1 KiB on the wire, both directions.
        assert entry.request_length + entry.bytes_sent < 1024, entry
    assert marker.read_text() == "1\n"
    status = box.status()
    assert status["installed_version"] == 1 and status["last_result"] == "up-to-date"


def test_resume_from_a_partial_download_is_answered_206(
        tmp_path: Path, sim: RepoSim, nginx: Nginx, box_factory: object) -> None:
    marker = tmp_path / "ran"
    uri, length = big_release(sim, 1, marker)
    sha = uri.rsplit("/", 1)[1].removesuffix(".zip")
    box: Box = box_factory(nginx.url, sim.anchor)  # type: ignore[operator]
    half = length // 2
    box.download_dir.mkdir(mode=0o700)
    (box.download_dir / f"{sha}.part").write_bytes(sim.read(uri.lstrip("/"))[:half])

    run_ok(box, "run")

    assert marker.read_text() == "1\n"
    assert box.status()["installed_version"] == 1
    served = nginx.requests_for(uri, expect=2)
    assert [(e.status, e.range) for e in served] == [(206, f"bytes={half}-")]
    assert served[0].body_bytes_sent == length - half


def test_download_cut_by_the_deadline_resumes_on_the_next_run(
        tmp_path: Path, sim: RepoSim, box_factory: object) -> None:
    """A real cut: nginx throttled to 256 KiB/s and a 1.5 s deadline stop the first run
    mid-package (exit 4); the next run, against an unthrottled nginx on the same directory,
    asks for the rest only."""
    binary = require_nginx()
    marker = tmp_path / "ran"
    uri, length = big_release(sim, 1, marker)
    with Nginx(sim.path, tmp_path / "slow", binary=binary, http_extra="limit_rate 256k;") as slow:
        box: Box = box_factory(slow.url, sim.anchor)  # type: ignore[operator]
        box.write_config(timeouts={"connect": 5, "read": 5, "total": 1.5})
        proc = box.run("run")
        assert proc.returncode == 4, proc.stderr
        assert "timeouts.total" in proc.stderr and "Traceback" not in proc.stderr
        cut = slow.requests_for(uri, expect=2)
    assert [e.status for e in cut] == [200]
    parts = list(box.download_dir.glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < length
    kept = parts[0].stat().st_size
    assert box.status()["installed_version"] == 0
    assert box.status()["last_result"] == "network-error"

    with Nginx(sim.path, tmp_path / "fast", binary=binary) as fast:
        box.write_config(server_url=fast.url, timeouts={"connect": 5, "read": 5, "total": 30})
        run_ok(box, "run")
        resumed = fast.requests_for(uri, expect=2)
    assert [(e.status, e.range) for e in resumed] == [(206, f"bytes={kept}-")]
    total = cut[0].body_bytes_sent + resumed[0].body_bytes_sent
    assert total <= 1.05 * length, (cut, resumed)
    assert marker.read_text() == "1\n"
    assert box.status()["installed_version"] == 1


def test_full_update_with_a_key_rotation_through_nginx(
        tmp_path: Path, sim: RepoSim, nginx: Nginx, box_factory: object) -> None:
    marker = tmp_path / "ran"
    sim.release(1, run=marker_script(marker, 1))
    box: Box = box_factory(nginx.url, sim.anchor)  # type: ignore[operator]
    assert box.run("check").returncode == 100
    run_ok(box, "run")

    # Published within the second of the previous version file: publish_release moves the
    # mtime on a second so nginx's validators change (a box must not be told 304).
    sim.rotate("release")  # root v2 with a new release key; version.json re-signed
    sim.release(2, run=marker_script(marker, 2))
    assert box.run("check").returncode == 100
    run_ok(box, "run")

    assert marker.read_text() == "1\n2\n"
    status = box.status()
    assert (status["installed_version"], status["root_version"]) == (2, 2)
    assert status["last_result"] == "updated" and status["failed_versions"] == []
    log = nginx.access_log(expect=7)
    package = "/" + sim.current().package.path  # type: ignore[union-attr]
    assert ("/root/2.root.json", 200) in [(e.uri, e.status) for e in log]
    got = [e for e in log if e.uri == package]
    assert [(e.status, e.body_bytes_sent) for e in got] == [
        (200, sim.current().package.length)]  # type: ignore[union-attr]
    assert all(e.status in (200, 304) for e in log), log
