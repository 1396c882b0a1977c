"""Where the collector keeps box reports and box keys: SQLite (default) or PostgreSQL.

One small interface (:class:`Store`), one schema and one list of migrations for both back
ends; the SQL is written once (``?`` placeholders, turned into ``%s`` for psycopg2) and the
only dialect differences are the id column and how a migration takes its lock. Every report
is kept (history); the ``boxes`` table holds what the collector trusts about each box: the
key it learned on the box's first report (TOFU), the highest counter it accepted, and
whether the operator rejected it.

Connections are opened lazily, one per thread (``serve`` is threaded; gunicorn forks its
workers after the application is imported, and a connection must not cross a fork).
SQLite runs in WAL mode, so the page and ``fleet`` read while a report is written, and every
writing transaction is ``BEGIN IMMEDIATE`` (one writer at a time, waiting up to
:data:`BUSY_TIMEOUT` seconds). PostgreSQL needs Debian's ``python3-psycopg2``, imported only
when a ``postgresql://`` URL is opened.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from ..errors import RepositoryError
from ..metadata import format_time, parse_time
from .common import PublishError

#: Report statuses. ``accepted``: signed by the box's known key with a new counter;
#: ``conflict``: validly signed, but by another key than the one the box id is known by
#: (stored and shown, never merged into the box's state); ``unsigned``: taken by the
#: development server (``serve``) without a signature.
ACCEPTED, CONFLICT, UNSIGNED = "accepted", "conflict", "unsigned"
#: What :meth:`Store.admit` can answer besides a stored status: the box was rejected by
#: the operator, the counter was not above the last accepted one, or the store is full.
REJECTED, REPLAYED, FULL = "rejected", "replayed", "full"
#: Box states: ``trusted`` (its key is known), ``rekey`` (the operator made the collector
#: forget the key; the next validly signed report's key is learned), ``rejected``.
TRUSTED, REKEY = "trusted", "rekey"
#: At most this many box ids; a flood of invented ids (anyone can make a key) stops here.
MAX_BOXES = 1_000_000
#: Conflicts kept per box id: enough to see and accept a re-keyed box, bounded against a
#: stranger who signs with endless new keys under a known box's id.
MAX_CONFLICTS = 100
BUSY_TIMEOUT = 30.0  # seconds a writer waits for another (SQLite) before failing
#: Seconds to connect to PostgreSQL (libpq's ``connect_timeout``, unless the URL sets one):
#: without it a database host that drops packets held each request for minutes, past
#: gunicorn's worker timeout (the worker killed, the box answered 502 by nginx).
PG_CONNECT_TIMEOUT = 10
SQLITE_PREFIX = "sqlite:///"
DB_NAME = "reports.db"
#: The collector's store: this environment variable (the systemd unit reads it from
#: /etc/default/opq-box-collector), else SQLite under /var/lib.
COLLECTOR_DB_ENV = "OPQ_COLLECTOR_DB"
DEFAULT_COLLECTOR_DB = SQLITE_PREFIX + "/var/lib/opq-box-collector/" + DB_NAME

#: The schema, as migrations applied in order; version N is ``MIGRATIONS[N - 1]``.
#: ``{id}`` is the only dialect-specific text: an auto-increasing integer primary key.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE boxes (
            box_id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            key_id TEXT,
            public_key TEXT,
            counter BIGINT NOT NULL DEFAULT 0,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL)""",
        """CREATE TABLE reports (
            id {id},
            box_id TEXT NOT NULL,
            received TEXT NOT NULL,
            remote TEXT NOT NULL,
            status TEXT NOT NULL,
            key_id TEXT,
            public_key TEXT,
            counter BIGINT,
            box_time TEXT,
            body TEXT NOT NULL)""",
        "CREATE INDEX reports_box ON reports (box_id, id)",
        "CREATE INDEX reports_status ON reports (status, id)",
    ),
    # 2: the newest accepted or unsigned report of each box, kept on every insert, so the
    # fleet table and page cost one row per box, not a scan of the whole history (0.8 s
    # for a million reports in SQLite without it).
    (
        "CREATE TABLE latest (box_id TEXT PRIMARY KEY, report_id BIGINT NOT NULL)",
        "INSERT INTO latest (box_id, report_id) SELECT box_id, MAX(id) FROM reports "
        "WHERE status IN ('accepted', 'unsigned') GROUP BY box_id",
    ),
)
#: Box ids the collector takes: DESIGN 3.5 allows any text, but a real box's id is its
#: machine-id, a generated hex id or a configured one with surrounding whitespace stripped.
MAX_BOX_ID = 256
_COLUMNS = "box_id, received, remote, status, key_id, public_key, counter, box_time, body"
_BOX_COLUMNS = "box_id, state, key_id, public_key, counter, first_seen, last_seen"


class StoreError(PublishError):
    """The report store cannot be opened or used (exit 2 from the CLI); says what to do."""


@dataclass(frozen=True)
class ReportRecord:
    """One report as the collector stored it. ``received`` is the server's clock (box
    clocks are often wrong); ``timestamp`` and ``counter`` are what a signed report said."""

    box_id: str
    received: datetime
    remote: str
    report: dict[str, Any]
    status: str  # ACCEPTED | CONFLICT | UNSIGNED
    key_id: str | None
    counter: int | None = None
    timestamp: datetime | None = None
    public_key: str | None = None  # hex; kept so that a conflict's key can be accepted


@dataclass(frozen=True)
class BoxRecord:
    """What the collector trusts about one box id."""

    box_id: str
    state: str  # TRUSTED | REKEY | REJECTED
    key_id: str | None
    public_key: str | None
    counter: int
    first_seen: datetime
    last_seen: datetime


class Store(Protocol):
    """The storage interface of the collector, ``serve``, ``fleet`` and ``boxes``."""

    url: str

    def add(self, record: ReportRecord) -> None:
        """Keep ``record`` as it is (no checks): unsigned reports, seeding, imports."""

    def admit(self, record: ReportRecord) -> str:
        """Decide a validly signed report against the box's known key and counter and keep
        it, in one transaction: returns ACCEPTED or CONFLICT (stored), REJECTED, REPLAYED
        or FULL (nothing stored)."""

    def latest(self) -> list[ReportRecord]:
        """The newest accepted (or unsigned) report of each box, by box id."""

    def history(self, box_id: str, limit: int = 100) -> list[ReportRecord]:
        """The box's reports of every status, newest first."""

    def conflicts(self, limit: int | None = None) -> list[ReportRecord]:
        """Reports stored as conflicts, newest first (at most ``limit``)."""

    def conflict_count(self) -> int:
        """How many reports are stored as conflicts."""

    def report_count(self) -> int:
        """How many reports are stored (all statuses)."""

    def boxes(self) -> list[BoxRecord]:
        """Every box the collector knows, by box id."""

    def box(self, box_id: str) -> BoxRecord | None:
        """One box, or None."""

    def accept(self, box_id: str, key_id: str | None) -> BoxRecord:
        """Trust ``key_id`` (a key seen in one of the box's conflicts; a unique prefix of 8
        or more digits will do) for the box from now on, or, without a key, take a rejected
        box back with its old key. Raises :class:`StoreError` when there is no such key."""

    def reject(self, box_id: str) -> BoxRecord:
        """Refuse every further report of the box (until ``accept``)."""

    def rekey(self, box_id: str) -> BoxRecord:
        """Let the box's next validly signed report teach a new key (a reinstalled box). A
        report of the old key counts only with a counter above the last one accepted, so a
        captured old report cannot be replayed to be learned again."""

    def close(self) -> None:
        """Close this thread's connection."""


def box_id_problem(value: object) -> str | None:
    """Why ``value`` is not a box id the store keeps, or None. Control characters (NUL
    above all: PostgreSQL's text cannot hold it, and the request died with a 500) and
    surrounding whitespace never come from a real box (the updater strips a configured
    id), only from someone making an id that looks like another box's in the operator's
    table."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_BOX_ID:
        return f"expected a box_id of 1 to {MAX_BOX_ID} characters"
    if value != value.strip() or any(unicodedata.category(ch) == "Cc" for ch in value):
        return "a box_id has no control characters and no surrounding whitespace"
    return None


def default_store_url(repo: Path) -> str:
    """Where ``serve``, ``fleet`` and ``rollout`` keep reports of a repository by default:
    ``REPO/.reports/reports.db`` (a dot-directory: ``serve`` and the shipped nginx
    configuration never serve it)."""
    return SQLITE_PREFIX + str((repo / ".reports" / DB_NAME).absolute())


def open_store(url: str, *, create: bool = True) -> Store:
    """A store for ``sqlite:///ABS/PATH.db`` or a PostgreSQL URL / DSN (``postgresql://…``,
    ``host=… dbname=…``), migrated to the current schema. Without ``create`` a SQLite
    file that does not exist yet is an error (the operator's commands only read the
    collector's store: they must not make an empty one where the collector keeps it)."""
    if url.startswith(SQLITE_PREFIX):
        path = Path(url.removeprefix(SQLITE_PREFIX))
        if not path.is_absolute():
            raise StoreError(f"{url}: a SQLite URL needs an absolute path "
                             "(sqlite:////var/lib/... has four slashes)")
        if not create and not path.exists():
            raise StoreError(f"no report store at {path}: is the collector running here? "
                             f"(--store URL or ${COLLECTOR_DB_ENV} name another)")
        return SqlStore(url, _sqlite_connect(path), "INTEGER PRIMARY KEY AUTOINCREMENT")
    if url.startswith(("postgresql://", "postgres://")) or "dbname=" in url:
        return SqlStore(url, _postgres_connect(url), "BIGSERIAL PRIMARY KEY", postgres=True)
    raise StoreError(f"unknown store {url!r}: use sqlite:////ABSOLUTE/PATH.db or "
                     "postgresql://USER@HOST/DB")


def collector_store_url(environ: Mapping[str, str]) -> str:
    """The collector's store URL: ``$OPQ_COLLECTOR_DB`` or :data:`DEFAULT_COLLECTOR_DB`."""
    return environ.get(COLLECTOR_DB_ENV) or DEFAULT_COLLECTOR_DB


def open_repo_store(repo: Path, url: str | None = None) -> Store:
    """The store ``serve`` and ``fleet`` use for ``repo``: ``url``, or
    :func:`default_store_url`. The per-box JSON files the development server kept before
    (``REPO/.reports/<box>.json``, the latest report of each box) are imported once into
    the default store, as unsigned reports, and renamed ``<box>.json.imported``."""
    store = open_store(url or default_store_url(repo))
    if url is None:
        import_json_reports(store, repo / ".reports")
    return store


def import_json_reports(store: Store, folder: Path) -> int:
    """Import ``folder/*.json`` (old ``serve`` reports); unreadable files are left as they
    are. Returns how many were imported."""
    count = 0
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            report = record["report"]
            if box_id_problem(report["box_id"]) is not None:
                continue
            store.add(ReportRecord(report["box_id"], parse_time(record["received"]),
                                   str(record.get("remote", "-")), dict(report), UNSIGNED,
                                   None))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RepositoryError):
            continue
        path.rename(path.with_name(path.name + ".imported"))
        count += 1
    return count


def _sqlite_connect(path: Path) -> Callable[[], Any]:
    def connect() -> sqlite3.Connection:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            _wal_mode(conn)
            # A 204 means on disk: the report, and the counter that refuses its replay.
            conn.execute("PRAGMA synchronous=FULL")
            path.chmod(0o600)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the report database {path}: {exc}") from None
        return conn
    return connect


def _wal_mode(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting like any writer: SQLite does not call its busy handler for
    this switch, so on a fresh database a second gunicorn worker that opened it while the
    first was migrating failed at once ("database is locked", a 503 for the box)."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _postgres_connect(url: str) -> Callable[[], Any]:
    def connect() -> Any:
        try:
            import psycopg2
        except ImportError:
            raise StoreError("a PostgreSQL store needs python3-psycopg2: "
                             "apt-get install python3-psycopg2") from None
        try:
            if "connect_timeout" in url:
                return psycopg2.connect(url)
            return psycopg2.connect(url, connect_timeout=PG_CONNECT_TIMEOUT)
        except psycopg2.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {str(exc).strip()}") from None
    return connect


class SqlStore:
    """:class:`Store` on a DB-API connection per thread (sqlite3 or psycopg2)."""

    def __init__(self, url: str, connect: Callable[[], Any], id_column: str,
                 postgres: bool = False) -> None:
        self.url = url
        self._connect = connect
        self._id_column = id_column
        self._postgres = postgres
        self._local = threading.local()
        self.migrate()

    # --- connections and transactions ----------------------------------------------------

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self._postgres else text

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One writing transaction; rolled back on any exception. A database error (the
        server restarted, the disk is full) drops this thread's connection, so the next
        call connects anew, and is raised as :class:`StoreError` (the collector's 503)."""
        conn = self._conn()
        cur = conn.cursor()
        try:
            if self._postgres:
                yield cur
                conn.commit()
            else:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                conn.rollback()
            self._raise_store_error(exc)
            raise
        finally:
            with contextlib.suppress(Exception):
                cur.close()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self._conn()
        try:
            cur = conn.cursor()
            try:
                cur.execute(self._sql(sql), args)
                rows = list(cur.fetchall())
            finally:
                cur.close()
            if self._postgres:
                conn.rollback()  # end the read transaction: no snapshot held between requests
        except Exception as exc:
            self._raise_store_error(exc)
            raise
        return rows

    def _raise_store_error(self, exc: BaseException) -> None:
        """A DB-API error as :class:`StoreError`, after dropping the connection; anything
        else is left to the caller to re-raise. The message never carries the URL (it may
        hold a password)."""
        if isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("psycopg2"):
            self.close()
            text = " ".join(str(exc).split())[:300]
            raise StoreError(f"the report store failed ({type(exc).__name__}: {text}); "
                             "try again") from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with contextlib.suppress(Exception):
                conn.close()

    def migrate(self) -> int:
        """Bring the schema to ``len(MIGRATIONS)``; returns the version found before. Safe
        when several workers start at once: the check and the migration are one locked
        transaction."""
        with self._write() as cur:
            if self._postgres:
                cur.execute("SELECT pg_advisory_xact_lock(8151)")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT MAX(version) FROM schema_version")
            found = cur.fetchone()[0] or 0
            if found > len(MIGRATIONS):
                raise StoreError(f"{self.url}: schema version {found} is newer than this "
                                 f"opq-box-publish knows ({len(MIGRATIONS)}); upgrade it")
            for version in range(found + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
                    cur.execute(statement.replace("{id}", self._id_column))
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"),
                            (version,))
        return int(found)

    # --- reports -------------------------------------------------------------------------

    def _insert(self, cur: Any, record: ReportRecord) -> None:
        cur.execute(self._sql(f"INSERT INTO reports ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?) "
                              "RETURNING id"),
                    (record.box_id, format_time(record.received), record.remote,
                     record.status, record.key_id, record.public_key, record.counter,
                     None if record.timestamp is None else format_time(record.timestamp),
                     json.dumps(record.report, sort_keys=True, ensure_ascii=False)))
        report_id = cur.fetchone()[0]
        if record.status in (ACCEPTED, UNSIGNED):
            cur.execute(self._sql(
                "INSERT INTO latest (box_id, report_id) VALUES (?, ?) ON CONFLICT (box_id) "
                "DO UPDATE SET report_id = CASE WHEN excluded.report_id > latest.report_id "
                "THEN excluded.report_id ELSE latest.report_id END"), (record.box_id, report_id))

    def add(self, record: ReportRecord) -> None:
        with self._write() as cur:
            self._insert(cur, record)

    def admit(self, record: ReportRecord) -> str:
        if record.key_id is None or record.public_key is None or record.counter is None:
            raise ValueError("admit() takes a signed report (key and counter)")
        seen = format_time(record.received)
        with self._write() as cur:
            box = self._box(cur, record.box_id, lock=True)
            if box is None:
                cur.execute("SELECT COUNT(*) FROM boxes")
                if cur.fetchone()[0] >= MAX_BOXES:
                    return FULL
                # Trust on first use. Another worker may learn the same box at this very
                # moment (PostgreSQL locks no row that does not exist yet): only one insert
                # wins, the others go on as for a known box.
                cur.execute(self._sql(
                    f"INSERT INTO boxes ({_BOX_COLUMNS}) VALUES (?,?,?,?,?,?,?) "
                    "ON CONFLICT (box_id) DO NOTHING"),
                    (record.box_id, TRUSTED, record.key_id, record.public_key,
                     record.counter, seen, seen))
                if cur.rowcount == 1:
                    self._insert(cur, _with_status(record, ACCEPTED))
                    return ACCEPTED
                box = self._box(cur, record.box_id, lock=True)
                assert box is not None
            if box.state == REJECTED:
                return REJECTED
            elif box.state == REKEY and record.key_id == box.key_id \
                    and record.counter <= box.counter:
                # The key the operator told us to forget, with a counter we already took:
                # a captured old report, which must not be learned again (and undo the rekey).
                return REPLAYED
            elif box.state == REKEY:
                cur.execute(self._sql("UPDATE boxes SET state = ?, key_id = ?, public_key = ?, "
                                      "counter = ?, last_seen = ? WHERE box_id = ?"),
                            (TRUSTED, record.key_id, record.public_key, record.counter, seen,
                             record.box_id))
            elif box.key_id != record.key_id:
                cur.execute(self._sql("SELECT COUNT(*) FROM reports WHERE box_id = ? AND "
                                      "status = ?"), (record.box_id, CONFLICT))
                if cur.fetchone()[0] >= MAX_CONFLICTS:
                    return FULL
                self._insert(cur, _with_status(record, CONFLICT))
                return CONFLICT
            elif record.counter <= box.counter:
                return REPLAYED
            else:
                cur.execute(self._sql("UPDATE boxes SET counter = ?, last_seen = ? "
                                      "WHERE box_id = ?"),
                            (record.counter, seen, record.box_id))
            self._insert(cur, _with_status(record, ACCEPTED))
        return ACCEPTED

    def latest(self) -> list[ReportRecord]:
        columns = ", ".join(f"r.{c.strip()}" for c in _COLUMNS.split(","))
        rows = self._read(f"SELECT {columns} FROM latest l JOIN reports r ON r.id = l.report_id "
                          "ORDER BY l.box_id")
        return [_record(row) for row in rows]

    def history(self, box_id: str, limit: int = 100) -> list[ReportRecord]:
        if "\0" in box_id:  # no box has one (box_id_problem); PostgreSQL cannot compare it
            return []
        rows = self._read(f"SELECT {_COLUMNS} FROM reports WHERE box_id = ? "
                          "ORDER BY id DESC LIMIT ?", (box_id, limit))
        return [_record(row) for row in rows]

    def conflicts(self, limit: int | None = None) -> list[ReportRecord]:
        # Up to MAX_CONFLICTS per box id, and anyone can make keys: the page and the
        # operator's table read a bounded number (they loaded every one on each view).
        rows = self._read(f"SELECT {_COLUMNS} FROM reports WHERE status = ? ORDER BY id DESC "
                          "LIMIT ?", (CONFLICT, -1 if limit is None and not self._postgres
                                      else limit))
        return [_record(row) for row in rows]

    def conflict_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM reports WHERE status = ?",
                              (CONFLICT,))[0][0])

    def report_count(self) -> int:
        """How many reports are stored (all statuses)."""
        return int(self._read("SELECT COUNT(*) FROM reports")[0][0])

    # --- boxes ---------------------------------------------------------------------------

    def _box(self, cur: Any, box_id: str, lock: bool = False) -> BoxRecord | None:
        suffix = " FOR UPDATE" if lock and self._postgres else ""
        cur.execute(self._sql(f"SELECT {_BOX_COLUMNS} FROM boxes WHERE box_id = ?{suffix}"),
                    (box_id,))
        row = cur.fetchone()
        return None if row is None else _box_record(row)

    def boxes(self) -> list[BoxRecord]:
        return [_box_record(row) for row in
                self._read(f"SELECT {_BOX_COLUMNS} FROM boxes ORDER BY box_id")]

    def box(self, box_id: str) -> BoxRecord | None:
        if "\0" in box_id:
            return None
        rows = self._read(f"SELECT {_BOX_COLUMNS} FROM boxes WHERE box_id = ?", (box_id,))
        return _box_record(rows[0]) if rows else None

    def _change(self, box_id: str, change: Callable[[Any, BoxRecord], None]) -> BoxRecord:
        with self._write() as cur:
            box = self._box(cur, box_id, lock=True)
            if box is None:
                raise StoreError(f"no box {box_id!r} has reported (see: boxes list)")
            change(cur, box)
            after = self._box(cur, box_id)
        assert after is not None
        return after

    def accept(self, box_id: str, key_id: str | None) -> BoxRecord:
        def change(cur: Any, box: BoxRecord) -> None:
            if key_id is None:
                if box.key_id is None:
                    raise StoreError(f"box {box_id!r} has no key to accept: name one seen "
                                     "in its conflicts with --key")
                self._set(cur, box_id, TRUSTED, box.key_id, box.public_key, box.counter)
                return
            cur.execute(self._sql("SELECT DISTINCT key_id, public_key FROM reports WHERE "
                                  "box_id = ? AND status = ? AND key_id IS NOT NULL"),
                        (box_id, CONFLICT))
            keys = {k: p for k, p in cur.fetchall()
                    if len(key_id) >= 8 and k.startswith(key_id.lower())}
            if len(keys) != 1:
                raise StoreError(f"box {box_id!r}: {'no' if not keys else 'more than one'} "
                                 f"key {key_id!r} among its conflicts (see: boxes list)")
            (new_id, public), = keys.items()
            # The counter of the old key means nothing for the new one.
            counter = box.counter if new_id == box.key_id else 0
            self._set(cur, box_id, TRUSTED, new_id, public, counter)
        return self._change(box_id, change)

    def reject(self, box_id: str) -> BoxRecord:
        return self._change(box_id, lambda cur, box: self._set(
            cur, box_id, REJECTED, box.key_id, box.public_key, box.counter))

    def rekey(self, box_id: str) -> BoxRecord:
        # The old key and its counter stay, so that a report it signed before cannot be
        # replayed to be learned again; a new key is learned with its own counter.
        return self._change(box_id, lambda cur, box: self._set(
            cur, box_id, REKEY, box.key_id, box.public_key, box.counter))

    def _set(self, cur: Any, box_id: str, state: str, key_id: str | None,
             public_key: str | None, counter: int) -> None:
        cur.execute(self._sql("UPDATE boxes SET state = ?, key_id = ?, public_key = ?, "
                              "counter = ? WHERE box_id = ?"),
                    (state, key_id, public_key, counter, box_id))


def _with_status(record: ReportRecord, status: str) -> ReportRecord:
    return ReportRecord(record.box_id, record.received, record.remote, record.report, status,
                        record.key_id, record.counter, record.timestamp, record.public_key)


def _record(row: tuple[Any, ...]) -> ReportRecord:
    box_id, received, remote, status, key_id, public_key, counter, box_time, body = row
    return ReportRecord(box_id=box_id, received=parse_time(received), remote=remote,
                        report=json.loads(body), status=status, key_id=key_id,
                        counter=None if counter is None else int(counter),
                        timestamp=None if box_time is None else parse_time(box_time),
                        public_key=public_key)


def _box_record(row: tuple[Any, ...]) -> BoxRecord:
    box_id, state, key_id, public_key, counter, first_seen, last_seen = row
    return BoxRecord(box_id, state, key_id, public_key, int(counter),
                     parse_time(first_seen), parse_time(last_seen))
