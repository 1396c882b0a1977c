"""Status reports (``report_url``, DESIGN 3.5): after every run the box POSTs its result,
signed by its own report key, to ``opq-box-publish serve``, which keeps every report in its
store; ``opq-box-publish fleet`` prints each box's latest. A report that cannot be
delivered never fails a run and never holds it for longer than a short bound.

Both sides are the real commands: the box's CLI in a subprocess, ``serve`` as a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Box
from faultserver import Fault, FaultServer
from reposim import RepoSim

from opq_box_updater.metadata import format_time
from opq_box_updater.publish.store import ACCEPTED, open_repo_store

PY = sys.executable
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
#: What every report carries at least (updater.py ``_record``).
REPORT_KEYS = {"box_id", "installed_version", "last_result", "last_message", "last_run",
               "duration_ms", "release_version", "root_version", "failed_versions",
               "updater_version", "error"}

BoxFactory = Callable[..., Box]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RepoSim, str]]:
    """A repository with release 1, served by ``opq-box-publish serve``: (sim, base URL)."""
    sim = RepoSim(tmp_path / "repo")
    sim.release(1)
    proc = subprocess.Popen([PY, "-m", "opq_box_updater.publish.cli", "serve", str(sim.path),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        found = re.search(r" on (http://\S+/)$", line)
        assert found, f"serve printed {line!r}"
        yield sim, found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stored(sim: RepoSim, box_id: str) -> dict[str, Any]:
    """The newest report ``serve`` keeps for ``box_id`` (with when it arrived): signed by
    the box's key and accepted."""
    store = open_repo_store(sim.path)
    [record] = store.history(box_id, limit=1)
    store.close()
    assert (record.remote, record.status) == ("127.0.0.1", ACCEPTED)
    return {"report": record.report, "received": format_time(record.received),
            "counter": record.counter, "key_id": record.key_id}


def fleet_table(sim: RepoSim) -> dict[str, list[str]]:
    """``opq-box-publish fleet REPO`` as {box: [installed, result, last seen, message...]}."""
    out = subprocess.run([PY, "-m", "opq_box_updater.publish.cli", "fleet", str(sim.path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split() == ["BOX", "INSTALLED", "RESULT", "LAST", "SEEN", "MESSAGE"]
    return {line.split()[0]: line.split()[1:] for line in out[1:]}


def test_every_run_is_reported(served: tuple[RepoSim, str], box_factory: BoxFactory) -> None:
    sim, url = served
    box = box_factory(url, sim.anchor, report_url=url + "report", box_id="box-a")
    before = datetime.now(UTC).replace(microsecond=0)

    proc = box.run("run")
    assert proc.returncode == 0, proc.stderr
    record = stored(sim, "box-a")
    report = record["report"]
    assert set(report) >= REPORT_KEYS
    assert report["box_id"] == "box-a" and report["installed_version"] == 1
    assert report["last_result"] == "updated"
    assert "updated to release 1" in report["last_message"]
    assert (report["release_version"], report["root_version"], report["error"]) == (1, 1, None)
    assert TIME.fullmatch(report["last_run"])
    assert isinstance(report["duration_ms"], int) and 0 <= report["duration_ms"] < 60_000
    assert datetime.strptime(record["received"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC) >= before

    assert box.run("run").returncode == 0
    assert stored(sim, "box-a")["report"]["last_result"] == "up-to-date"

    sim.publish(2, signers=[sim.stranger()])  # an arbitrary package: refused
    proc = box.run("run")
    assert proc.returncode == 3, proc.stderr
    report = stored(sim, "box-a")["report"]
    assert (report["last_result"], report["installed_version"]) == ("refused", 1)
    assert "signature" in report["last_message"].lower()
    assert report["error"] == report["last_message"]

    # The repository is unreachable, the collector is not: the failure itself is reported.
    box.write_config(server_url=f"http://127.0.0.1:{free_port()}/")
    proc = box.run("run")
    assert proc.returncode == 4, proc.stderr
    report = stored(sim, "box-a")["report"]
    assert (report["last_result"], report["installed_version"]) == ("network-error", 1)
    assert "connection refused" in report["last_message"]

    # check reports too (it is a run of steps 0-5).
    box.write_config(server_url=url)
    sim.release(3)
    assert box.run("check").returncode == 100
    assert stored(sim, "box-a")["report"]["last_result"] == "update-available"


def test_fleet_prints_each_box_latest_report(served: tuple[RepoSim, str],
                                             box_factory: BoxFactory) -> None:
    sim, url = served
    ok = box_factory(url, sim.anchor, name="ok", report_url=url + "report", box_id="box-ok")
    down = box_factory(f"http://127.0.0.1:{free_port()}/", sim.anchor, name="down",
                       report_url=url + "report", box_id="box-down")
    assert fleet_table(sim) == {}, "no box has reported yet"
    assert ok.run("run").returncode == 0
    assert down.run("run").returncode == 4
    rows = fleet_table(sim)
    assert set(rows) == {"box-ok", "box-down"}
    assert rows["box-ok"][:2] == ["1", "updated"]
    assert rows["box-down"][:2] == ["0", "network-error"]
    for row in rows.values():
        assert TIME.fullmatch(row[2]), row  # last seen: when serve received the report
    assert "connection refused" in " ".join(rows["box-down"][3:])
    assert ok.status()["last_result"] == "updated"


# --- a report that cannot be delivered --------------------------------------------------------


class SlowCollector:
    """A TCP server on 127.0.0.1 that reads a request and then either trickles a response
    one byte per second forever (``trickle``), answers garbage (``garbage``), or says
    nothing at all (``silent``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/report"

    def __enter__(self) -> SlowCollector:
        self._sock.settimeout(0.1)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.requests += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            if self.mode == "garbage":
                conn.sendall(b"\x00\xffnot http at all\r\n\r\n")
                return
            payload = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 10_000
            for i in range(len(payload)):
                if self._stop.wait(1.0):
                    return
                if self.mode == "trickle":
                    conn.sendall(payload[i:i + 1])


@pytest.mark.parametrize("mode", ["trickle", "silent", "garbage"])
def test_a_stuck_collector_never_fails_or_holds_a_run(
        tmp_path: Path, box_factory: BoxFactory, mode: str) -> None:
    sim = RepoSim(tmp_path / "repo")
    sim.release(1)
    with FaultServer(sim.path) as server, SlowCollector(mode) as collector:
        # read 2 s: a trickle resets it with every byte, silence does not; total 4 s bounds
        # the report (it gets min(total, 30 s) of its own).
        box = box_factory(server.url, sim.anchor, report_url=collector.url,
                          timeouts={"connect": 2, "read": 2, "total": 4})
        started = time.monotonic()
        proc = box.run("run")
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        assert collector.requests == 1
    assert elapsed < 4 + 6, f"the report held the run for {elapsed:.1f}s"
    status = box.status()
    assert (status["installed_version"], status["last_result"]) == (1, "updated")
    assert "status report not sent" in box.log_file.read_text()


@pytest.mark.parametrize("fault", [Fault(status=500), Fault(status=404), Fault(delay=30)],
                         ids=["500", "404", "no-answer"])
def test_a_failing_collector_never_fails_a_run(tmp_path: Path, box_factory: BoxFactory,
                                               fault: Fault) -> None:
    sim = RepoSim(tmp_path / "repo")
    sim.release(1)
    with FaultServer(sim.path) as server:
        server.set_fault("/report", fault)
        box = box_factory(server.url, sim.anchor, report_url=f"{server.url}/report",
                          timeouts={"connect": 2, "read": 2, "total": 10})
        started = time.monotonic()
        proc = box.run("run")
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        assert [path for path, _ in server.posted] == ["/report"]
        report = json.loads(server.posted[0][1])["signed"]["report"]
        assert (report["box_id"], report["last_result"]) == ("test-box", "updated")
    assert elapsed < 2 + 6, f"the report held the run for {elapsed:.1f}s"
    assert box.status()["last_result"] == "updated"
    assert "status report not sent" in box.log_file.read_text()


def test_an_unreachable_collector_never_fails_a_refused_run(tmp_path: Path,
                                                          box_factory: BoxFactory) -> None:
    """The exit code of a failed run is its own, not the report's."""
    sim = RepoSim(tmp_path / "repo")
    sim.publish(1, signers=[sim.stranger()])
    with FaultServer(sim.path) as server:
        box = box_factory(server.url, sim.anchor,
                          report_url=f"http://127.0.0.1:{free_port()}/report")
        proc = box.run("run")
    assert proc.returncode == 3, proc.stderr
    assert box.status()["last_result"] == "refused"
    assert "status report not sent" in box.log_file.read_text()
