"""Smoke test of the report-load benchmark (``make bench-reports``, bench/reports.py): a
small fleet through the real stack on both stores, and not one report lost. Throughput and
latency are printed, not asserted: they belong in docs/performance.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

PROJECT = Path(__file__).resolve().parent.parent
BOXES = 200


@pytest.mark.slow
def test_report_load_small_fleet_loses_nothing(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for tool in ("nginx", "gunicorn", "runuser"):
        require_tool(tool)
    proc = subprocess.run([sys.executable, "-m", "bench.reports", "--boxes", str(BOXES),
                           "--concurrency", "16", "--smoke", "--workdir", str(tmp_path)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines()
            if re.match(r"(sqlite|postgresql)\s+\d: ", line)]
    assert len(rows) == 4, proc.stdout
    for row in rows:
        assert re.search(rf"\s{BOXES}\s.*\s0  204 x{BOXES}$", row), row
    assert f"total: {4 * BOXES} reports, 0 lost" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "the scratch directory is removed"
    with capsys.disabled():
        print("\n" + proc.stdout)
