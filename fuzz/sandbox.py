"""What every harness checks besides the outcome: nothing is written outside the directory
the code under test was given, and the only exceptions are the project's typed errors.

A harness runs one input in a fresh directory inside a dedicated outer directory; after the
call it lists the outer directory, so a file written anywhere next to or above the sandbox
(``../x``, an absolute path under the sandbox's parent) is caught, not only inside it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opq_box_updater.errors import UpdaterError

#: Sandboxes go to memory when it can be had: one input costs a few directory operations,
#: which take milliseconds each on a real disk and microseconds on tmpfs.
SCRATCH = next((d for d in (os.environ.get("OPQ_FUZZ_TMP"), "/dev/shm")
                if d and os.path.isdir(d) and os.access(d, os.W_OK)), None)


class HarnessFailure(AssertionError):
    """A property of the harness failed: libFuzzer reports the input as a crash."""


def listing(root: Path) -> dict[str, int]:
    """Every path under ``root`` (relative) with its file type bits; symlinks not followed."""
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = stat.S_IFMT(os.lstat(path).st_mode)
    return found


@contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh directory ``outer/box``; on exit, ``outer`` must hold nothing but ``box``."""
    outer = Path(tempfile.mkdtemp(prefix="opq-fuzz-", dir=SCRATCH))
    box = outer / "box"
    box.mkdir()
    try:
        yield box
        extra = sorted(set(os.listdir(outer)) - {"box"})
        if extra:
            raise HarnessFailure(f"written outside the sandbox: {extra}")
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def typed_only(exc: BaseException) -> None:
    """Re-raise ``exc`` as a harness failure unless it is one of the project's own errors."""
    if not isinstance(exc, UpdaterError):
        raise HarnessFailure(f"untyped exception {type(exc).__name__}: {exc}") from exc
