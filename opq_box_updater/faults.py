"""Fault points: places where crash tests can kill the updater with SIGKILL.

A test sets ``OPQ_BOX_UPDATER_FAULT=<name>`` in the updater's environment; when the run reaches
:func:`fault_point` with that name the process kills itself with SIGKILL, exactly like a power
cut as far as the updater's own state is concerned (no ``finally`` blocks, no ``atexit``).
Children it started (dpkg, hooks) are not killed: a real power cut would stop them too, which
is what tests with a maintainer script doing ``kill -9 $PPID`` simulate.

The variable acts only in the updater itself: children get :func:`runner.child_env`, which
never passes it on. Tests that need to reach a maintainer script or the run script use
variables named ``OPQ_TEST_*`` instead (the only ones passed on; nothing in the product sets
them), e.g. ``OPQ_TEST_POWERCUT`` in ``tests/test_powercut.py``.

Without the variable a fault point costs one dictionary look-up.

Points in use (grep for ``fault_point(`` to find them):

* ``updater.py``: ``download``, ``extract``, ``apply``, ``commit``, ``rollback``;
* ``installer.py``: ``before-dpkg`` (after the journal says ``applying``, before dpkg or the
  run script), ``after-dpkg`` (dpkg and the guarded run script are done), ``before-health``,
  ``rollback-after-purge`` (new packages purged, old versions not yet reinstalled).
"""

from __future__ import annotations

import os

FAULT_ENV = "OPQ_BOX_UPDATER_FAULT"


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL when ``OPQ_BOX_UPDATER_FAULT`` equals ``name``."""
    if os.environ.get(FAULT_ENV) == name:
        import signal  # only here: the no-op path imports nothing it does not need

        os.kill(os.getpid(), signal.SIGKILL)
