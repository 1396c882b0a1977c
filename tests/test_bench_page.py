"""Smoke test of the fleet-page benchmark (``make bench-page``, bench/fleetpage.py): a small
fleet on SQLite, every view served with the rows it should have, and the one-table baseline
bigger than a page. Times are printed, never asserted: they belong in docs/performance.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from opq_box_updater.publish import fleetpage

PROJECT = Path(__file__).resolve().parent.parent

BOXES = fleetpage.PAGE_SIZE * 2 + 50


def test_the_page_benchmark_serves_every_view(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.fleetpage", "--boxes", str(BOXES),
                           "--repeat", "1", "--backend", "sqlite", "--no-browser",
                           "--workdir", str(tmp_path)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-2000:]
    rows = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(
        r"^sqlite\s+(one table|page 1|last page|filtered)\s+(\d+)\s+(\d+)\s", out, re.M)}
    failed = len(range(0, BOXES, 50))  # bench/fleetpage.py: every 50th box failed
    assert {view: shown for view, (shown, _) in rows.items()} == {
        "one table": BOXES, "page 1": fleetpage.PAGE_SIZE, "last page": 50,
        "filtered": failed}
    assert rows["one table"][1] > 2 * rows["page 1"][1]
    assert re.search(r"^sqlite\s+of which: reading .*\d+ms$", out, re.M)
    assert list(tmp_path.iterdir()) == [], "the scratch directory is removed"
    with capsys.disabled():
        print("\n" + out)
