"""A fleet: 200 boxes poll one nginx through a release and a phased rollout (DESIGN 2.3).

Every box is the real client — its config file read by ``load_config`` and one
``Updater(config).run(random_delay=JITTER)`` per poll, the cron job's jitter included — in
a thread of this process, with its own state directory, cache, lock and box id. The packages
carry only a run script (no dpkg needed), which appends the version it applies to a file of
its box, so the test sees every script run exactly once. Each box also reports every run to
``opq-box-publish serve``, and ``opq-box-publish fleet`` must show the whole fleet.

Rounds ("days"): release 1 at 100% (everyone updates); a quiet day (one 304 each); release 2
at 30% (exactly the boxes whose DESIGN 2.3 bucket is below 30 update, the others stay on 1);
the rollout widened to 100% (the rest follow). nginx's access log gives the requests, bytes
and failures of each round; the summary is printed.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from nginxfix import AccessEntry, Nginx, require_nginx
from reposim import RepoSim

from opq_box_updater.config import load_config
from opq_box_updater.publish import repo as publish_repo
from opq_box_updater.state import Store
from opq_box_updater.updater import Updater, result_word

pytestmark = pytest.mark.slow

FLEET = 200
JITTER = 2.0  # seconds: each box waits a random time up to this (--random-delay)
ROLLOUT = 30
#: Appends the version applied to a file of the box: each update's script runs once.
RUN_SCRIPT = b'#!/bin/sh\nset -e\necho "$OPQ_UPDATE_VERSION" >> "$DPKG_ROOT/applied"\n'
PY = sys.executable


def bucket(box_id: str, version: int) -> int:
    """DESIGN 2.3's rollout bucket, written out here rather than imported from the product."""
    return int(hashlib.sha256(f"{box_id}:{version}".encode()).hexdigest(), 16) % 100


@dataclass(frozen=True)
class FleetBox:
    box_id: str
    base: Path

    @property
    def config_path(self) -> Path:
        return self.base / "updater_config.json"

    @property
    def applied(self) -> list[int]:
        path = self.base / "root" / "applied"
        return [int(v) for v in path.read_text().split()] if path.exists() else []

    def installed(self) -> int:
        return Store(self.base / "state").load().installed_version

    def write_config(self, server_url: str, anchor: Path, report_url: str) -> None:
        (self.base / "root").mkdir(parents=True)
        doc = {"server_url": server_url, "trust_root": str(anchor), "box_id": self.box_id,
               "download_dir_path": f"{self.base}/cache/", "state_dir": f"{self.base}/state/",
               "log_file": f"{self.base}/log/box_updater.log",
               "hooks_dir": f"{self.base}/hooks/", "dpkg_root": f"{self.base}/root",
               "timeouts": {"connect": 10, "read": 30, "total": 120},
               "report_url": report_url}
        self.config_path.write_text(json.dumps(doc))

    def poll(self) -> tuple[str, str]:
        """One cron run of this box: the result word ``status`` would show, and the message."""
        try:
            outcome = Updater(load_config(self.config_path)).run(random_delay=JITTER)
        except Exception as exc:  # every failure counts, whatever its type
            return result_word(exc), f"{self.box_id}: {type(exc).__name__}: {exc}"
        return outcome.result, outcome.message


@dataclass(frozen=True)
class Round:
    name: str
    seconds: float
    results: Counter[str]
    errors: list[str]  # the messages of runs that raised
    entries: list[AccessEntry]

    def requests(self, kind: str, status: int | None = None) -> int:
        return sum(1 for e in self.entries if _kind(e.uri) == kind
                   and (status is None or e.status == status))

    @property
    def failures(self) -> int:
        return sum(1 for e in self.entries if e.status >= 400)

    @property
    def bytes_out(self) -> int:
        return sum(e.bytes_sent for e in self.entries)

    @property
    def bytes_in(self) -> int:
        return sum(e.request_length for e in self.entries)


def _kind(uri: str) -> str:
    if uri.startswith("/packages/"):
        return "package"
    if uri.startswith("/root/"):
        return "root"
    return "metadata" if uri.endswith(".json") else "other"


class Fleet:
    def __init__(self, boxes: list[FleetBox], nginx: Nginx) -> None:
        self.boxes = boxes
        self.nginx = nginx
        self.rounds: list[Round] = []

    def poll(self, name: str, requests: int) -> Round:
        """Every box polls once, all at the same time but for each one's random delay;
        ``requests`` is how many nginx should log (it logs just after a response's last
        byte, so the last lines may lag behind the runs by a moment)."""
        before = len(self.nginx.access_log())
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(self.boxes)) as pool:
            outcomes = list(pool.map(FleetBox.poll, self.boxes))
        seconds = time.monotonic() - started
        entries = self.nginx.access_log(expect=before + requests)[before:]
        errors = [message for word, message in outcomes if word in ("refused",
                  "network-error", "apply-failed", "config-error", "error")]
        result = Round(name, seconds, Counter(word for word, _ in outcomes), errors, entries)
        self.rounds.append(result)
        return result

    def summary(self) -> str:
        lines = [f"fleet: {len(self.boxes)} boxes (threads running Updater.run with "
                 f"random_delay={JITTER:g}s), one nginx",
                 f"{'round':<24}{'wall':>7}{'reqs':>6}{'304':>5}{'200':>5}{'206':>5}"
                 f"{'fail':>5}{'pkgs':>6}{'sent':>12}{'received':>10}  box results"]
        for r in self.rounds:
            statuses = Counter(e.status for e in r.entries)
            results = ", ".join(f"{word} {count}" for word, count in sorted(r.results.items()))
            lines.append(f"{r.name:<24}{r.seconds:>6.1f}s{len(r.entries):>6}{statuses[304]:>5}"
                         f"{statuses[200]:>5}{statuses[206]:>5}{r.failures:>5}"
                         f"{r.requests('package'):>6}{r.bytes_out:>12}{r.bytes_in:>10}  "
                         f"{results}")
        total = sum(len(r.entries) for r in self.rounds)
        lines.append(f"total: {total} requests, {sum(r.bytes_out for r in self.rounds)} bytes "
                     f"sent, {sum(r.failures for r in self.rounds)} failed, "
                     f"{sum(r.seconds for r in self.rounds):.1f}s of polling")
        return "\n".join(lines)


@pytest.fixture
def report_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``opq-box-publish serve`` of a directory for status reports: (report URL, dir)."""
    folder = tmp_path / "reports"
    folder.mkdir()
    proc = subprocess.Popen([PY, "-m", "opq_box_updater.publish.cli", "serve", str(folder),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r" on (http://\S+)$", line.strip())
        assert found, f"serve printed {line!r}"
        yield found.group(1) + "report", folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_fleet_release_and_phased_rollout(tmp_path: Path, report_server: tuple[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    require_nginx()
    report_url, reports = report_server
    sim = RepoSim(tmp_path / "repo")
    with Nginx(sim.path, tmp_path / "nginx", worker_processes=2) as nginx:
        boxes = [FleetBox(f"box-{i:03d}", tmp_path / "boxes" / f"box-{i:03d}")
                 for i in range(FLEET)]
        for box in boxes:
            box.write_config(nginx.url, sim.anchor, report_url)
        fleet = Fleet(boxes, nginx)
        early = {b.box_id for b in boxes if bucket(b.box_id, 2) < ROLLOUT}
        assert 0 < len(early) < FLEET

        v1 = sim.release(1, run=RUN_SCRIPT).package
        day = fleet.poll("release 1 at 100%", requests=2 * FLEET)
        assert day.results == {"updated": FLEET}, day.errors[:5]
        assert day.requests("metadata", 200) == FLEET and day.requests("package", 200) == FLEET
        assert len(day.entries) == 2 * FLEET and day.failures == 0
        assert sum(e.body_bytes_sent for e in day.entries if _kind(e.uri) == "package") == \
            FLEET * v1.length
        assert all(b.installed() == 1 and b.applied == [1] for b in boxes)

        day = fleet.poll("quiet day", requests=FLEET)
        assert day.results == {"up-to-date": FLEET}, day.errors[:5]
        assert [e.status for e in day.entries] == [304] * FLEET  # one conditional GET each

        v2 = sim.release(2, run=RUN_SCRIPT, rollout=ROLLOUT).package
        day = fleet.poll(f"release 2 at {ROLLOUT}%", requests=FLEET + len(early))
        assert day.results == {"updated": len(early), "outside-rollout": FLEET - len(early)}, \
            day.errors[:5]
        assert day.requests("metadata", 200) == FLEET and day.failures == 0
        fetched = [e for e in day.entries if _kind(e.uri) == "package"]
        assert len(fetched) == len(early) and {e.uri for e in fetched} == {"/" + v2.path}
        for box in boxes:
            expected = [1, 2] if box.box_id in early else [1]
            assert (box.installed(), box.applied) == (expected[-1], expected), box.box_id

        publish_repo.refresh_release(sim.path, sim.keydir, rollout=100)
        day = fleet.poll("rollout widened to 100%", requests=2 * FLEET - len(early))
        assert day.results == {"updated": FLEET - len(early), "up-to-date": len(early)}, \
            day.errors[:5]
        assert day.requests("package", 200) == FLEET - len(early) and day.failures == 0
        assert all(b.installed() == 2 and b.applied == [1, 2] for b in boxes)

    # Every box reported every run; the fleet table shows all of them on release 2.
    table = subprocess.run([PY, "-m", "opq_box_updater.publish.cli", "fleet", str(reports)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["BOX", "INSTALLED", "RESULT"]
    rows = {line.split()[0]: line.split()[1:3] for line in table[1:]}
    assert rows == {b.box_id: ["2", "up-to-date" if b.box_id in early else "updated"]
                    for b in boxes}
    with capsys.disabled():
        print("\n" + fleet.summary())

