"""Smoke test of ``bench/`` (``make bench``): the tiny mode runs every benchmark end to end
and prints every line. Nothing is asserted about the figures: at these sizes they mean
nothing, and wall-clock numbers belong in docs/performance.md, not in a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

PROJECT = Path(__file__).resolve().parent.parent
#: One line per DESIGN 7 budget (bench/run.py NAMES).
LINES = (
    "no-op check: bytes on the wire",
    "resume after a cut at 50%: total bytes",
    "peak RSS: big package vs small",
    "download+verify vs curl -o (loopback)",
    "download+verify vs curl -o (40 Mbit/s)",
    "no-op check: CPU time vs requests.get",
    "no-op check: peak RSS vs requests.get",
    "publish release vs sha256sum",
)
ROW = re.compile(r"(?P<name>.+?)\s{2,}(?P<value>\S+ \S+)\s+(?P<baseline>.+?)\s+"
                 r"(?P<ratio>\d+\.\d{3})\s+(?P<goal><=?) (?P<limit>\d\.\d\d)\s+(PASS|MISS)$")


@pytest.mark.slow
def test_bench_tiny_prints_every_budget(tmp_path: Path) -> None:
    for tool in ("nginx", "curl", "sha256sum"):
        require_tool(tool)
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--workdir", str(tmp_path)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {m.group("name"): m for m in map(ROW.match, proc.stdout.splitlines()) if m}
    assert list(rows) == list(LINES), proc.stdout
    for name in LINES:
        assert f"* {name}: " in proc.stdout, f"no note for {name}"
    assert re.search(r"^8 budgets, \d PASS, \d MISS", proc.stdout, re.MULTILINE), proc.stdout
    assert list(tmp_path.iterdir()) == [], "the scratch directory is removed"
