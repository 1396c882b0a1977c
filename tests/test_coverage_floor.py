"""scripts/coverage-floor, which .ci/run uses to fail a run below a module's coverage floor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "coverage-floor"
MODULES = ("metadata", "package", "fetcher", "state", "trust", "installer", "guard", "updater",
           "localsource", "publish/export", "publish/rollout", "publish/stage", "publish/history",
           "publish/fleetpage", "publish/fleetweb", "publish/store", "publish/reports",
           "publish/collector", "reporting")


def run(tmp_path: Path, percents: dict[str, float]) -> subprocess.CompletedProcess[str]:
    data = {"files": {f"opq_box_updater/{m}.py": {"summary": {"percent_covered": p}}
                      for m, p in percents.items()}}
    path = tmp_path / "coverage.json"
    path.write_text(json.dumps(data))
    return subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True,
                          text=True, check=False)


def test_every_floor_met_passes(tmp_path: Path) -> None:
    proc = run(tmp_path, dict.fromkeys(MODULES, 100.0))
    assert proc.returncode == 0, proc.stderr


def test_one_module_below_its_floor_fails_and_is_named(tmp_path: Path) -> None:
    proc = run(tmp_path, {**dict.fromkeys(MODULES, 100.0), "trust": 80.0})
    assert proc.returncode == 1
    assert "trust.py: 80.0 % is below its floor" in proc.stderr


def test_an_unmeasured_module_fails(tmp_path: Path) -> None:
    proc = run(tmp_path, dict.fromkeys(MODULES[1:], 100.0))
    assert proc.returncode == 1
    assert "metadata.py: not measured" in proc.stderr


def test_missing_data_is_an_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.json")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
