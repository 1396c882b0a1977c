"""State files: atomic writes, corrupt-state recovery, the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opq_box_updater.errors import LockError
from opq_box_updater.fsutil import atomic_write
from opq_box_updater.state import ChannelState, Journal, Lock, State, Store


def test_state_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure_dirs()
    state = State(installed_channel="version.json",
                  channels={"version.json": ChannelState(installed_version=3, floor_version=4,
                                                          failed_versions=(2, 4),
                                                          floor_keys="ab12"),
                            "version-beta.json": ChannelState(floor_version=9,
                                                              floor_issued="2026-01-01T00:00:00Z",
                                                              interrupted_version=9,
                                                              interruptions=2)},
                  applied_packages={"a": "1.0"},
                  journal=Journal("applying", 4, 3, {"a": "0.9", "b": None}, {"a": "1.0"}))
    store.save(state)
    assert store.load() == state


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


@pytest.mark.parametrize("garbage", [b"", b"{", b'{"format": 99}', b'{"format": 1, "x": 1}',
                                     b'{"format": 1, "journal": {"phase": "dancing"}}'])
def test_corrupt_state_is_moved_aside_not_a_crash_loop(tmp_path: Path, garbage: bytes) -> None:
    store = Store(tmp_path)
    store.ensure_dirs()
    store.state_path.write_bytes(garbage)
    assert store.load() == State()
    assert not store.state_path.exists()
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from opq_box_updater.state import Lock;"
         "l = Lock(Path(sys.argv[1])); l.acquire(); print('held', flush=True); time.sleep(30)",
         str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError) as err:
            Lock(path).acquire()
        assert err.value.holder_pid == holder.pid
        assert f"pid {holder.pid}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    with Lock(path):  # released by the holder's death, as flock is
        assert path.read_text().strip() == str(os.getpid())


def test_deeply_nested_state_is_moved_aside_not_a_crash(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure_dirs()
    store.state_path.write_bytes(b"[" * 100000)
    assert store.load() == State()
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1
