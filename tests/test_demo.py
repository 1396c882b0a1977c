"""`make demo` keeps working: install, upgrade, 304, rollback, skip, status, verify."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import require_tool

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_demo_runs_a_full_update_cycle(tmp_path: Path) -> None:
    require_tool("dpkg-deb")
    proc = subprocess.run([sys.executable, str(DEMO)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          timeout=300, env={**os.environ, "OPQ_DEMO_DIR": str(tmp_path / "d")})
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    installed = re.compile(r"^ii  opq-demo-app\s+(\S+)\s", re.M)
    assert installed.findall(out) == ["1.0", "1.1", "1.1"]
    assert "up to date (release 2)" in out
    assert "release 3 failed before; skipped" in out
    # After the broken release the sandbox is back on 1.1, never left on 1.2.
    tail = out[out.index("rolls back (exit 5)"):]
    assert installed.findall(tail) == ["1.1"]
