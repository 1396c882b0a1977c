"""The DESIGN 7 budgets, each measured as a ratio against a baseline taken in the same run.

Everything runs against Debian's nginx serving the shipped site configuration on 127.0.0.1;
the box side is always the real ``opq-box-updater`` command run by ``/usr/bin/python3`` (as
the Debian package runs it), each box with its own configuration and state directory.
Measurements that are compared run interleaved, so drift (other load on the machine) hits
both sides alike, and the median is reported.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from opq_box_updater.metadata import PackageRef, parse_envelope, parse_release

from .fixtures import (
    GIB,
    MIB,
    SYSTEM_PYTHON,
    Box,
    Repo,
    child_env,
    curl_argv,
    fetch_argv,
    floor_argv,
    payload_for,
    precompile,
    sha256sum_argv,
    write_package,
)
from .importdiff import extra_imports
from .measure import Usage, checked, median_of, run_child
from .servers import BenchError, CountingProxy, Nginx, NginxError, require

EXIT_NETWORK = 4
#: The network-bound comparison: a 40 Mbit/s link (home DSL or Wi-Fi), in bytes per second.
LINK_RATE = 5_000_000


@dataclass(frozen=True)
class Sizes:
    """How big and how often; :data:`TINY` proves the code works in seconds."""

    small: int  # the everyday package
    big: int  # the large one of the memory and time comparisons
    noop_rounds: int  # no-op checks (and floors) measured for CPU and memory
    time_rounds: int  # downloads (and curls) measured for time


FULL = Sizes(small=10 * MIB, big=GIB, noop_rounds=15, time_rounds=3)
TINY = Sizes(small=1 * MIB, big=4 * MIB, noop_rounds=2, time_rounds=1)


@dataclass(frozen=True)
class Result:
    """One line of the report: ``ratio`` (measured / baseline) must be ``<= goal``
    (``< goal`` when ``strict``)."""

    name: str
    value: str
    baseline: str
    ratio: float
    goal: float
    strict: bool = False
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio < self.goal if self.strict else self.ratio <= self.goal

    @property
    def goal_text(self) -> str:
        return f"{'<' if self.strict else '<='} {self.goal:.2f}"


NAMES = (
    "no-op check: bytes on the wire",
    "resume after a cut at 50%: total bytes",
    "peak RSS: big package vs small",
    "download+verify vs curl -o (loopback)",
    "download+verify vs curl -o (40 Mbit/s)",
    "no-op check: CPU time vs requests.get",
    "no-op check: peak RSS vs requests.get",
    "publish release vs sha256sum",
)


def fmt_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 10 * 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.0f} ms"


def format_table(results: list[Result]) -> str:
    """The results as an aligned table, then one note per result."""
    header = ("benchmark", "measured", "baseline", "ratio", "goal", "result")
    rows = [header] + [(r.name, r.value, r.baseline, f"{r.ratio:.3f}", r.goal_text,
                        "PASS" if r.passed else "MISS") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"* {r.name}: {r.note}" for r in results if r.note]
    return "\n".join([*lines, "", *notes]) + "\n"


class Bench:
    """One benchmark run in ``work`` (a scratch directory the caller removes)."""

    def __init__(self, work: Path, sizes: Sizes, out: TextIO) -> None:
        self.work = work
        self.sizes = sizes
        self.out = out
        self.env = child_env()
        self.repo = Repo.create(work / "repo", work / "keys")
        self.refs: dict[str, PackageRef] = {}

    def say(self, text: str) -> None:
        print(f"[bench] {text}", file=self.out, flush=True)

    # --- the whole run -----------------------------------------------------------------

    def run(self) -> list[Result]:
        """Every budget once; the results in :data:`NAMES` order."""
        for tool in ("nginx", "curl", "sha256sum"):
            require(tool)
        precompile()
        self._check_disk()
        self.say(f"building packages of {fmt_bytes(self.sizes.small)} and "
                 f"{fmt_bytes(self.sizes.big)}")
        small = write_package(self.work / "small.zip", 1, payload_for(self.sizes.small))
        self.refs["small"] = self.repo.publish(small, "version-small.json").package
        small.unlink()
        big = write_package(self.work / "big.zip", 1, payload_for(self.sizes.big))
        results = [self.publish_vs_sha256sum(big)]
        big.unlink()
        try:
            # sendfile as in Debian's stock nginx.conf: the server side costs little CPU.
            with Nginx(self.repo.path, self.work / "nginx", http_extra="sendfile on;") as nginx, \
                    CountingProxy(("127.0.0.1", nginx.port)) as proxy, \
                    CountingProxy(("127.0.0.1", nginx.port), rate=LINK_RATE) as link:
                results.append(self.noop_bytes(nginx, proxy))
                results.append(self.resume_bytes(nginx, proxy))
                results.append(self.peak_rss(nginx))
                results.append(self.download_time(nginx.url, "big", NAMES[3]))
                results.append(self.download_time(link.url, "small", NAMES[4]))
                results.extend(self.noop_cost(nginx))
        except NginxError as exc:
            raise BenchError(str(exc)) from None
        order = {name: i for i, name in enumerate(NAMES)}
        return sorted(results, key=lambda r: order[r.name])

    def _check_disk(self) -> None:
        # big.zip, its copy in the repository, the big box's download and its extraction.
        needed = 4 * self.sizes.big + 20 * self.sizes.small
        free = shutil.disk_usage(self.work).free
        if free < needed:
            raise BenchError(f"{self.work}: {fmt_bytes(free)} free, the benchmark needs "
                             f"{fmt_bytes(needed)} (use --workdir on a larger filesystem)")

    def box(self, name: str, channel: str, url: str) -> Box:
        return Box(self.work / "boxes" / name, url, f"version-{channel}.json",
                   self.repo.anchor, f"bench-{name}").write()

    def box_run(self, box: Box, *command: str, expect: int = 0) -> Usage:
        return checked(run_child(box.argv(*command), env=self.env),
                       f"opq-box-updater {' '.join(command)} ({box.box_id})", expect)

    # --- the budgets -------------------------------------------------------------------

    def noop_bytes(self, nginx: Nginx, proxy: CountingProxy) -> Result:
        """A daily check with nothing new: one conditional GET answered 304."""
        self.say("no-op check: bytes on the wire")
        box = self.box("daily", "small", proxy.url)
        self.box_run(box, "run")
        before = len(nginx.access_log(expect=1))
        proxy.reset()
        self.box_run(box, "check")
        counts = proxy.reset()
        entries = nginx.access_log(expect=before + 1)[before:]
        logged = sum(e.request_length + e.bytes_sent for e in entries)
        statuses = ", ".join(str(e.status) for e in entries)
        shutil.rmtree(box.base)
        return Result(NAMES[0], fmt_bytes(counts.total), "1 KiB budget", counts.total / 1024,
                      1.0, strict=True,
                      note=f"{len(entries)} request(s) answered {statuses}: {counts.upstream} B "
                           f"up, {counts.downstream} B down over {counts.connections} TCP "
                           f"connection(s), TCP/IP headers not counted (nginx logs "
                           f"request_length + bytes_sent = {logged} B)")

    def resume_bytes(self, nginx: Nginx, proxy: CountingProxy) -> Result:
        """A download cut at half resumes with a Range request instead of starting over."""
        self.say("interrupted download: total bytes")
        ref = self.refs["small"]
        box = self.box("resume", "small", proxy.url)
        before = len(nginx.access_log())
        proxy.reset()
        proxy.cut_after(ref.length // 2)
        self.box_run(box, "run", expect=EXIT_NETWORK)
        parts = list(box.cache.glob("*.part"))
        kept = parts[0].stat().st_size if parts else 0
        self.box_run(box, "run")
        counts = proxy.reset()
        shutil.rmtree(box.base)
        served = [e for e in nginx.access_log(expect=before + 4)[before:]
                  if e.uri == "/" + ref.path]
        answers = ", then ".join(f"{e.status}{' for ' + e.range if e.range else ''}"
                                 for e in served)
        return Result(NAMES[1], fmt_bytes(counts.total), f"{fmt_bytes(ref.length)} package",
                      counts.total / ref.length, 1.05,
                      note=f"the cut left {kept / ref.length:.0%} of the package in .part; "
                           f"nginx answered the package requests {answers}; the total counts "
                           "both runs, every request and response")

    def peak_rss(self, nginx: Nginx) -> Result:
        """``opq-box-updater run`` (download, verify, extract, apply) of each package."""
        self.say(f"peak RSS: run with the {fmt_bytes(self.sizes.small)} and "
                 f"{fmt_bytes(self.sizes.big)} packages")
        usage = {}
        for channel in ("small", "big"):
            box = self.box(f"rss-{channel}", channel, nginx.url)
            usage[channel] = self.box_run(box, "run")
            shutil.rmtree(box.base)
        small, big = usage["small"], usage["big"]
        return Result(NAMES[2], fmt_bytes(big.peak_rss), fmt_bytes(small.peak_rss),
                      big.peak_rss / small.peak_rss, 1.2,
                      note=f"whole runs (download, verify, extract, apply) of packages of "
                           f"{fmt_bytes(self.refs['big'].length)} and "
                           f"{fmt_bytes(self.refs['small'].length)}, which took "
                           f"{fmt_seconds(big.wall)} and {fmt_seconds(small.wall)}")

    def download_time(self, base_url: str, package: str, name: str) -> Result:
        """The box's download+verify step alone vs curl alone: same file, same server, same
        file system, the page cache's dirty data written out before each run."""
        ref = self.refs[package]
        rounds = self.sizes.time_rounds
        self.say(f"{name}: {fmt_bytes(ref.length)} x {rounds}")
        url = base_url + ref.path
        dest = self.work / "download"
        synced: list[float] = []

        def ours() -> float:
            dest.mkdir()
            try:
                os.sync()
                usage = checked(run_child(fetch_argv(base_url, ref.path, dest, ref.sha256,
                                                     ref.length), env=self.env), "download")
                seconds, fsync = (float(x) for x in usage.stdout.split())
                synced.append(fsync)
                return seconds
            finally:
                shutil.rmtree(dest)

        def curl() -> float:
            dest.mkdir()
            try:
                os.sync()
                usage = checked(run_child(curl_argv(url, dest / "package.zip"), env=self.env),
                                "curl")
                return float(usage.stdout.strip())
            finally:
                shutil.rmtree(dest)

        curl()  # warm-up: nginx's file in the page cache, for both sides alike
        ours_times: list[float] = []
        curl_times: list[float] = []
        for _ in range(rounds):
            ours_times.append(ours())
            curl_times.append(curl())
        a, b = median_of(ours_times), median_of(curl_times)
        return Result(name, fmt_seconds(a), fmt_seconds(b), a / b, 1.1,
                      note=f"{fmt_bytes(ref.length)}, median of {rounds} each "
                           f"({ref.length / a / MIB:.0f} vs {ref.length / b / MIB:.0f} MiB/s); "
                           f"ours includes {fmt_seconds(median_of(synced))} of fsync (the "
                           f"verified file made durable; curl does not sync); SHA-256 alone "
                           f"runs at {hash_rate() / MIB:.0f} MiB/s here")

    def noop_cost(self, nginx: Nginx) -> list[Result]:
        """CPU and memory of ``check`` answered 304 vs the floor ``requests.get``."""
        rounds = self.sizes.noop_rounds
        self.say(f"no-op check vs requests.get: {rounds} rounds each")
        box = self.box("noop", "small", nginx.url)
        self.box_run(box, "run")
        self.box_run(box, "check")
        floor = floor_argv(nginx.url + "version-small.json")
        ours_usage: list[Usage] = []
        floor_usage: list[Usage] = []
        for _ in range(rounds):
            ours_usage.append(self.box_run(box, "check"))
            floor_usage.append(checked(run_child(floor, env=self.env), "requests.get floor"))
        cpu_a = median_of([u.cpu for u in ours_usage])
        cpu_b = median_of([u.cpu for u in floor_usage])
        rss_a = median_of([u.peak_rss for u in ours_usage])
        rss_b = median_of([u.peak_rss for u in floor_usage])
        cpu = Result(NAMES[5], fmt_seconds(cpu_a), fmt_seconds(cpu_b), cpu_a / cpu_b, 1.2,
                     note=f"median user+system time of {rounds} runs each, both "
                          f"{SYSTEM_PYTHON} with compiled bytecode")
        if not cpu.passed:
            extra = extra_imports(box.argv("check"), floor, self.env)
            listed = ", ".join(f"{module} {ms:.1f} ms" for module, ms in extra[:10])
            cpu = replace(cpu, note=f"{cpu.note}; imported beyond the floor (-X importtime, "
                                    f"median self time of 5 runs): {listed}")
        rss = Result(NAMES[6], fmt_bytes(rss_a), fmt_bytes(rss_b), rss_a / rss_b, 1.2,
                     note=f"median peak RSS of {rounds} runs each")
        shutil.rmtree(box.base)
        return [cpu, rss]

    def publish_vs_sha256sum(self, package: Path) -> Result:
        """Publishing reads the source once: it checks and signs its own copy."""
        self.say(f"publish vs sha256sum: {fmt_bytes(package.stat().st_size)}")
        checked(run_child(sha256sum_argv(package), env=self.env), "sha256sum")  # page cache
        os.sync()
        sha = checked(run_child(sha256sum_argv(package), env=self.env), "sha256sum")
        os.sync()
        pub = checked(run_child(self.repo.publish_argv(package, "version-big.json"),
                                env=self.env), "opq-box-publish release")
        version_file = self.repo.path / "version-big.json"
        self.refs["big"] = parse_release(parse_envelope(version_file.read_bytes())).package
        return Result(NAMES[7], fmt_seconds(pub.wall), fmt_seconds(sha.wall),
                      pub.wall / sha.wall, 2.0,
                      note="wall time of the commands; publishing copies the package into "
                           "the repository hashing on the way and fsyncs it (one read, one "
                           "write), checks that private copy with the box's own extraction "
                           "(one read, one write to a temporary directory) and signs")


def hash_rate(sample: int = 64 * MIB) -> float:
    """Bytes per second that hashlib's SHA-256 reaches in this process."""
    block = b"\x5a" * MIB
    digest = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(sample // MIB):
        digest.update(block)
    return sample / (time.perf_counter() - started)


def describe_machine() -> str:
    """One line: host, CPU, kernel, the measured interpreter and nginx."""
    nginx = subprocess.run([require("nginx"), "-v"], capture_output=True, text=True,
                           check=False).stderr.strip().removeprefix("nginx version: ")
    python = subprocess.run([SYSTEM_PYTHON, "--version"], capture_output=True, text=True,
                            check=False).stdout.strip()
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}; {python}; {nginx}; "
            f"load average {os.getloadavg()[0]:.2f}")


@contextmanager
def scratch(parent: str | None, keep: bool) -> Iterator[Path]:
    """A fresh scratch directory, removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix="opq-bench-", dir=parent))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def timed(fn: Callable[[], list[Result]]) -> tuple[list[Result], float]:
    started = time.monotonic()
    results = fn()
    return results, time.monotonic() - started
