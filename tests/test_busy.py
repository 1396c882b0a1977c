"""dpkg busy (apt running): an update is postponed, not failed; nothing changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Box, require_tool
from debs import dpkg_query, make_deb
from faultserver import FaultServer
from reposim import RepoSim

HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")


def test_update_postponed_while_dpkg_is_busy(tmp_path: Path, box_factory: object) -> None:
    require_tool("dpkg-deb")
    sim = RepoSim(tmp_path / "repo")
    sim.release(1, debs=[make_deb(tmp_path, "app", "1.0")])
    with FaultServer(sim.path) as server:
        box: Box = box_factory(server.url, sim.anchor,  # type: ignore[operator]
                               timeouts={"connect": 5, "read": 5, "total": 30,
                                         "dpkg_lock": 1})
        lock = box.dpkg_root / "var/lib/dpkg/lock-frontend"
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            proc = box.run("run")
            assert proc.returncode == 0, proc.stderr
            status = box.status()
            assert status["last_result"] == "postponed" and "busy" in status["last_message"]
            assert status["failed_versions"] == [] and status["installed_version"] == 0
            assert status["phase"] == "idle"
            assert dpkg_query(box.dpkg_root) == {}
        finally:
            holder.kill()
            holder.wait()
        proc = box.run("run")
        assert proc.returncode == 0, proc.stderr
        assert dpkg_query(box.dpkg_root) == {"app": "1.0"}
