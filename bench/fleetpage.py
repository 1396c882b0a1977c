"""The fleet page at fleet scale: its size and the time to serve it, paged and in one table.

``python -m bench.fleetpage [--boxes 10000] [--backend sqlite|postgresql]`` (``make
bench-page``). A store (SQLite in a scratch directory, then a throw-away PostgreSQL from
tests/pgfix.py) holds the newest report of ``--boxes`` boxes, as ``bench.reports`` sends
them, and a repository has a release at 10 %, so the page carries rollout numbers. Each
view is timed in-process as the collector serves ``/`` (``fleetweb.fleet``: read the newest
report of every box, the rollout numbers, the filters, render), median of ``--repeat``:

* **one table**: every box on one page, as the page was before paging (the baseline,
  measured in the same run);
* **page 1**, **last page** and **filtered** (``?result=apply-failed``, page 1): the
  paged page as served now;

and how much of it is reading the newest report of every box (``Store.latest()``), which
both do.

With Debian's ``chromium`` installed, the time a headless browser takes to load and lay out
each page from a file (``--dump-dom``, one process per page: its start-up is in it) is
printed too. Nothing is asserted: the figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from opq_box_updater.publish import build, fleetpage, fleetweb, repo
from opq_box_updater.publish.store import ACCEPTED, ReportRecord, SqlStore, open_store

from .servers import BenchError

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT / "tests") not in sys.path:
    sys.path.append(str(PROJECT / "tests"))
from pgfix import pg_bindir, postgres  # noqa: E402

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)
BACKENDS = ("sqlite", "postgresql")
HEADER = (f"{'store':<11}{'view':<14}{'rows':>6}{'bytes':>11}{'serve':>10}{'vs one table':>14}"
          f"{'browser':>10}")


def records(count: int) -> Iterator[ReportRecord]:
    """The newest report of ``count`` boxes: most on release 2, some failed it, some
    waiting on 1, one in nine stale."""
    for n in range(count):
        box_id = f"bench-{n:06d}"
        failed = n % 50 == 0
        version = 1 if failed or n % 5 == 0 else 2
        report = {"box_id": box_id, "installed_version": version,
                  "last_result": "apply-failed" if failed else "updated",
                  "last_message": f"updated to release {version}", "duration_ms": 12_345,
                  "channel": "version.json", "release_version": 2,
                  "failed_versions": [2] if failed else [],
                  "error": "dpkg: error processing package" if failed else None}
        received = NOW - timedelta(days=3 if n % 9 == 0 else 0, minutes=n % 1440)
        yield ReportRecord(box_id, received, "192.0.2.1", report, ACCEPTED, "ab" * 32,
                           counter=1, timestamp=received, public_key="cd" * 32)


def make_repo(work: Path) -> Path:
    repo_dir, keydir = work / "repo", work / "keys"
    repo.init_repo(repo_dir, keydir, now=NOW - timedelta(days=10))
    (work / "update.sh").write_text("#!/bin/sh\ntrue\n")
    for version, pct in ((1, 100), (2, 10)):
        build.build_package(work / f"p{version}.zip", version=version, run=work / "update.sh")
        repo.publish_release(repo_dir, keydir, work / f"p{version}.zip", rollout=pct,
                             now=NOW - timedelta(days=3 - version))
    return repo_dir


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def browser_seconds(chromium: str | None, page: Path) -> float | None:
    """Wall time of a headless chromium loading ``page`` and printing its DOM."""
    if chromium is None:
        return None
    started = time.perf_counter()
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--dump-dom", page.as_uri()],
                   capture_output=True, check=True, timeout=300)
    return time.perf_counter() - started


@contextlib.contextmanager
def store_url(backend: str, work: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{work}/reports.db"
        return
    if pg_bindir() is None:
        raise BenchError("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres(durable=True) as server:
        yield server.dsn


def run_backend(backend: str, work: Path, repo_dir: Path, boxes: int, repeat: int,
                chromium: str | None) -> list[str]:
    lines = []
    with store_url(backend, work) as url:
        store = open_store(url)
        assert isinstance(store, SqlStore)
        try:
            with store._write() as cur:  # seeding, not what is measured
                for record in records(boxes):
                    store._insert(cur, record)
            pages = max(1, -(-boxes // fleetpage.PAGE_SIZE))
            views: tuple[tuple[str, dict[str, list[str]], int], ...] = (
                ("one table", {}, boxes), ("page 1", {}, fleetpage.PAGE_SIZE),
                ("last page", {"page": [str(pages)]}, fleetpage.PAGE_SIZE),
                ("filtered", {"result": ["apply-failed"]}, fleetpage.PAGE_SIZE))
            baseline = 0.0
            for name, query, size in views:
                def serve(query: dict[str, list[str]] = query, size: int = size) -> bytes:
                    status, body, _ = fleetweb.fleet(store, query, repo_dir, NOW, size)
                    assert status == 200
                    return body
                body = serve()
                seconds = median_seconds(serve, repeat)
                baseline = baseline or seconds
                path = work / f"{backend}-{name.replace(' ', '-')}.html"
                path.write_bytes(body)
                table = body.split(b'<table class="boxes">', 1)[1].split(b"</table>", 1)[0]
                shown = table.count(b'<td><a href="box/')
                loaded = browser_seconds(chromium, path)
                lines.append(f"{backend:<11}{name:<14}{shown:>6}{len(body):>11}"
                             f"{seconds * 1000:>8.0f}ms{seconds / baseline:>13.2f}x"
                             + (f"{loaded:>9.2f}s" if loaded is not None else f"{'-':>10}"))
                print(lines[-1], flush=True)
            read = median_seconds(store.latest, repeat)
            lines.append(f"{backend:<11}{'of which: reading the newest report of every box':<52}"
                         f"{read * 1000:>8.0f}ms")
            print(lines[-1], flush=True)
        finally:
            store.close()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleetpage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5, help="timed renders per view")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="sqlite, postgresql (repeatable; default both)")
    parser.add_argument("--no-browser", action="store_true",
                        help="do not time chromium loading the pages")
    parser.add_argument("--workdir", metavar="DIR", help="parent of the scratch directory")
    args = parser.parse_args(argv)
    chromium = None if args.no_browser else shutil.which("chromium")
    work = Path(tempfile.mkdtemp(prefix="opq-bench-page-", dir=args.workdir))
    try:
        print(f"fleet page: {args.boxes} boxes, {fleetpage.PAGE_SIZE} a page, median of "
              f"{args.repeat} renders"
              + ("" if chromium else "; browser not timed"), flush=True)
        print(HEADER, flush=True)
        repo_dir = make_repo(work)
        if chromium is not None:
            (work / "empty.html").write_text("<!DOCTYPE html><title>-</title>")
            started = browser_seconds(chromium, work / "empty.html")
            print(f"{'(browser start-up: an empty page)':<52}{'':>10}{started:>23.2f}s",
                  flush=True)
        for backend in args.backend or BACKENDS:
            (work / backend).mkdir()
            run_backend(backend, work / backend, repo_dir, args.boxes, args.repeat, chromium)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench.fleetpage: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
