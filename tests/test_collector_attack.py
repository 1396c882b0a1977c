"""Attacks on the collector that once broke it (issue 10 review): box ids that PostgreSQL
cannot hold or that mimic another box in the operator's table, workers opening a fresh
SQLite store at once, and a flood of conflicts the fleet page loaded whole."""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from opq_box_updater import reporting
from opq_box_updater.publish.collector import Collector
from opq_box_updater.publish.reports import RateLimiter, receive
from opq_box_updater.publish.store import SqlStore, import_json_reports, open_store

NOW = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/reports.db"
    pg = request.getfixturevalue("pg_server")
    pg.reset()
    return str(pg.dsn)


def signed(box_id: str, report: dict[str, Any] | None = None, counter: int = 1) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    envelope = reporting.sign_report(report or {"result": "updated"}, box_id,
                                     Ed25519PrivateKey.generate(), counter, NOW)
    return json.dumps(envelope).encode()


def get(app: Collector, path: str) -> int:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
               "REMOTE_ADDR": "192.0.2.9", "wsgi.input": io.BytesIO(b"")}
    answer: list[int] = []
    b"".join(app(environ, lambda status, headers: answer.append(int(status.split()[0]))))
    return answer[0]


HOSTILE_IDS = ["box\x00-1", "box-1 ", " box-1", "box-1\n", "box\x1b[2J-1", "box\x85-1"]


def test_box_ids_with_controls_or_surrounding_space_are_refused_on_both_back_ends(
        store_url: str) -> None:
    """NUL in a box id made PostgreSQL's driver raise (a 500 for the box, the page and
    serve); a trailing space or newline made a second "box-1" row the operator could not
    tell from the real one. No real box sends either (the updater strips its box id)."""
    store = open_store(store_url)
    try:
        for box_id in HOSTILE_IDS:
            for allow_unsigned, body in ((False, signed(box_id)),
                                         (True, json.dumps({"box_id": box_id}).encode())):
                answer = receive(store, body, "192.0.2.9", NOW, RateLimiter(),
                                 allow_unsigned=allow_unsigned)
                assert answer.status == 400, (box_id, answer)
                assert "control characters" in answer.message
        assert (store.report_count(), store.boxes()) == (0, [])
        # Hostile text inside the report is kept as it came (the page escapes it).
        report = {"result": "failed", "error": "a\x00b\x1b[2J\u202e"}
        assert receive(store, signed("box-1", report), "192.0.2.9", NOW,
                       RateLimiter()).status == 204
        [record] = store.latest()
        assert record.report["error"] == report["error"]
        assert store.history("box\x00-1") == [] and store.box("box\x00-1") is None
    finally:
        store.close()
    app = Collector(store_url, clock=lambda: NOW)
    assert get(app, "/box/box-1") == 200
    assert get(app, "/box/box\x00-1") == 404  # was a 500 on PostgreSQL


def test_old_json_reports_with_hostile_box_ids_are_not_imported(tmp_path: Path) -> None:
    folder = tmp_path / ".reports"
    folder.mkdir()
    for name, box_id in (("a", "box\x00-1"), ("b", "box-1 "), ("c", "box-1")):
        (folder / f"{name}.json").write_text(json.dumps(
            {"received": "2031-01-02T03:04:05Z", "remote": "-",
             "report": {"box_id": box_id, "result": "updated"}}), encoding="utf-8")
    store = open_store(f"sqlite:///{tmp_path}/reports.db")
    assert import_json_reports(store, folder) == 1
    assert [r.box_id for r in store.latest()] == ["box-1"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.json", "c.json.imported"]


def test_a_worker_opening_a_fresh_sqlite_store_while_another_migrates_waits(
        tmp_path: Path) -> None:
    """Two gunicorn workers on a fresh database: the one that finds the other inside its
    first transaction used to fail at once ("database is locked": SQLite does not wait for
    the switch to WAL), a 503 for the box whose report it had."""
    path = tmp_path / "reports.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the other worker, migrating (still journal mode)
    other.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    timer = threading.Timer(0.5, other.execute, ("COMMIT",))
    timer.start()
    try:
        store = open_store(f"sqlite:///{path}")
    finally:
        timer.join()
        other.close()
    assert store.report_count() == 0
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    store.close()


def test_the_page_and_boxes_list_read_a_bounded_number_of_conflicts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Anyone can sign conflicts (a new key per report escapes the rate limit): up to 100
    per box id. The page and ``boxes list`` read every one of them on each view; they now
    read the newest few and count the rest."""
    from opq_box_updater.publish import fleet, fleetpage
    from opq_box_updater.publish.cli import main
    from opq_box_updater.publish.store import CONFLICT, ReportRecord

    url = f"sqlite:///{tmp_path}/reports.db"
    store = open_store(url)
    assert isinstance(store, SqlStore)
    assert receive(store, signed("box-1"), "192.0.2.9", NOW, RateLimiter()).status == 204
    many = fleet.CONFLICTS_LISTED + 5
    with store._write() as cur:  # one transaction: a thousand durable commits take seconds
        for n in range(many):
            store._insert(cur, ReportRecord("box-1", NOW, "192.0.2.66",
                                            {"last_result": f"forged {n}"}, CONFLICT,
                                            f"{n:064x}", 1, NOW, "00" * 32))
    largest: list[int] = []
    read = store._read

    def counting(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        rows = read(sql, args)
        largest.append(len(rows))
        return rows

    store._read = counting  # type: ignore[method-assign]
    app = Collector(url, clock=lambda: NOW)
    app._store = store
    status, page = get_page(app, "/")
    assert status == 200 and f"{many} conflicting reports" in page
    assert page.count("forged ") == fleetpage.CONFLICTS_SHOWN and f"forged {many - 1}" in page
    assert max(largest) <= fleetpage.CONFLICTS_SHOWN
    store.close()
    assert main(["boxes", "list", "--store", url]) == 0
    out = capsys.readouterr().out
    assert f"{many} conflict(s), the newest {fleet.CONFLICTS_LISTED} shown" in out
    assert out.count(" key 0000") == fleet.CONFLICTS_LISTED


def get_page(app: Collector, path: str) -> tuple[int, str]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
               "REMOTE_ADDR": "192.0.2.9", "wsgi.input": io.BytesIO(b"")}
    answer: list[int] = []
    body = b"".join(app(environ, lambda status, headers: answer.append(
        int(status.split()[0]))))
    return answer[0], body.decode("utf-8")


@pytest.mark.parametrize("body", [b'{"box_id": "box\\ud800"}',
                                  b'{"box_id": "box-1", "error": "\\udfff"}'])
def test_serve_answers_400_to_a_lone_surrogate(tmp_path: Path, body: bytes) -> None:
    """It parses as JSON but has no UTF-8: the store raised UnicodeEncodeError out of
    receive(), and serve's request thread died without an answer."""
    store = open_store(f"sqlite:///{tmp_path}/reports.db")
    answer = receive(store, body, "192.0.2.9", NOW, RateLimiter(), allow_unsigned=True)
    assert answer.status == 400 and store.report_count() == 0
    store.close()


def test_a_silent_postgresql_host_fails_the_request_instead_of_holding_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database host that never answers (down behind a firewall): connecting waited for
    minutes, past gunicorn's worker timeout. Now a StoreError (the collector's 503)."""
    pytest.importorskip("psycopg2")
    from opq_box_updater.publish import store as store_mod

    monkeypatch.setattr(store_mod, "PG_CONNECT_TIMEOUT", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts the TCP connection, never says a word
        port = silent.getsockname()[1]
        outcome: list[BaseException] = []

        def connect() -> None:
            try:
                open_store(f"postgresql://opq@127.0.0.1:{port}/opq")
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)

        worker = threading.Thread(target=connect, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "still connecting after 60 s"
    assert len(outcome) == 1 and isinstance(outcome[0], store_mod.StoreError), outcome
