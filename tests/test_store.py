"""The report store (publish/store.py) on SQLite and on a real PostgreSQL: migrations, TOFU
key learning, counters against replay, conflicts kept apart, the operator's box commands,
and concurrent writers (gunicorn's workers) deciding one counter once."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from opq_box_updater.publish import fleetpage, fleetweb
from opq_box_updater.publish import store as store_mod
from opq_box_updater.publish.store import (
    ACCEPTED,
    CONFLICT,
    FULL,
    REJECTED,
    REKEY,
    REPLAYED,
    TRUSTED,
    UNSIGNED,
    ReportRecord,
    SqlStore,
    StoreError,
    default_store_url,
    open_repo_store,
    open_store,
)

NOW = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
KEY_A, KEY_B = "a" * 64, "b" * 64


def signed(box: str, counter: int, key: str = KEY_A, *, at: datetime = NOW,
           **report: Any) -> ReportRecord:
    return ReportRecord(box, at, "127.0.0.1", {"box_id": box, **report}, ACCEPTED,
                        key_id=key, counter=counter, timestamp=at, public_key="p" + key)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/reports.db"
    else:
        pg = request.getfixturevalue("pg_server")
        pg.reset()
        url = pg.dsn
    opened = open_store(url)
    assert isinstance(opened, SqlStore)
    yield opened
    opened.close()


def test_first_report_teaches_the_key_then_only_that_key_counts(store: SqlStore) -> None:
    assert store.admit(signed("box-1", 5, result="updated")) == ACCEPTED
    box = store.box("box-1")
    assert box is not None and (box.state, box.key_id, box.counter) == (TRUSTED, KEY_A, 5)
    assert store.admit(signed("box-1", 6, result="up-to-date")) == ACCEPTED
    # Another key for the same box id: kept as a conflict, the box's key and counter stay.
    assert store.admit(signed("box-1", 99, KEY_B, result="forged")) == CONFLICT
    box = store.box("box-1")
    assert box is not None and (box.key_id, box.counter) == (KEY_A, 6)
    assert [r.report["result"] for r in store.latest()] == ["up-to-date"]
    [conflict] = store.conflicts()
    assert (conflict.status, conflict.key_id, conflict.report["result"]) == \
        (CONFLICT, KEY_B, "forged")
    assert [r.status for r in store.history("box-1")] == [CONFLICT, ACCEPTED, ACCEPTED]


@pytest.mark.parametrize("counter", [6, 5, 0, -1])
def test_a_counter_not_above_the_last_is_a_replay_and_stores_nothing(
        store: SqlStore, counter: int) -> None:
    assert store.admit(signed("box-1", 6)) == ACCEPTED
    assert store.admit(signed("box-1", counter, result="again")) == REPLAYED
    assert store.report_count() == 1
    box = store.box("box-1")
    assert box is not None and box.counter == 6


def test_history_is_kept_newest_first_and_latest_is_per_box(store: SqlStore) -> None:
    for n in range(1, 6):
        assert store.admit(signed("box-1", n, at=NOW + timedelta(hours=n), run=n)) == ACCEPTED
    assert store.admit(signed("box-2", 1, KEY_B, run=1)) == ACCEPTED
    store.add(ReportRecord("dev-box", NOW, "::1", {"box_id": "dev-box"}, UNSIGNED, None))
    assert [r.report["run"] for r in store.history("box-1")] == [5, 4, 3, 2, 1]
    assert [r.report["run"] for r in store.history("box-1", limit=2)] == [5, 4]
    latest = store.latest()
    assert [(r.box_id, r.status) for r in latest] == \
        [("box-1", ACCEPTED), ("box-2", ACCEPTED), ("dev-box", UNSIGNED)]
    assert latest[0].report["run"] == 5 and latest[0].received == NOW + timedelta(hours=5)
    assert latest[0].timestamp == NOW + timedelta(hours=5) and latest[0].counter == 5


def test_reject_refuses_everything_until_accepted(store: SqlStore) -> None:
    assert store.admit(signed("box-1", 1)) == ACCEPTED
    assert store.reject("box-1").state == REJECTED
    assert store.admit(signed("box-1", 2)) == REJECTED
    assert store.admit(signed("box-1", 3, KEY_B)) == REJECTED
    assert store.report_count() == 1
    back = store.accept("box-1", None)
    assert (back.state, back.key_id, back.counter) == (TRUSTED, KEY_A, 1)
    assert store.admit(signed("box-1", 2)) == ACCEPTED


def test_rekey_learns_the_next_key_with_a_fresh_counter(store: SqlStore) -> None:
    assert store.admit(signed("box-1", 40)) == ACCEPTED
    forgotten = store.rekey("box-1")
    assert (forgotten.state, forgotten.key_id, forgotten.counter) == (REKEY, KEY_A, 40)
    assert store.admit(signed("box-1", 40, KEY_A)) == REPLAYED  # captured before the rekey
    assert store.admit(signed("box-1", 3, KEY_A)) == REPLAYED
    assert store.box("box-1").state == REKEY  # type: ignore[union-attr]
    assert store.admit(signed("box-1", 1, KEY_B)) == ACCEPTED  # a reinstalled box
    box = store.box("box-1")
    assert box is not None and (box.state, box.key_id, box.counter) == (TRUSTED, KEY_B, 1)
    assert store.admit(signed("box-1", 41, KEY_A)) == CONFLICT  # the old key is out


def test_after_a_rekey_the_old_key_goes_on_only_with_a_newer_counter(store: SqlStore) -> None:
    """Rekeyed although the box kept its key: its next real report still counts."""
    assert store.admit(signed("box-1", 40)) == ACCEPTED
    store.rekey("box-1")
    assert store.admit(signed("box-1", 41, KEY_A)) == ACCEPTED
    box = store.box("box-1")
    assert box is not None and (box.state, box.key_id, box.counter) == (TRUSTED, KEY_A, 41)


def test_accept_takes_a_key_seen_in_a_conflict(store: SqlStore) -> None:
    assert store.admit(signed("box-1", 40)) == ACCEPTED
    assert store.admit(signed("box-1", 1, KEY_B)) == CONFLICT
    with pytest.raises(StoreError, match="no key"):
        store.accept("box-1", "c" * 16)  # never seen
    with pytest.raises(StoreError, match="no key"):
        store.accept("box-1", "b" * 7)  # too short a prefix
    box = store.accept("box-1", "B" * 8)
    assert (box.key_id, box.public_key, box.counter) == (KEY_B, "p" + KEY_B, 0)
    assert store.admit(signed("box-1", 2, KEY_B)) == ACCEPTED
    assert store.admit(signed("box-1", 41, KEY_A)) == CONFLICT
    with pytest.raises(StoreError, match="no box"):
        store.reject("box-404")


def test_a_full_store_takes_no_new_box(store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "MAX_BOXES", 1)
    assert store.admit(signed("box-1", 1)) == ACCEPTED
    assert store.admit(signed("box-2", 1)) == FULL
    assert store.admit(signed("box-1", 2)) == ACCEPTED  # known boxes still report
    assert [b.box_id for b in store.boxes()] == ["box-1"] and store.report_count() == 2
    monkeypatch.setattr(store_mod, "MAX_CONFLICTS", 2)
    assert [store.admit(signed("box-1", 9, key * 64)) for key in "bcd"] == \
        [CONFLICT, CONFLICT, FULL]
    assert len(store.conflicts()) == 2


def test_concurrent_writers_accept_one_counter_once(store: SqlStore) -> None:
    """Eight threads (own connections, like gunicorn's workers) send the same counter of a
    new box, then of a known box: exactly one is accepted each time."""
    for counter in (1, 2):
        barrier = threading.Barrier(8)
        results: list[str] = []

        def send(counter: int = counter, barrier: threading.Barrier = barrier,
                 results: list[str] = results) -> None:
            barrier.wait()
            results.append(store.admit(signed("box-1", counter)))
            store.close()

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [ACCEPTED] + [REPLAYED] * 7
    assert store.report_count() == 2


def test_schema_is_migrated_once_and_a_newer_one_is_refused(store: SqlStore) -> None:
    assert store.migrate() == len(store_mod.MIGRATIONS)  # already current: nothing applied
    assert store.admit(signed("box-1", 1)) == ACCEPTED
    reopened = open_store(store.url)
    assert reopened.latest()[0].box_id == "box-1"
    reopened.close()
    with store._write() as cur:
        cur.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        open_store(store.url)


def test_a_version_1_store_is_migrated_with_its_history(store: SqlStore) -> None:
    """Migration 2 (the ``latest`` table) fills itself from the reports a version 1 store
    kept; new reports then keep it current."""
    assert store.admit(signed("box-1", 1, run=1)) == ACCEPTED
    assert store.admit(signed("box-1", 2, run=2)) == ACCEPTED
    assert store.admit(signed("box-1", 3, KEY_B, run=99)) == CONFLICT
    store.add(ReportRecord("dev", NOW, "-", {"box_id": "dev", "run": 7}, UNSIGNED, None))
    with store._write() as cur:  # back to what version 1 had
        cur.execute("DROP TABLE latest")
        cur.execute("DELETE FROM schema_version WHERE version > 1")
    reopened = open_store(store.url)
    assert [(r.box_id, r.report["run"]) for r in reopened.latest()] == [("box-1", 2),
                                                                        ("dev", 7)]
    assert reopened.admit(signed("box-1", 3, run=3)) == ACCEPTED
    assert [r.report["run"] for r in reopened.latest()] == [3, 7]
    reopened.close()


def test_sqlite_is_in_wal_mode_and_private(tmp_path: Path) -> None:
    url = default_store_url(tmp_path / "repo")
    assert url == f"sqlite:///{tmp_path}/repo/.reports/reports.db"
    opened = open_store(url)
    opened.add(ReportRecord("b", NOW, "-", {"box_id": "b"}, UNSIGNED, None))
    db = tmp_path / "repo" / ".reports" / "reports.db"
    assert db.stat().st_mode & 0o777 == 0o600
    assert (db.parent.stat().st_mode & 0o777) == 0o700
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    opened.close()


def test_the_operators_commands_never_make_an_empty_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/collector/reports.db"
    with pytest.raises(StoreError, match="no report store at"):
        open_store(url, create=False)
    assert not (tmp_path / "collector").exists()
    open_store(url).close()
    open_store(url, create=False).close()


@pytest.mark.parametrize("url", ["sqlite:///relative/reports.db", "mysql://x/y", "/tmp/x.db"])
def test_unknown_or_relative_store_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreError):
        open_store(url)


def test_old_json_reports_are_imported_once(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / ".reports"
    folder.mkdir(parents=True)
    (folder / "box-7.json").write_text(json.dumps(
        {"received": "2030-05-06T07:08:09Z", "remote": "10.0.0.7",
         "report": {"box_id": "box-7", "installed_version": 3}}))
    (folder / "broken.json").write_text("{not json")
    opened = open_repo_store(tmp_path / "repo")
    [record] = opened.latest()
    assert (record.box_id, record.status, record.remote, record.report["installed_version"]) \
        == ("box-7", UNSIGNED, "10.0.0.7", 3)
    assert not (folder / "box-7.json").exists() and (folder / "box-7.json.imported").exists()
    assert (folder / "broken.json").exists()
    opened.close()
    again = open_repo_store(tmp_path / "repo")
    assert len(again.history("box-7")) == 1
    again.close()


def test_root_keeps_the_collectors_database_its_own(tmp_path: Path) -> None:
    """``boxes`` run by root on the collector's SQLite file: the WAL files it makes belong
    to the database's owner (SQLite does this for root), or the collector's account could
    no longer write its own database."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root)")
    db = tmp_path / "reports.db"
    open_store(f"sqlite:///{db}").close()  # the collector made it; its WAL files are gone
    os.chown(db, 4242, 4243)
    again = open_store(f"sqlite:///{db}")
    sides = [tmp_path / "reports.db-wal", tmp_path / "reports.db-shm"]
    assert [(p.stat().st_uid, p.stat().st_gid) for p in sides] == [(4242, 4243)] * 2
    assert db.stat().st_mode & 0o777 == 0o600
    again.close()


# --- Paths that the suite above reaches only by chance (a lock held at the right moment,
# a missing module): each is driven here on purpose, so the module's coverage, and the
# behaviour behind it, do not depend on the timing of one run.

def test_a_second_opener_waits_for_the_wal_switch_instead_of_failing(tmp_path: Path) -> None:
    """A database locked by another writer while we switch to WAL: we wait and then
    switch, as a second gunicorn worker must while the first one migrates."""
    db = tmp_path / "reports.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    waited = threading.Event()
    real_sleep = store_mod.time.sleep

    def sleep_then_release(seconds: float) -> None:
        waited.set()
        holder.execute("COMMIT")
        real_sleep(seconds)

    conn = sqlite3.connect(db, timeout=0, isolation_level=None, check_same_thread=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_mod.time, "sleep", sleep_then_release)
        store_mod._wal_mode(conn)
    assert waited.is_set()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    holder.close()


def test_a_lock_held_past_the_deadline_is_an_error_not_a_hang(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "reports.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT", 0.2)
    with pytest.raises(StoreError, match=r"cannot open the report database.*locked"):
        open_store(f"sqlite:///{db}")
    holder.execute("COMMIT")
    holder.close()
    open_store(f"sqlite:///{db}").close()  # and works once the lock is gone


def test_an_error_other_than_a_lock_is_not_retried() -> None:
    calls: list[str] = []

    class Broken:
        def execute(self, sql: str) -> None:
            calls.append(sql)
            raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        store_mod._wal_mode(Broken())  # type: ignore[arg-type]
    assert calls == ["PRAGMA journal_mode=WAL"]


@pytest.mark.parametrize("value", [7, None, "", "x" * (store_mod.MAX_BOX_ID + 1),
                                   " box", "box\n", "bo\0x"])
def test_box_ids_a_real_box_never_sends_are_named(value: object) -> None:
    assert store_mod.box_id_problem(value) is not None


def test_box_ids_up_to_the_limit_are_kept() -> None:
    assert store_mod.box_id_problem("x" * store_mod.MAX_BOX_ID) is None
    assert store_mod.box_id_problem("box-1.campus") is None


def test_a_named_store_imports_no_old_json_reports(tmp_path: Path) -> None:
    """Only the repository's default store takes the development server's old files; a
    store named with --store belongs to someone else."""
    folder = tmp_path / "repo" / ".reports"
    folder.mkdir(parents=True)
    (folder / "box-7.json").write_text(json.dumps(
        {"received": "2030-05-06T07:08:09Z", "report": {"box_id": "box-7"}}))
    opened = open_repo_store(tmp_path / "repo", f"sqlite:///{tmp_path}/other.db")
    assert opened.latest() == []
    assert (folder / "box-7.json").exists()
    opened.close()


def test_postgresql_without_psycopg2_names_the_package(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "psycopg2", None)
    with pytest.raises(StoreError, match="apt-get install python3-psycopg2"):
        open_store("postgresql://nobody@localhost/opq")


def test_a_postgresql_url_with_its_own_connect_timeout_keeps_it(
        pg_server: Any) -> None:
    pg_server.reset()
    opened = open_store(pg_server.dsn + " connect_timeout=3")
    assert opened.latest() == []
    opened.close()


def test_a_read_that_fails_in_the_database_is_a_store_error_and_reconnects(
        tmp_path: Path) -> None:
    opened = open_store(f"sqlite:///{tmp_path}/reports.db")
    assert isinstance(opened, SqlStore)
    opened.add(ReportRecord("b", NOW, "-", {"box_id": "b"}, UNSIGNED, None))
    # Another process breaks the schema under the open connection.
    other = sqlite3.connect(tmp_path / "reports.db", isolation_level=None)
    other.execute("ALTER TABLE reports RENAME TO gone")
    other.close()
    with pytest.raises(StoreError, match=r"the report store failed .*try again"):
        opened.latest()
    assert getattr(opened._local, "conn", None) is None  # dropped: the next call reconnects
    opened.close()


def test_a_read_that_fails_outside_the_database_is_raised_as_is(tmp_path: Path) -> None:
    """Only database errors become the collector's "try again" (503); anything else is a
    bug and keeps its own type and traceback."""
    opened = open_store(f"sqlite:///{tmp_path}/reports.db")
    assert isinstance(opened, SqlStore)
    opened.add(ReportRecord("b", NOW, "-", {"box_id": "b"}, UNSIGNED, None))
    conn = opened._conn()

    class Cursor:
        def __init__(self) -> None:
            self.inner = conn.cursor()

        def execute(self, *args: Any) -> None:
            self.inner.execute(*args)

        def fetchall(self) -> list[Any]:
            raise KeyError("not a database error")

        def close(self) -> None:
            self.inner.close()

    class Conn:
        def cursor(self) -> Cursor:
            return Cursor()

    opened._local.conn = Conn()
    with pytest.raises(KeyError, match="not a database error"):
        opened.latest()
    opened._local.conn = conn
    assert [r.box_id for r in opened.latest()] == ["b"]
    opened.close()


def test_admit_takes_only_signed_reports(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="signed report"):
        store.admit(ReportRecord("b", NOW, "-", {"box_id": "b"}, UNSIGNED, None))
    assert store.latest() == []


def test_accept_without_a_key_needs_a_box_that_has_one(store: SqlStore) -> None:
    """A box row without a key (the schema allows it) cannot be accepted by its current
    key: the operator must name one seen in its conflicts."""
    with store._write() as cur:
        cur.execute(store._sql("INSERT INTO boxes (box_id, state, key_id, public_key, counter, "
                               "first_seen, last_seen) VALUES (?,?,?,?,?,?,?)"),
                    ("old", REJECTED, None, None, 0, "2031-01-01T00:00:00Z",
                     "2031-01-01T00:00:00Z"))
    with pytest.raises(StoreError, match="has no key to accept"):
        store.accept("old", None)
    box = store.box("old")
    assert box is not None and (box.state, box.key_id) == (REJECTED, None)


def test_the_fleet_page_holds_the_same_boxes_on_both_stores(store: SqlStore) -> None:
    """The page is cut from ``latest()`` in Python's code-point order, not the database's:
    a PostgreSQL cluster made in an ``en_US`` locale sorts ``Box-A`` after ``box-230``
    (here: the column given ICU's English collation), SQLite sorts it before."""
    ids = ([f"box-{n:03d}" for n in range(240)] + [f"Box-{c}" for c in "ABCDEFGHIJ"]
           + ["_x", "é", "Zulu"])
    with store._write() as cur:
        if store._postgres:
            cur.execute('ALTER TABLE latest ALTER COLUMN box_id TYPE TEXT COLLATE "en-x-icu"')
        for n, box in enumerate(ids):
            store._insert(cur, ReportRecord(
                box, NOW, "-", {"box_id": box, "installed_version": 1 + n % 2,
                                "last_result": "updated"}, UNSIGNED, None))
    if store._postgres:  # the database's own order does differ: the test means something
        assert [r.box_id for r in store.latest()][:2] == ["_x", "box-000"]
    expected = sorted(ids)
    size = fleetpage.PAGE_SIZE

    def listed(query: dict[str, list[str]]) -> list[str]:
        status, body, _ = fleetweb.fleet(store, query, None, NOW)
        assert status == 200
        return [unquote(href) for href in re.findall(r'<a href="box/([^"]*)">', body.decode())]

    assert listed({}) == expected[:size]
    assert listed({"page": ["2"]}) == listed({"page": ["99"]}) == expected[size:]
    release_1 = [b for n, b in enumerate(ids) if n % 2 == 0]
    assert listed({"release": ["1"]}) == sorted(release_1)
