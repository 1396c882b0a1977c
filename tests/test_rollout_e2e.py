"""A bad release at 10 %, end to end (issue 10, "done when"): real boxes, real CLIs.

Four boxes (the real ``opq-box-updater`` in subprocesses, each in its own temporary root)
poll ``opq-box-publish serve`` on 127.0.0.1 and report every run to it. Release 2's run
script fails: the two boxes in its 10 % bucket roll back and report ``apply-failed``.
Then one command each: ``rollout widen`` is refused (exit 4, repository unchanged),
``rollout halt`` stops it (the other boxes do not take it), ``recall`` publishes release 1's
content as release 3, and every box converges to 3, running the good script.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Box, tree_digest

from opq_box_updater.metadata import parse_envelope, parse_release
from opq_box_updater.publish import serve

pytestmark = pytest.mark.slow
PUBLISH = [sys.executable, "-m", "opq_box_updater.publish.cli"]
GOOD = '#!/bin/sh\necho "good $OPQ_UPDATE_VERSION" >> "$DPKG_ROOT/applied"\n'
BAD = '#!/bin/sh\necho "bad $OPQ_UPDATE_VERSION" >> "$DPKG_ROOT/applied"\nexit 1\n'


def publish(*args: str | Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PUBLISH, *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


def bucket(box_id: str, version: int) -> int:
    return int(hashlib.sha256(f"{box_id}:{version}".encode()).hexdigest(), 16) % 100


def box_ids() -> list[str]:
    """Two boxes inside release 2's 10 % bucket, two outside it."""
    names = [f"box-{n:03d}" for n in range(400)]
    inside = [b for b in names if bucket(b, 2) < 10][:2]
    outside = [b for b in names if bucket(b, 2) >= 10][:2]
    return inside + outside


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    publish("init", repo, "--keys", keys)
    server = serve.make_server(repo, port=0, log=open("/dev/null", "w"))  # noqa: SIM115
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield repo, keys, serve.server_url(server)
    finally:
        server.shutdown()
        server.server_close()
        assert server.log is not None
        server.log.close()


def release(tmp: Path, repo: Path, keys: Path, version: int, script: str,
            rollout: int) -> None:
    path = tmp / f"update-{version}.sh"
    path.write_text(script)
    out = tmp / f"pkg-{version}.zip"
    publish("build", out, "--run", path, "--version", str(version))
    publish("release", repo, out, "--keys", keys, "--rollout", str(rollout))


def run_all(boxes: list[Box]) -> list[int]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda b: b.run("run").returncode, boxes))


def version_file(repo: Path) -> Any:
    return parse_release(parse_envelope((repo / "version.json").read_bytes()))


def status_row(repo: Path, version: int) -> list[str]:
    out = publish("rollout", "status", repo).stdout
    return next(line.split() for line in out.splitlines()
                if line.startswith("version.json") and line.split()[1] == f"v{version}")


def test_bad_release_refused_widening_halted_recalled_and_fleet_converges(
        tmp_path: Path, served: tuple[Path, Path, str], box_factory: Any) -> None:
    repo, keys, url = served
    boxes: list[Box] = [box_factory(url, repo / "root/1.root.json", name=b, box_id=b,
                                    report_url=url + "report") for b in box_ids()]
    release(tmp_path, repo, keys, 1, GOOD, 100)
    assert run_all(boxes) == [0] * 4

    release(tmp_path, repo, keys, 2, BAD, 10)
    assert run_all(boxes) == [5, 5, 0, 0]  # the bucket's two roll back
    # CHANNEL RELEASE ROLLOUT BOXES IN-BUCKET UPDATED FAILED WAITING NOT-SEEN STALE RATE
    assert status_row(repo, 2) == ["version.json", "v2", "10%", "4", "2", "0", "2", "0", "0",
                                   "0", "100.0%"]

    before = tree_digest(repo, exclude=(repo / ".reports",))
    refused = publish("rollout", "widen", repo, "--to", "50", "--keys", keys, code=4)
    assert "2 of 2 boxes that tried it failed (100.0%, above 5%)" in refused.stderr
    assert tree_digest(repo, exclude=(repo / ".reports",)) == before

    publish("rollout", "halt", repo, "--keys", keys)
    assert version_file(repo).rollout_percent == 0
    assert run_all(boxes) == [0] * 4
    assert [b.status()["installed_version"] for b in boxes] == [1] * 4

    out = publish("recall", repo, "--keys", keys).stdout
    assert "recalled version.json v2: published v3 with the content of v1" in out
    assert (version_file(repo).version, version_file(repo).rollout_percent) == (3, 100)
    assert run_all(boxes) == [0] * 4
    for box in boxes:
        assert box.status()["installed_version"] == 3
        ran = (box.dpkg_root / "applied").read_text().splitlines()
        assert ran[0] == "good 1" and ran[-1] == "good 3"  # release 1's script, as v3
    assert status_row(repo, 3)[3:7] == ["4", "4", "4", "0"]  # boxes, in bucket, updated, failed
