"""Files in the repository that are not what they seem, as ``recall`` reads them.

Someone who can write the repository but not sign may replace an old release's package with
a link to an endless device: ``recall`` must refuse it, not copy without end. Run through
the CLI in a child process whose file size limit stands in for a full disk.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from conftest import tree_digest
from test_rollout import keys_of, rolled  # noqa: F401

from opq_box_updater.publish import stage

LIMIT = 64 << 20  # bytes any file of the child may reach: far above a test package
#: The CLI with SIGXFSZ's default action (Python ignores it): a file written past LIMIT
#: kills the child, as a disk filled to the brim would end the run.
CHILD = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
         "from opq_box_updater.publish.cli import main; sys.exit(main(sys.argv[1:]))")


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_recall_refuses_a_package_linked_to_an_endless_device(rolled: Path) -> None:  # noqa: F811
    v1 = stage.signed_releases(rolled, "version.json")[0].release
    package = rolled / v1.package.path
    package.unlink()
    package.symlink_to("/dev/zero")
    before = tree_digest(rolled, exclude=(rolled / ".reports",))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "recall", str(rolled), "--keys", str(keys_of(rolled))],
        capture_output=True, text=True, timeout=120, preexec_fn=_limited, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert "missing or no longer matches" in done.stderr
    assert tree_digest(rolled, exclude=(rolled / ".reports",)) == before
