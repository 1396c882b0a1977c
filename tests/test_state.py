"""State files: atomic writes, corrupt-state recovery, the lock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from opq_box_updater import state as state_module
from opq_box_updater.errors import LockError, StateError
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


# --- damaged and partial state files (issue 9: every branch of the parser and the store) ----

_GOOD = State(installed_channel="version.json",
              channels={"version.json": ChannelState(installed_version=2, floor_version=2)},
              journal=Journal("applying", 3, 2, {"a": "1"}, {"a": "2"}, before={"a": "x"},
                              scope=("a",))).to_json()


@pytest.mark.parametrize("doc", [
    b"[]", b'"state"', b'{"format": true}', b'{"format": 2.0}',
    b'{"format": 2, "journal": []}',
    b'{"format": 2, "channels": []}',
    b'{"format": 2, "channels": {"version.json": 3}}',
    b'{"format": 2, "channels": {"version.json": {"colour": 1}}}',
    b'{"format": 2, "channels": {"version.json": {"installed_version": -1}}}',
    b'{"format": 2, "channels": {"version.json": {"installed_version": true}}}',
    b'{"format": 2, "channels": {"version.json": {"failed_versions": [1, "2"]}}}',
    b'{"format": 2, "channels": {"version.json": {"floor_issued": "yesterday"}}}',
    b'{"format": 2, "time_floor": 5}',
    b'{"format": 2, "time_floor": "2026-13-01T00:00:00Z"}',
    b'{"format": 2, "installed_channel": 1}',
    b'{"format": 2, "applied_packages": {"a": 1}}',
    b'{"format": 2, "unrestored": "a"}',
    b'{"format": 2, "colour": "blue"}',
    b'{"format": 2, "journal": {"previous": {"a": 1}}}',
    b'{"format": 2, "journal": {"scope": [1]}}',
    b'{"format": 1, "installed_version": "3"}',
    _GOOD[:len(_GOOD) // 2],  # a torn write (atomic_write prevents it; a disk error may not)
    b"\xff\xfe{}",
], ids=lambda d: d[:40].decode("utf-8", "replace"))
def test_damaged_state_is_refused_by_status_and_moved_aside_by_a_run(tmp_path: Path,
                                                                     doc: bytes) -> None:
    """Every field is type-checked when read: a damaged file is a StateError for readers that
    do not hold the lock (the file left as it is) and a fresh start for a run."""
    store = Store(tmp_path)
    store.ensure_dirs()
    store.state_path.write_bytes(doc)
    with pytest.raises(StateError, match="is corrupt"):
        store.load(repair=False)
    assert store.state_path.read_bytes() == doc
    assert store.load() == State()
    assert [p.read_bytes() for p in tmp_path.glob("state.json.corrupt-*")] == [doc]


def test_journal_before_and_scope_survive_a_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure_dirs()
    store.state_path.write_bytes(_GOOD)
    state = store.load()
    assert (state.journal.before, state.journal.scope) == ({"a": "x"}, ("a",))
    assert state.installed_version == 2 and state.installed_for("version-beta.json") == 0


@pytest.mark.parametrize(("doc", "want"), [
    pytest.param({"installed_version": 4, "floor_version": 5, "failed_versions": [5],
                  "metadata_url": "https://r.example/version-beta.json"},
                 State(installed_channel="version-beta.json",
                       channels={"version-beta.json": ChannelState(4, 5, None, None, (5,))},
                       metadata_url="https://r.example/version-beta.json"),
                 id="installed-on-the-fetched-channel"),
    pytest.param({"installed_version": 0, "floor_version": 2},
                 State(channels={"version.json": ChannelState(floor_version=2)}),
                 id="nothing-installed-default-channel"),
    pytest.param({"metadata_url": ""}, State(metadata_url=""), id="no-channel-fields"),
    pytest.param({"installed_version": 1, "metadata_url": None,
                  "journal": {"phase": "applying", "target_version": 2, "previous_version": 1}},
                 State(installed_channel="version.json",
                       channels={"version.json": ChannelState(installed_version=1)},
                       journal=Journal("applying", 2, 1, channel="version.json")),
                 id="interrupted-apply-gets-the-channel"),
    pytest.param({"journal": {"phase": "idle"}}, State(), id="idle-journal-no-channel"),
])
def test_format_1_state_migrates_to_its_channel(tmp_path: Path, doc: dict[str, object],
                                                want: State) -> None:
    """A state written before channels (format 1): its versions and floors belong to the
    channel its validators came from, the default one when it never fetched."""
    store = Store(tmp_path)
    store.state_path.write_bytes(json.dumps({"format": 1, **doc}).encode())
    assert store.load(repair=False) == want


def test_unreadable_and_unwritable_state_files_are_state_errors(tmp_path: Path) -> None:
    """A state file that is a directory (or any I/O error) is a one-line StateError (exit 1),
    neither a traceback nor a silent fresh start that would reset the rollback floors."""
    store = Store(tmp_path)
    store.ensure_dirs()
    for path in (store.state_path, store.release_path, store.roots_dir / "5.root.json"):
        path.mkdir()
        (path / "keep").touch()
    with pytest.raises(StateError, match="cannot read"):
        store.load()
    with pytest.raises(StateError, match="cannot write"):
        store.save(State())
    with pytest.raises(StateError, match="cannot read"):
        store.load_release()
    with pytest.raises(StateError, match="cannot write"):
        store.save_release(b"{}")
    with pytest.raises(StateError, match="cannot store root v5"):
        store.save_root(5, b"{}")
    assert (store.state_path / "keep").exists()


def test_corrupt_state_that_cannot_be_moved_aside_is_a_state_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    store.ensure_dirs()
    store.state_path.write_bytes(b"{")
    monkeypatch.setattr(state_module, "utcnow", lambda: datetime(2026, 1, 2, 3, 4, 5))
    aside = tmp_path / "state.json.corrupt-20260102T030405"
    aside.mkdir()
    (aside / "keep").touch()
    with pytest.raises(StateError, match="cannot be moved aside"):
        store.load()
    assert store.state_path.read_bytes() == b"{"


def test_last_run_bookkeeping_never_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    store.ensure_dirs()
    assert store.load_last_run() == {}
    store.last_run_path.write_bytes(b"[1]")
    assert store.load_last_run() == {}
    store.last_run_path.write_bytes(b"{")
    assert store.load_last_run() == {}
    store.save_last_run({"last_result": "updated"})
    assert store.load_last_run() == {"last_result": "updated"}
    store.last_run_path.unlink()
    store.last_run_path.mkdir()
    (store.last_run_path / "keep").touch()
    store.save_last_run({"last_result": "updated"})  # logged, not raised
    assert "cannot write" in caplog.text


def test_stored_roots_are_the_numbered_files_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.stored_roots() == {}  # no roots directory yet
    store.ensure_dirs()
    for name in ("3.root.json", "10.root.json", "x.root.json", "4.json", "-1.root.json"):
        (store.roots_dir / name).write_bytes(b"{}")
    assert store.stored_roots() == {3: store.roots_dir / "3.root.json",
                                    10: store.roots_dir / "10.root.json"}


def test_state_directory_that_cannot_be_made_is_a_state_error(tmp_path: Path) -> None:
    store = Store(tmp_path / ("x" * 300))  # ENAMETOOLONG
    with pytest.raises(StateError, match="cannot create state directory"):
        store.ensure_dirs()


def test_lock_that_cannot_be_opened_or_taken_is_a_state_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(StateError, match="cannot open lock"):
        Lock(tmp_path / "dir").acquire()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match="cannot open lock"):
        Lock(tmp_path / "link").acquire()  # O_NOFOLLOW: never through a planted link
    assert not (tmp_path / "elsewhere").exists()

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(state_module.fcntl, "flock", no_locks)
    with pytest.raises(StateError, match="cannot lock"):
        Lock(tmp_path / "lock").acquire()


def test_lock_held_by_an_unknown_pid_and_released_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(fd: int, op: int) -> None:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    def unreadable(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    (tmp_path / "lock").write_text("not a pid\n")
    with monkeypatch.context() as m:
        m.setattr(state_module.fcntl, "flock", busy)
        with pytest.raises(LockError) as err:
            Lock(tmp_path / "lock").acquire()
        assert err.value.holder_pid is None and "pid" not in str(err.value)
        m.setattr(state_module.os, "pread", unreadable)
        with pytest.raises(LockError) as err:
            Lock(tmp_path / "lock").acquire()
        assert err.value.holder_pid is None
    lock = Lock(tmp_path / "lock")
    lock.acquire()
    lock.release()
    lock.release()  # a second release is a no-op
    assert (tmp_path / "lock").read_bytes() == b""
