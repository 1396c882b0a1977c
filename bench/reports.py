"""Report load (issue 10, item 5): N simulated boxes send signed reports to the collector.

``python -m bench.reports [--boxes 10000] [--concurrency 64] [--workers 4]`` (``make
bench-reports``). The collector runs as operators run it: Debian's gunicorn (sync workers)
with ``opq_box_updater.publish.collector:application`` on a Unix socket, behind Debian's
nginx with the shipped site and snippet, on 127.0.0.1; its store is SQLite (WAL, a file in
the scratch directory) and then a real PostgreSQL (Debian's, made with initdb, fsync on).

Each box has its own Ed25519 key. Round 1 is every box's first report (the collector learns
the key: an insert into ``boxes``), round 2 the next day's (a known box: counter
compare-and-set). Reports are signed before the clock starts (a box signs on its own CPU);
``--concurrency`` client threads, each on one keep-alive connection, send them as fast as
the collector answers. Per round: throughput, p50/p99/max latency, statuses, and *lost*:
reports not answered 204 plus those answered but not in the store afterwards (must be 0).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opq_box_updater.publish.store import ACCEPTED, SqlStore, open_store
from opq_box_updater.reporting import sign_report

from .servers import BenchError, Nginx, require

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT / "tests") not in sys.path:
    sys.path.append(str(PROJECT / "tests"))
from collectorfix import Gunicorn, collector_site, socket_dir  # noqa: E402
from pgfix import pg_bindir, postgres  # noqa: E402

BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class Round:
    backend: str
    name: str
    sent: int
    seconds: float
    latencies: list[float]  # seconds, one per report
    statuses: Counter[int]
    stored: int  # reports of this round the store holds as accepted afterwards

    @property
    def lost(self) -> int:
        return self.sent - min(self.stored, self.statuses[204])

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    def line(self) -> str:
        statuses = ", ".join(f"{code} x{n}" for code, n in sorted(self.statuses.items()))
        return (f"{self.backend:<11}{self.name:<24}{self.sent:>7}{self.seconds:>8.1f}s"
                f"{self.sent / self.seconds:>9.0f}/s{self.percentile(50):>8.1f}ms"
                f"{self.percentile(99):>8.1f}ms{max(self.latencies) * 1000:>8.0f}ms"
                f"{self.lost:>6}  {statuses}")


HEADER = (f"{'store':<11}{'round':<24}{'reports':>7}{'wall':>9}{'rate':>11}{'p50':>10}"
          f"{'p99':>10}{'max':>10}{'lost':>6}  statuses")


def sign_all(keys: list[Any], counter: int) -> list[bytes]:
    """One signed report per box, as reporting.py makes them on a box."""
    now = datetime.now(UTC).replace(microsecond=0)
    bodies = []
    for n, key in enumerate(keys):
        box_id = f"bench-{n:06d}"
        report = {"box_id": box_id, "installed_version": counter, "last_result": "updated",
                  "last_message": f"updated to release {counter}", "duration_ms": 12_345,
                  "channel": "version.json", "release_version": counter, "error": None}
        bodies.append(json.dumps(sign_report(report, box_id, key, counter, now)).encode())
    return bodies


def send_all(port: int, bodies: list[bytes], concurrency: int
             ) -> tuple[float, list[float], Counter[int]]:
    """POST every body to 127.0.0.1:port/report from ``concurrency`` threads."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    queue = iter(range(len(bodies)))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        codes: Counter[int] = Counter()
        while True:
            with lock:
                index = next(queue, None)
            if index is None:
                break
            started = time.perf_counter()
            try:
                conn.request("POST", "/report", body=bodies[index],
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                codes[response.status] += 1
            except (OSError, http.client.HTTPException):
                codes[0] += 1  # a connection error counts as status 0 (lost)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - started)
        conn.close()
        with lock:
            latencies.extend(mine)
            statuses.update(codes)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies, statuses


def stored_with_counter(store: SqlStore, counter: int) -> int:
    rows = store._read("SELECT COUNT(*) FROM reports WHERE status = ? AND counter = ?",
                       (ACCEPTED, counter))
    return int(rows[0][0])


@contextlib.contextmanager
def store_url(backend: str, work: Path, durable: bool = True) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{work}/reports.db"
        return
    if pg_bindir() is None:
        raise BenchError("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres(durable=durable) as server:
        yield server.dsn


def run_backend(backend: str, work: Path, keys: list[Any], rounds: list[list[bytes]],
                concurrency: int, workers: int, out: Any, durable: bool = True
                ) -> list[Round]:
    work.mkdir()
    results = []
    with store_url(backend, work, durable) as url:
        store = open_store(url)  # made and migrated before gunicorn's workers start
        assert isinstance(store, SqlStore)
        # The per-box rate limit stays as shipped: each box sends one report per round.
        with socket_dir() as sockets, \
                Gunicorn(sock := sockets / "gunicorn.sock", url, work / "gunicorn.log",
                         workers=workers), \
                Nginx(work / "empty", work / "nginx", worker_processes=2,
                      site_filter=collector_site(sock, work / "collector.conf")) as nginx:
            for number, bodies in enumerate(rounds, start=1):
                name = "1: first report (TOFU)" if number == 1 else f"{number}: known box"
                seconds, latencies, statuses = send_all(nginx.port, bodies, concurrency)
                result = Round(backend, name, len(bodies), seconds, latencies, statuses,
                               stored_with_counter(store, number))
                print(result.line(), file=out, flush=True)
                results.append(result)
        store.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reports", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="sqlite, postgresql (repeatable; default both)")
    parser.add_argument("--workdir", metavar="DIR", help="parent of the scratch directory")
    parser.add_argument("--smoke", action="store_true",
                        help="PostgreSQL without fsync (the smoke test: figures mean nothing)")
    args = parser.parse_args(argv)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        require("nginx")
        require("gunicorn")
        keys = [Ed25519PrivateKey.generate() for _ in range(args.boxes)]
        rounds = [sign_all(keys, n) for n in range(1, args.rounds + 1)]
        print(f"report load: {args.boxes} boxes x {args.rounds} rounds, {args.concurrency} "
              f"client threads, gunicorn {args.workers} sync workers behind nginx; "
              f"{os.cpu_count()} CPUs", flush=True)
        print(HEADER, flush=True)
        work = Path(tempfile.mkdtemp(prefix="opq-bench-reports-", dir=args.workdir))
        try:
            (work / "empty").mkdir()
            results = []
            for backend in args.backend or BACKENDS:
                results += run_backend(backend, work / backend, keys, rounds,
                                       args.concurrency, args.workers, sys.stdout,
                                       durable=not args.smoke)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except (BenchError, RuntimeError, FileNotFoundError) as exc:
        print(f"bench.reports: {exc}", file=sys.stderr)
        return 1
    lost = sum(r.lost for r in results)
    print(f"total: {sum(r.sent for r in results)} reports, {lost} lost")
    return 0 if lost == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
