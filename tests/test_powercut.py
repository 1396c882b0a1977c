"""The power-cut matrix (DESIGN 3.4; issues 3 and 5): kill -9 at every phase of a run, then
a normal run (the server up, or stopped) must end with the old or the new release fully
installed, dpkg's database clean, the state journal idle and the exit code DESIGN 3.4 gives.

Each row of :data:`MATRIX` cuts the power once, in one of four ways:

* ``fault``: the updater's own fault points (``OPQ_BOX_UPDATER_FAULT``, :mod:`faults`);
* ``inside``: a maintainer script, the run script or the health check kills, with SIGKILL,
  every process from itself up to and including the updater (dpkg, the guard, dpkg's hook
  shell): a power cut seen from inside dpkg. It only ever kills its own ancestors, only when
  the test's ``OPQ_TEST_POWERCUT`` variable is set, only once, and only when it finds the
  updater among them;
* ``midway``: the updater is killed from outside while it streams the package, once its
  first chunk is on disk (a :class:`StallingServer` sends half the package, then waits);
* ``write``: the updater is run through a wrapper whose ``os.replace`` kills the process when
  it is about to put a chosen ``state.json`` in place: after the temp file was written and
  fsynced, before the rename. That is the one instant of :func:`state.atomic_write` a fault
  point inside it could add; the wrapper reaches each write by its content instead of its
  position, at no cost to the product.

The measured results are in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import PY
from debs import require_tool
from faultserver import FaultServer
from reposim import RepoSim
from test_apply_e2e import APPLY_FAILED, DPKG_TOOLS, OK, World, install_v1, publish_v2

from opq_box_updater.faults import FAULT_ENV

NETWORK = 4
OLD = {"alpha": "1.0"}
NEW = {"alpha": "2.0", "beta": "1.0"}
CUT_ENV = "OPQ_TEST_POWERCUT"

#: Shell: SIGKILL this script and every ancestor up to and including the updater, once.
POWERCUT = f"""
if [ -n "${CUT_ENV}" ] && [ ! -e "${CUT_ENV}" ]; then
    touch "${CUT_ENV}"
    pids="" p=$PPID
    while [ "$p" -gt 1 ]; do
        pids="$p $pids"
        if tr '\\0' ' ' < /proc/$p/cmdline | grep -q 'opq_box_updater[.]cli'; then
            kill -9 $pids; kill -9 $$
        fi
        p=$(awk '/^PPid:/ {{print $2}}' /proc/$p/status)
    done
fi
"""

#: Runs the CLI with an ``os.replace`` that kills the process instead of renaming a temp
#: file onto ``state.json`` when the new content matches ``OPQ_TEST_CUT_WRITE``.
WRITE_CUTTER = """
import json, os, signal, sys
from pathlib import Path

def wanted(doc):
    phase = doc["journal"]["phase"]
    channel = doc["channels"].get("version.json", {})
    return {"applying": phase == "applying",
            "rolling-back": phase == "rolling-back",
            "commit": phase == "idle" and channel.get("installed_version") == 2,
            "rolled-back": phase == "idle" and 2 in channel.get("failed_versions", []),
            }[os.environ["OPQ_TEST_CUT_WRITE"]]

real_replace = os.replace
def replace(src, dst, **kwargs):
    if Path(dst).name == "state.json" and wanted(json.loads(Path(src).read_bytes())):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, **kwargs)
os.replace = replace

from opq_box_updater.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class Cut:
    """One row of the matrix: where the power goes, and what the next run must do with the
    server up and with it stopped: (exit code, release installed afterwards).

    A rollback of an apply the cut interrupted leaves release 2 unmarked (a power cut says
    nothing about the release): a later run installs it. A release that failed by itself
    (``bad``) is marked failed whatever the cut did to its rollback."""

    where: str
    fault: str | None = None  # a fault point
    inside: str | None = None  # "<deb>.<maintainer script>", "run" or "healthcheck"
    write: str | None = None  # which state.json write (see WRITE_CUTTER)
    midway: bool = False  # killed in the middle of the package download
    bad: bool = False  # release 2's health check fails (a rollback is under way)
    up: tuple[int, int] = (OK, 2)
    down: tuple[int, int] = (NETWORK, 2)

    def __str__(self) -> str:
        return self.where


ROLLED_BACK = (APPLY_FAILED, 1)
NOT_STARTED_DOWN = (NETWORK, 1)  # nothing was applied; the update waits for the network

MATRIX = [
    # before anything changed: journal "downloading"
    Cut("download", fault="download", down=NOT_STARTED_DOWN),
    Cut("download, mid-transfer", midway=True, down=NOT_STARTED_DOWN),
    Cut("extract", fault="extract", down=NOT_STARTED_DOWN),
    Cut("state write: applying", write="applying", down=NOT_STARTED_DOWN),
    # journal "applying", dpkg not started or cut short: roll back
    Cut("apply", fault="apply", up=ROLLED_BACK, down=ROLLED_BACK),
    Cut("before-dpkg", fault="before-dpkg", up=ROLLED_BACK, down=ROLLED_BACK),
    Cut("preinst (upgrade)", inside="alpha.preinst", up=ROLLED_BACK, down=ROLLED_BACK),
    Cut("preinst (new package)", inside="beta.preinst", up=ROLLED_BACK, down=ROLLED_BACK),
    # dpkg unpacked everything: dpkg --configure -a, run script, health, commit
    Cut("postinst", inside="beta.postinst"),
    Cut("run script", inside="run", up=ROLLED_BACK, down=ROLLED_BACK),
    Cut("after-dpkg", fault="after-dpkg"),
    Cut("before-health", fault="before-health"),
    Cut("health check", inside="healthcheck"),
    Cut("commit", fault="commit"),
    Cut("state write: commit", write="commit"),
    # a failed release being rolled back: roll back again
    Cut("state write: rolling-back", write="rolling-back", bad=True, up=ROLLED_BACK,
        down=ROLLED_BACK),
    Cut("rollback", fault="rollback", bad=True, up=ROLLED_BACK, down=ROLLED_BACK),
    Cut("postrm (rollback's purge)", inside="beta.postrm", bad=True, up=ROLLED_BACK,
        down=ROLLED_BACK),
    Cut("rollback-after-purge", fault="rollback-after-purge", bad=True, up=ROLLED_BACK,
        down=ROLLED_BACK),
    Cut("state write: rolled back", write="rolled-back", bad=True, up=ROLLED_BACK,
        down=ROLLED_BACK),
]


@pytest.fixture
def world(tmp_path: Path, box_factory: Any) -> Iterator[World]:
    for tool in (*DPKG_TOOLS, "awk"):
        require_tool(tool)
    sim = RepoSim(tmp_path / "repo")
    server = FaultServer(sim.path).start()
    w = World(tmp_path, sim, server, box_factory(server.url, sim.anchor))
    try:
        yield w
    finally:
        server.stop()
        w.server.stop()  # restarted by the test


class StallingServer(ThreadingHTTPServer):
    """Serves files from ``root`` plainly, but sends only the first half of a package and
    then holds the connection open until :meth:`stop` (a transfer the power cut interrupts).
    """

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.root = root
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class _StallingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StallingServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.server.root / self.path.lstrip("/")
        if ".." in self.path or not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not self.path.startswith("/packages/"):
            self.wfile.write(data)
            return
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        self.server.release.wait(60)
        self.close_connection = True


#: The package must span several of the fetcher's 64 KiB reads for a prefix to reach disk.
BIG_FILE = os.urandom(3 * 64 * 1024)


def publish_cut_v2(w: World, cut: Cut) -> None:
    """Release 2 with the power cut built in where ``cut`` says."""
    scripts: dict[str, dict[str, str]] = {"alpha": {}, "beta": {}}
    if cut.midway:
        w.publish(2, [w.deb("alpha", "2.0", files={"usr/share/alpha/big": BIG_FILE}),
                      w.deb("beta", "1.0")])
        return
    run, health = 'echo "run $OPQ_UPDATE_VERSION"', "echo healthcheck"
    if cut.inside in ("run", "healthcheck"):
        # the script is cut off midway: it started, then the power went
        body = f'echo "{cut.inside} started"\n{POWERCUT}\necho "{cut.inside} finished"'
        run, health = (body, health) if cut.inside == "run" else (run, body)
    elif cut.inside:
        deb, script = cut.inside.split(".")
        scripts[deb][script] = POWERCUT
    if cut.bad:
        health = "echo 'healthcheck failing'; exit 1"
    publish_v2(w, run=run, healthcheck=health, alpha=scripts["alpha"], beta=scripts["beta"])


def cut_power(w: World, cut: Cut) -> subprocess.CompletedProcess[str]:
    """The run during which the power goes; returns it (killed by SIGKILL)."""
    if cut.midway:
        return cut_power_midway(w)
    env = {**os.environ, CUT_ENV: str(w.tmp / "powercut-done")}
    argv = ["--config", str(w.box.config_path), "run"]
    if cut.fault:
        env[FAULT_ENV] = cut.fault
    if cut.write:
        env["OPQ_TEST_CUT_WRITE"] = cut.write
        cmd = [PY, "-c", WRITE_CUTTER, *argv]
    else:
        cmd = [PY, "-m", "opq_box_updater.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def cut_power_midway(w: World) -> subprocess.CompletedProcess[str]:
    """Kill the updater once the first 64 KiB of the package are in its ``.part`` file."""
    stalling = StallingServer(w.sim.path)
    w.box.server_url = stalling.url
    w.box.write_config()
    try:
        proc = subprocess.Popen([PY, "-m", "opq_box_updater.cli", "--config",
                                 str(w.box.config_path), "run"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= 64 * 1024 for p in w.box.download_dir.glob("*.part")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stalling.stop()
        w.box.server_url = w.server.url
        w.box.write_config()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def state_doc(w: World) -> dict[str, Any]:
    return dict(json.loads((w.box.state_dir / "state.json").read_bytes()))


def assert_converged(w: World, version: int, *, failed: list[int]) -> dict[str, Any]:
    """Release ``version`` fully installed, dpkg clean, state consistent with it; returns
    ``status --json``."""
    status = w.assert_clean(NEW if version == 2 else OLD)
    assert status["installed_version"] == version
    assert status["failed_versions"] == failed
    assert status["unrestored_packages"] == []
    assert status["applied_packages"] == (NEW if version == 2 else OLD)
    if version == 2:  # what the next update needs to roll back to
        assert {p.name for p in (w.box.state_dir / "debs").iterdir()} >= {
            "alpha_2.0_all.deb", "beta_1.0_all.deb"}
    return status


@pytest.mark.parametrize("server", ["up", "down"])
@pytest.mark.parametrize("cut", MATRIX, ids=str)
def test_power_cut_then_the_next_run_converges(world: World, cut: Cut, server: str) -> None:
    w = world
    install_v1(w)
    publish_cut_v2(w, cut)

    proc = cut_power(w, cut)
    assert proc.returncode == -9, f"the power cut never came:\n{proc.stderr}"
    if cut.inside:
        assert (w.tmp / "powercut-done").exists()
    if cut.write:  # killed between the temp file and the rename: old state.json, temp left
        assert list(w.box.state_dir.glob(".state.json.*")), "no leftover temp file"
        if cut.write == "applying":
            assert state_doc(w)["journal"]["phase"] == "downloading"
    if cut.midway:
        part = next(w.box.download_dir.glob("*.part"))
        assert state_doc(w)["journal"]["phase"] == "downloading"
        served = len(w.server.log)
    left = (w.installed(), state_doc(w)["journal"]["phase"])
    if server == "down":
        w.server.stop()

    code, version = cut.up if server == "up" else cut.down
    proc = w.run("run", expect=code)
    if cut.midway and server == "up":  # resumed where the power cut left it
        assert [r.headers.get("Range") for r in w.server.log[served:]
                if r.path.startswith("/packages/")] == ["bytes=65536-"]
    elif cut.midway:  # kept for the next run
        assert part.stat().st_size >= 64 * 1024
    rolled_back = code == APPLY_FAILED
    status = assert_converged(w, version, failed=[2] if cut.bad else [])
    if rolled_back:
        assert "release 2 failed and was rolled back" in proc.stderr
        assert status["last_result"] == "apply-failed"
    if rolled_back and not cut.bad:
        assert "retried on the next run (interruption 1 of 3)" in proc.stderr
    if cut.inside in ("run", "healthcheck") and version == 2:
        assert f"{cut.inside} finished" in w.lines()  # completed on recovery, not skipped
    report(cut, server, left, proc, status)

    # Whatever happened, a later run with a working server lands where a run without a
    # power cut would have: release 2, unless it failed by itself.
    if server == "down":
        restart(w)
    w.run("run", expect=OK)
    assert_converged(w, 1 if cut.bad else 2, failed=[2] if cut.bad else [])
    leftovers = [p.name for p in w.box.download_dir.iterdir() if p.is_dir()]
    assert leftovers == [], f"extraction directories left behind: {leftovers}"


def report(cut: Cut, server: str, left: tuple[dict[str, str], str],
           proc: subprocess.CompletedProcess[str], status: dict[str, Any]) -> None:
    """With ``OPQ_POWERCUT_REPORT=FILE``, append what the next run did as a JSON line (the
    table in docs/reliability.md is made from it)."""
    path = os.environ.get("OPQ_POWERCUT_REPORT")
    if not path:
        return
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    entry = {"cut": cut.where, "server": server, "dpkg_after_cut": left[0],
             "journal_after_cut": left[1], "exit": proc.returncode,
             "installed_version": status["installed_version"],
             "last_result": status["last_result"], "failed_versions": status["failed_versions"],
             "stderr": lines}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")


def restart(w: World) -> None:
    """Serve the repository again (a new port, so the box's configuration follows)."""
    w.server = FaultServer(w.sim.path).start()
    w.box.server_url = w.server.url
    w.box.write_config()


# --- what a recovery that committed must leave behind ------------------------------------------


def test_a_release_committed_by_recovery_can_itself_be_rolled_back(world: World) -> None:
    """Recovery keeps the applied debs like a normal commit: release 3 failing later must
    find alpha 2.0 and beta 1.0 in the rollback cache."""
    w = world
    install_v1(w)
    publish_v2(w)
    assert cut_power(w, Cut("commit", fault="commit")).returncode == -9
    w.run("run", expect=OK)
    w.assert_clean(NEW)

    w.publish(3, [w.deb("alpha", "3.0"), w.deb("beta", "3.0")], healthcheck="exit 1")
    proc = w.run("run", expect=APPLY_FAILED)
    assert "could not restore" not in proc.stderr
    assert_converged(w, 2, failed=[3])


def test_a_forced_retry_cut_at_commit_is_no_longer_failed(world: World) -> None:
    w = world
    install_v1(w)
    hook = w.hook("pre-invoke.d", "50-fail", "exit 1")
    publish_v2(w)
    w.run("run", expect=APPLY_FAILED)
    hook.unlink()
    env = {**os.environ, FAULT_ENV: "commit"}
    proc = subprocess.run([PY, "-m", "opq_box_updater.cli", "--config", str(w.box.config_path),
                           "run", "--force"], capture_output=True, text=True, env=env)
    assert proc.returncode == -9, proc.stderr
    w.run("run", expect=OK)
    assert_converged(w, 2, failed=[])


def test_a_dry_run_cut_short_leaves_nothing_after_the_next_update(world: World) -> None:
    w = world
    install_v1(w)
    publish_v2(w)
    env = {**os.environ, FAULT_ENV: "extract"}
    proc = subprocess.run([PY, "-m", "opq_box_updater.cli", "--config", str(w.box.config_path),
                           "run", "--dry-run"], capture_output=True, text=True, env=env)
    assert proc.returncode == -9, proc.stderr
    assert [p.name[:8] for p in w.box.download_dir.iterdir() if p.is_dir()] == ["dry-run-"]
    w.assert_clean(OLD)
    w.run("run", expect=OK)
    assert_converged(w, 2, failed=[])
    assert [p for p in w.box.download_dir.iterdir() if p.is_dir()] == []


def test_an_apply_interrupted_three_times_counts_as_failed(world: World) -> None:
    """Flaky power retries a release; one that is cut off on every try is given up on after
    the third interruption (and ``--force`` still retries it)."""
    w = world
    install_v1(w)
    publish_v2(w)
    env = {**os.environ, FAULT_ENV: "apply"}
    cmd = [PY, "-m", "opq_box_updater.cli", "--config", str(w.box.config_path), "run"]
    for count in (1, 2, 3):
        cut = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert cut.returncode == -9, cut.stderr
        recovery = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert recovery.returncode == APPLY_FAILED, recovery.stderr
        status = assert_converged(w, 1, failed=[2] if count == 3 else [])
        if count < 3:
            assert f"(interruption {count} of 3)" in recovery.stderr
        else:
            assert "interrupted 3 times, it now counts as failed" in recovery.stderr
    proc = w.run("run", expect=OK)
    assert w.box.status()["last_result"] == "skipped-failed", proc.stderr
    w.run("run", "--force", expect=OK)
    assert_converged(w, 2, failed=[])
    assert status["installed_version"] == 1


def test_a_release_that_kills_the_box_every_time_is_given_up_on(world: World) -> None:
    """The health check kills the updater on every run, recoveries included: each recovery
    counts before it runs anything, so the third rolls back without trying again."""
    w = world
    install_v1(w)
    kill_always = POWERCUT.replace(f'[ ! -e "${CUT_ENV}" ]', "true")
    publish_v2(w, healthcheck=f"echo healthcheck\n{kill_always}")
    env = {**os.environ, CUT_ENV: str(w.tmp / "powercut-done")}
    cmd = [PY, "-m", "opq_box_updater.cli", "--config", str(w.box.config_path), "run"]
    for _ in range(3):  # the apply, then two recoveries, each killed by the health check
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == -9, proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == APPLY_FAILED, proc.stderr
    assert "interrupted 3 times, it now counts as failed" in proc.stderr
    assert_converged(w, 1, failed=[2])
    w.run("run", expect=OK)
    assert w.box.status()["last_result"] == "skipped-failed"


def test_an_update_torn_by_the_power_cut_is_rolled_back_not_committed(world: World) -> None:
    """Extracted files are not fsynced: if the cut tore them, recovery cannot run the
    package's run script and health check, so it must not commit."""
    w = world
    install_v1(w)
    publish_v2(w)
    assert cut_power(w, Cut("before-health", fault="before-health")).returncode == -9
    workdir = Path(state_doc(w)["journal"]["workdir"])
    for deb in workdir.glob("*.deb"):
        deb.write_bytes(deb.read_bytes()[:100])  # what a lost write-back leaves
    w.run("run", expect=APPLY_FAILED)
    assert_converged(w, 1, failed=[])  # torn by a cut, not failed: retried
    w.run("run", expect=OK)
    assert_converged(w, 2, failed=[])
