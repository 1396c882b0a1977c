"""The run-script guard, and what dpkg says is installed.

dpkg runs ``--post-invoke`` hooks even after a failed install, so the package's run script is
never handed to dpkg bare (DESIGN 3.2). dpkg runs this module as a hook instead::

    python3 -I -m opq_box_updater.guard --dpkg-root R --status-file F --workdir W \\
        [--expect PKG=VERSION ...] [--timeout S] SCRIPT

It asks dpkg-query whether every ``--expect`` package is ``install ok installed`` at exactly
that version. Only then does it run SCRIPT (directly, so its shebang picks the interpreter;
cwd W; ``DPKG_ROOT`` set as for every other hook), recording ``started`` and then ``finished``
with the exit status in F (each write durable: file and directory fsynced, so recovery never
runs a script again that had started before a power cut), and exits with the script's status
so that dpkg fails too. The script's session is recorded before it starts
(``OPQ_BOX_UPDATER_SESSIONS``, see :mod:`opq_box_updater.sessions`). The script gets the
runner's minimal environment plus the ``OPQ_*`` variables dpkg passed on from the updater
and ``DPKG_ROOT``; it runs in its own session, and
a SIGTERM to the guard (the updater's timeout stopping dpkg's session) stops the script's
session too before the guard exits. The guard is a child subreaper: what the script detaches
is reported with the script's output, and stopped with its session.
Otherwise it records ``skipped`` and exits 0: dpkg's own failure is what fails the apply.

The command line is a contract between versions: an update that upgrades opq-box-updater
itself runs the *new* guard with the arguments the *old* updater wrote.

dpkg exits 2 when any ``--post-invoke`` hook fails (checked with dpkg 1.21), but the status
file is what :mod:`opq_box_updater.installer` trusts: it tells a failed run script from a
failed ``post-invoke.d`` hook, a script that never ran, and one cut off by a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import SubprocessError
from .fsutil import fsync_dir
from .procs import become_subreaper
from .runner import GRACE_SECONDS, child_env, record_sessions, run
from .sessions import SESSIONS_ENV, SessionRecords

#: The variables of DESIGN 3.2 the guard passes on to the run script from its environment.
OPQ_VARS = ("OPQ_UPDATE_VERSION", "OPQ_PREVIOUS_VERSION", "OPQ_UPDATE_DIR")

#: Prefix of each dpkg-query line we print, so that its "no packages found" lines on stderr
#: (folded into the output by the runner) can never be mistaken for data.
_MARK = "opq-pkg"
_QUERY_FORMAT = (_MARK + "\t${Package}\t${Architecture}\t${Multi-Arch}\t${Version}"
                 "\t${Status}\n")


def package_key(package: str, architecture: str, multi_arch: str) -> str:
    """How the updater names one installed instance of a package: ``name:arch`` for a
    ``Multi-Arch: same`` package (``libfoo:amd64`` and ``libfoo:i386`` may both be
    installed, and dpkg's ``${binary:Package}`` qualifies them the same way), else the bare
    name (dpkg lets only one instance of any other package be installed, whatever its
    architecture). dpkg, dpkg-query and apt-get accept both forms as package arguments."""
    return f"{package}:{architecture}" if multi_arch == "same" and architecture else package


def base_name(key: str) -> str:
    """The package name of a :func:`package_key` (``libfoo:i386`` -> ``libfoo``)."""
    return key.partition(":")[0]


@dataclass(frozen=True)
class PackageState:
    """One package as dpkg records it: ``status`` is dpkg's ``want flag status`` triple;
    ``architecture`` is empty when unknown (a journal written by an older updater)."""

    version: str
    status: str
    architecture: str = ""

    @property
    def installed(self) -> bool:
        """True when dpkg considers the package fully installed and configured."""
        parts = self.status.split()
        return len(parts) == 3 and parts[1] == "ok" and parts[2] == "installed"

    @property
    def held(self) -> bool:
        """True when the administrator put the package on hold (``dpkg --set-selections``)."""
        return self.status.startswith("hold ")

    @property
    def present(self) -> bool:
        """True when anything of the package is on the system (even only its conffiles)."""
        return not self.status.endswith(" not-installed")


def dpkg_root_env(root: Path) -> str:
    """``DPKG_ROOT`` as dpkg itself sets it for scripts: empty for ``/``, else the root."""
    return "" if root == Path("/") else str(root)


def root_options(root: Path) -> list[str]:
    """The dpkg/dpkg-query option selecting ``root`` (nothing for ``/``)."""
    return [] if root == Path("/") else [f"--root={root}"]


def parse_query(output: str) -> dict[str, PackageState]:
    """Parse the output of :func:`query_packages`' dpkg-query; lines without our mark are
    ignored (dpkg-query's complaints about unknown packages)."""
    states: dict[str, PackageState] = {}
    for line in output.splitlines():
        fields = line.split("\t")
        if len(fields) == 6 and fields[0] == _MARK:
            _mark, name, arch, multi_arch, version, status = fields
            states[package_key(name, arch, multi_arch)] = PackageState(version, status, arch)
    return states


def query_packages(root: Path, names: Iterable[str]) -> dict[str, PackageState]:
    """What dpkg in ``root`` records for ``names`` (package names or :func:`package_key`
    keys), keyed by :func:`package_key`; a package dpkg does not know is absent from the
    result. Raises :class:`SubprocessError` when dpkg-query itself fails."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    cmd = ["dpkg-query", *root_options(root), "--showformat", _QUERY_FORMAT, "--show", *wanted]
    result = run(cmd, check=False, timeout=120, record=False)
    # dpkg-query exits 1 when some package is unknown: that is an answer, not a failure.
    if result.returncode not in (0, 1):
        raise SubprocessError(f"dpkg-query exited with status {result.returncode}",
                              result.cmd, result.returncode, result.output[-2000:])
    return parse_query(result.output)


def not_installed(expected: Mapping[str, str], states: Mapping[str, PackageState]) -> list[str]:
    """Human-readable reasons why ``expected`` (:func:`package_key` -> version) is not what
    dpkg has; empty when every package is installed and configured at exactly its version.
    A bare name whose package is ``Multi-Arch: same`` (an older updater's ``--expect``)
    stands for every installed instance."""
    reasons = []
    for name, version in sorted(expected.items()):
        instances = [key for key in states if ":" not in name and base_name(key) == name]
        if name not in states and instances:
            reasons += not_installed({key: version for key in instances}, states)
            continue
        state = states.get(name)
        if state is None or not state.present:
            reasons.append(f"{name} is not installed")
        elif state.version != version:
            reasons.append(f"{name} is at {state.version}, not {version}")
        elif not state.installed:
            reasons.append(f"{name} {version} is '{state.status}'")
    return reasons


# --- the run script and its status file -----------------------------------------------------


@dataclass(frozen=True)
class RunStatus:
    """What the status file says: ``started`` (and maybe cut off by a crash), ``finished``
    with ``returncode`` (None: it could not be run or timed out), or ``skipped``."""

    state: str
    returncode: int | None = None
    detail: str = ""

    @property
    def succeeded(self) -> bool:
        return self.state == "finished" and self.returncode == 0


def write_status(path: Path, status: RunStatus) -> None:
    """Write ``status`` atomically and durably (temp file, fsync, rename, fsync of the
    directory): a crash leaves the old or the new status, never a torn one, and a status
    written before the power went is still there afterwards."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"state": status.state, "returncode": status.returncode,
                       "detail": status.detail}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_status(path: Path) -> RunStatus | None:
    """The recorded status, or None when there is none (or it is unreadable)."""
    try:
        raw = json.loads(path.read_bytes())
        returncode = raw["returncode"]
        return RunStatus(state=str(raw["state"]),
                         returncode=returncode if isinstance(returncode, int) else None,
                         detail=str(raw.get("detail", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_recorded(script: Path, *, workdir: Path, dpkg_root: Path, status_file: Path,
                 timeout: float, extra_env: dict[str, str] | None = None) -> RunStatus:
    """Run ``script`` with cwd ``workdir``, recording ``started`` before and ``finished``
    after in ``status_file``; its output is returned in ``detail`` (the tail)."""
    write_status(status_file, RunStatus("started"))
    env = child_env({**(extra_env or {}), "DPKG_ROOT": dpkg_root_env(dpkg_root)})
    try:
        # Half the runner's grace: when the updater stops dpkg's session, the guard must
        # have killed the script before the updater's own SIGKILL reaches the guard.
        result = run([script], cwd=workdir, env=env, timeout=timeout, check=False,
                     grace=GRACE_SECONDS / 2)
        left = "".join(f"opq-box-updater guard: left running: {p}\n" for p in result.leftovers)
        status = RunStatus("finished", result.returncode, (result.output + left)[-4000:])
    except SubprocessError as exc:  # cannot exec (shebang, mode) or timed out
        status = RunStatus("finished", None, f"{exc}\n{exc.output_tail}")
    write_status(status_file, status)
    return status


def _expectations(values: Sequence[str]) -> dict[str, str]:
    expected = {}
    for value in values:
        name, sep, version = value.partition("=")
        if not sep or not name or not version:
            raise SystemExit(f"opq-box-updater guard: bad --expect {value!r} (want PKG=VERSION)")
        expected[name] = version
    return expected


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the guard; returns the exit status for dpkg."""
    parser = argparse.ArgumentParser(prog="python3 -m opq_box_updater.guard")
    parser.add_argument("--dpkg-root", type=Path, default=Path("/"))
    parser.add_argument("--status-file", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--expect", action="append", default=[], metavar="PKG=VERSION")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("script", type=Path)
    args = parser.parse_args(argv)
    # The updater's timeout stops dpkg's session with SIGTERM: exit through the runner, which
    # then stops the run script's own session as well.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # What the run script detaches (setsid, double fork) is re-parented to the guard, which
    # reports it, and stops it with the script's session on a timeout or SIGTERM.
    become_subreaper()
    # The run script's session is recorded where the updater records dpkg's: should the
    # updater be killed, its next run stops the script too, not only dpkg and the guard.
    if os.environ.get(SESSIONS_ENV):
        record_sessions(SessionRecords(Path(os.environ[SESSIONS_ENV])))
    expected = _expectations(args.expect)
    try:
        reasons = not_installed(expected, query_packages(args.dpkg_root, expected))
    except SubprocessError as exc:
        reasons = [str(exc)]
    if reasons:
        detail = "; ".join(reasons)
        write_status(args.status_file, RunStatus("skipped", None, detail))
        print(f"opq-box-updater guard: not running {args.script.name}: {detail}", flush=True)
        return 0
    print(f"opq-box-updater guard: running {args.script}", flush=True)
    status = run_recorded(args.script, workdir=args.workdir, dpkg_root=args.dpkg_root,
                          status_file=args.status_file, timeout=args.timeout,
                          extra_env={k: os.environ[k] for k in OPQ_VARS if k in os.environ})
    # The script's output goes to dpkg's output, which the updater logs.
    sys.stdout.write(status.detail)
    if status.succeeded:
        return 0
    print(f"opq-box-updater guard: {args.script.name} failed "
          f"(exit status {status.returncode})", flush=True)
    return status.returncode if status.returncode and 0 < status.returncode < 256 else 1


if __name__ == "__main__":
    sys.exit(main())
