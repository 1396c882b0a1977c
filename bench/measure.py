"""Running a command as a child process and measuring it: wall time, CPU time, peak RSS."""

from __future__ import annotations

import os
import selectors
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .servers import BenchError


@dataclass(frozen=True)
class Usage:
    """What one child process cost: ``cpu`` is user + system seconds, ``peak_rss`` bytes
    (the kernel's high-water mark of the child and its waited-for descendants)."""

    returncode: int
    wall: float
    cpu: float
    peak_rss: int
    stdout: str
    stderr: str


def run_child(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, timeout: float = 600) -> Usage:
    """Run ``argv`` to completion and return its :class:`Usage`.

    The child is reaped with ``os.wait4``, whose resource usage belongs to that one child
    (``RUSAGE_CHILDREN`` would mix in every earlier child of this process).
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(env) if env is not None else None, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = _drain(proc, timeout)
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait a second time
    return Usage(proc.returncode, wall, usage.ru_utime + usage.ru_stime,
                 usage.ru_maxrss * 1024, out, err)


def _drain(proc: subprocess.Popen[bytes], timeout: float) -> tuple[str, str]:
    """Read the child's stdout and stderr to their end without reaping it (``communicate``
    would reap it, and its resource usage with it)."""
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
    chunks: dict[int, list[bytes]] = {fd: [] for fd in streams}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for stream in streams.values():
            sel.register(stream, selectors.EVENT_READ)
        while sel.get_map():
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            for key, _ in sel.select(timeout=1):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fileobj)
    out, err = (b"".join(chunks[fd]).decode("utf-8", "replace") for fd in streams)
    for stream in streams.values():
        stream.close()
    return out, err


def checked(usage: Usage, what: str, expect: int = 0) -> Usage:
    """``usage``, or an error naming ``what`` when the child's exit code is not ``expect``."""
    if usage.returncode != expect:
        raise BenchError(f"{what} exited {usage.returncode} (expected {expect}): "
                           f"{usage.stderr.strip()[-800:]}")
    return usage


def median_of(values: Sequence[float]) -> float:
    return float(statistics.median(values))
