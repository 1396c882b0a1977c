"""Applying updates end to end: the real CLI against a served repository, real .debs, dpkg in
the box's temporary root (DESIGN 3.1, 3.2, 3.6).

Every test runs ``python -m opq_box_updater.cli`` in a subprocess against a :class:`RepoSim`
repository served by :class:`FaultServer` on 127.0.0.1, and asserts with ``dpkg-query`` on the
box's own dpkg root. Hooks, maintainer scripts and run scripts append to one order log, so
both *what* ran and *in which order* are checked. :class:`World` is reused by
``test_powercut.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, Box, tree_digest
from debs import dpkg_command, make_deb, require_tool
from faultserver import FaultServer
from reposim import RepoSim

from opq_box_updater.metadata import rollout_bucket

OK, APPLY_FAILED, LOCKED, UPDATE_AVAILABLE = 0, 5, 6, 100
HOOK_DIRS = ("pre-update.d", "pre-invoke.d", "post-invoke.d", "health.d", "post-update.d")
DPKG_TOOLS = ("dpkg", "dpkg-deb", "dpkg-query", "run-parts")
#: What every script logs: its name, then the four documented variables.
ENV_LINE = '"$OPQ_UPDATE_VERSION $OPQ_PREVIOUS_VERSION $OPQ_UPDATE_DIR $DPKG_ROOT"'


@dataclass
class World:
    """A repository, its server, one box and a place to build debs, all under ``tmp``."""

    tmp: Path
    sim: RepoSim
    server: FaultServer
    box: Box

    @property
    def order(self) -> Path:
        """The log every hook, maintainer script and run script of a test appends to."""
        return self.tmp / "order.log"

    @property
    def built(self) -> Path:
        return self.tmp / "debs-built"

    def lines(self) -> list[str]:
        return self.order.read_text().splitlines() if self.order.exists() else []

    def forget(self) -> None:
        """Start a fresh order log."""
        self.order.unlink(missing_ok=True)

    # --- the operator's side -------------------------------------------------------------

    def deb(self, name: str, version: str, scripts: Mapping[str, str] | None = None, *,
            files: Mapping[str, str | bytes] | None = None) -> Path:
        """A real deb shipping ``usr/share/<name>/version`` (and ``files``) whose postinst
        logs ``postinst <name> <version>``; ``scripts`` are appended to (or add) maintainer
        scripts."""
        logged = {"postinst": f'echo "postinst {name} {version}" >> {self.order}\n'}
        for script, text in (scripts or {}).items():
            logged[script] = logged.get(script, "") + text
        return make_deb(self.built, name, version,
                        files={f"usr/share/{name}/version": version, **(files or {})},
                        scripts=logged)

    def publish(self, version: int, debs: Sequence[Path] = (), *,
                run: str | None = 'echo "run $OPQ_UPDATE_VERSION $(pwd)"',
                healthcheck: str | None = "echo healthcheck", rollout: int = 100,
                version_file: str = "version.json") -> None:
        """Sign and publish release ``version`` carrying ``debs`` (in this order), a run script
        and a health check; each script's output is appended to the order log."""
        def script(body: str | None) -> bytes | None:
            if body is None:
                return None
            return f"#!/bin/sh\n{{\n{body}\n}} >> {self.order}\n".encode()

        package = self.sim.make_package(
            version, debs={deb.name: deb.read_bytes() for deb in debs}, run=script(run),
            healthcheck=script(healthcheck))
        self.sim.publish(version, package=package, rollout=rollout, version_file=version_file)

    # --- the box -------------------------------------------------------------------------

    def hook(self, directory: str, name: str, body: str, box: Box | None = None) -> Path:
        """An executable hook ``<hooks_dir>/<directory>/<name>`` running ``body``."""
        path = (box or self.box).hooks_dir / directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
        return path

    def run(self, *args: str, expect: int | None = None, box: Box | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The CLI on ``box`` (default the world's); with ``expect``, assert its exit code and
        that an error never comes with a traceback."""
        proc = (box or self.box).run(*args, env=env)
        if expect is not None:
            assert proc.returncode == expect, (
                f"{args}: exit {proc.returncode}, wanted {expect}\n{proc.stderr}")
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def installed(self, box: Box | None = None) -> dict[str, str]:
        """Every package dpkg knows in the box's root: ``version`` when fully installed
        (``ii``), else ``version <status abbreviation>``."""
        return installed(box or self.box)

    def assert_clean(self, expected: Mapping[str, str],
                     box: Box | None = None) -> dict[str, Any]:
        """dpkg shows exactly ``expected``, each ``install ok installed``; ``dpkg --audit``
        is silent; the journal is idle and the installed release's packages, as the state
        records them, are what dpkg shows. Returns ``status --json``."""
        box = box or self.box
        assert self.installed(box) == dict(expected)
        audit = subprocess.run(dpkg_command(box.dpkg_root, "--audit"), capture_output=True,
                               text=True)
        assert audit.returncode == 0 and audit.stdout == "", audit.stdout + audit.stderr
        status = box.status()
        assert status["phase"] == "idle"
        if status["installed_version"]:
            assert status["applied_packages"] == dict(expected)
        return status


def installed(box: Box) -> dict[str, str]:
    out = subprocess.run(
        [require_tool("dpkg-query"), f"--root={box.dpkg_root}", "-W",
         "-f=${Package} ${Version} ${db:Status-Abbrev}\n"],
        capture_output=True, text=True).stdout  # exit 1 with no package at all
    result = {}
    for line in out.splitlines():
        name, version, abbrev = line.split(" ", 2)
        result[name] = version if abbrev.strip() == "ii" else f"{version} {abbrev.strip()}"
    return result


@pytest.fixture
def world(tmp_path: Path, box_factory: Any) -> Iterator[World]:
    for tool in DPKG_TOOLS:
        require_tool(tool)
    sim = RepoSim(tmp_path / "repo")
    with FaultServer(sim.path) as server:
        yield World(tmp_path, sim, server, box_factory(server.url, sim.anchor))


def install_v1(w: World) -> None:
    """Release 1: ``alpha`` 1.0, installed through the CLI (so its deb is in the rollback cache)."""
    w.publish(1, [w.deb("alpha", "1.0")])
    w.run("run", expect=OK)
    w.assert_clean({"alpha": "1.0"})
    w.forget()


def publish_v2(w: World, *, run: str | None = 'echo "run $OPQ_UPDATE_VERSION $(pwd)"',
               healthcheck: str | None = "echo healthcheck",
               alpha: Mapping[str, str] | None = None,
               beta: Mapping[str, str] | None = None) -> None:
    """Release 2: ``alpha`` 2.0 (an upgrade) and ``beta`` 1.0 (new), a run script and a
    health check; ``alpha``/``beta`` add maintainer script lines to either deb."""
    w.publish(2, [w.deb("alpha", "2.0", alpha), w.deb("beta", "1.0", beta)],
              run=run, healthcheck=healthcheck)


# --- success --------------------------------------------------------------------------------


def test_two_debs_run_script_and_every_hook_in_order_with_the_documented_env(
        world: World) -> None:
    w = world
    install_v1(w)
    for directory in HOOK_DIRS:
        w.hook(directory, "10-log", f'echo "{directory[:-2]}" {ENV_LINE} >> {w.order}')
    publish_v2(w, run=f'echo "run" {ENV_LINE} "$(pwd)"',
               healthcheck=f'echo "healthcheck" {ENV_LINE}')

    w.run("run", expect=OK)

    w.assert_clean({"alpha": "2.0", "beta": "1.0"})
    assert (w.box.dpkg_root / "usr/share/beta/version").read_text() == "1.0"
    lines = w.lines()
    names = [line.split(" ")[0] for line in lines]
    assert names == ["pre-update", "pre-invoke", "postinst", "postinst", "run", "post-invoke",
                     "healthcheck", "health", "post-update"]
    assert lines[2:4] == ["postinst alpha 2.0", "postinst beta 1.0"]
    update_dir = lines[0].split(" ")[3]
    assert Path(update_dir).parent == w.box.download_dir
    for line in (lines[:2] + lines[4:]):
        assert line.split(" ")[1:5] == ["2", "1", update_dir, str(w.box.dpkg_root)], line
    assert lines[4].split(" ")[-1] == update_dir  # the run script's working directory
    assert not Path(update_dir).exists()  # the extraction is removed after the run

    status = w.box.status()
    assert status["installed_version"] == 2
    assert status["applied_packages"] == {"alpha": "2.0", "beta": "1.0"}
    assert status["last_result"] == "updated" and status["failed_versions"] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["last_run"])


# --- failures and rollback ------------------------------------------------------------------

#: Where release 2 fails -> how: a box hook that exits 1 ("hook"), or the package's own
#: ``run`` / ``healthcheck`` script, or ``beta``'s postinst.
FAILURES = {
    "pre-invoke.d": "hook",
    "dpkg (postinst)": "beta",
    "run script": "run",
    "post-invoke.d": "hook",
    "healthcheck": "healthcheck",
    "health.d": "hook",
}


def package_requests(w: World) -> int:
    return sum(r.path.startswith("/packages/") for r in w.server.log)


@pytest.mark.parametrize("where", FAILURES)
def test_each_failure_rolls_back_marks_failed_skips_then_force_and_newer_release(
        world: World, where: str) -> None:
    w = world
    install_v1(w)
    how = FAILURES[where]
    if how == "hook":
        bad_hook = w.hook(where, "50-fail", f"echo '{where} says no'; exit 1")
        publish_v2(w)
    elif how == "beta":
        publish_v2(w, beta={"postinst": "echo 'cannot configure beta' >&2; exit 1\n"})
    elif how == "run":
        publish_v2(w, run="echo 'run failing'; exit 3")
    else:
        publish_v2(w, healthcheck="echo 'healthcheck failing'; exit 1")

    proc = w.run("run", expect=APPLY_FAILED)
    assert "release 2 failed and was rolled back" in proc.stderr
    w.assert_clean({"alpha": "1.0"})  # alpha downgraded, beta purged: exactly as before
    assert not (w.box.dpkg_root / "usr/share/beta").exists()
    assert (w.box.dpkg_root / "usr/share/alpha/version").read_text() == "1.0"
    status = w.box.status()
    assert (status["installed_version"], status["failed_versions"]) == (1, [2])
    assert status["last_result"] == "apply-failed" and status["unrestored_packages"] == []
    assert status["applied_packages"] == {"alpha": "1.0"}

    # The next run skips the failed release without downloading or running anything.
    w.forget()
    requests = package_requests(w)
    proc = w.run("run", expect=OK)
    assert "failed before; skipped" in proc.stderr
    assert w.box.status()["last_result"] == "skipped-failed"
    assert package_requests(w) == requests and w.lines() == []
    w.run("check", expect=OK)  # nothing run would install now
    w.assert_clean({"alpha": "1.0"})

    # --force retries it: the same package fails again; with the box's hook fixed it passes.
    if how == "hook":
        bad_hook.unlink()
        w.run("run", "--force", expect=OK)
        w.assert_clean({"alpha": "2.0", "beta": "1.0"})
        assert w.box.status()["failed_versions"] == []
    else:
        w.run("run", "--force", expect=APPLY_FAILED)
        assert "postinst alpha 2.0" in w.lines()  # it really was applied again
        w.assert_clean({"alpha": "1.0"})
        assert w.box.status()["failed_versions"] == [2]

    # A higher release is tried normally.
    w.publish(3, [w.deb("alpha", "3.0"), w.deb("beta", "3.0")])
    w.run("run", expect=OK)
    w.assert_clean({"alpha": "3.0", "beta": "3.0"})
    status = w.box.status()
    assert status["installed_version"] == 3 and status["last_result"] == "updated"


def test_pre_update_veto_postpones_without_changing_anything(world: World) -> None:
    w = world
    install_v1(w)
    w.hook("pre-update.d", "10-log", f"echo pre-update >> {w.order}")
    veto = w.hook("pre-update.d", "20-veto", "echo 'battery low, not now'; exit 1")
    w.hook("pre-invoke.d", "10-log", f"echo pre-invoke >> {w.order}")
    publish_v2(w)
    before = tree_digest(w.box.dpkg_root, w.box.state_dir / "debs", w.box.hooks_dir)

    proc = w.run("run", expect=OK)
    assert "release 2 postponed: a pre-update.d hook vetoed" in proc.stderr, proc.stderr
    assert w.lines() == ["pre-update"]  # the veto came before anything else
    assert tree_digest(w.box.dpkg_root, w.box.state_dir / "debs", w.box.hooks_dir) == before
    w.assert_clean({"alpha": "1.0"})
    status = w.box.status()
    assert status["last_result"] == "postponed"
    assert (status["installed_version"], status["failed_versions"]) == (1, [])
    w.run("check", expect=UPDATE_AVAILABLE)  # not marked failed: still wanted

    veto.unlink()
    w.run("run", expect=OK)
    w.assert_clean({"alpha": "2.0", "beta": "1.0"})


# --- dry run and check ----------------------------------------------------------------------


def test_dry_run_says_what_it_would_do_and_changes_nothing(world: World) -> None:
    w = world
    install_v1(w)
    for directory in HOOK_DIRS:
        w.hook(directory, "10-log", f'echo "{directory}" >> {w.order}')
    publish_v2(w)
    sha = w.sim.current().package.sha256  # type: ignore[union-attr]
    w.run("check", expect=UPDATE_AVAILABLE)  # records the metadata, as apt update would
    before = w.box.digest()
    downloads = tree_digest(w.box.download_dir)

    proc = w.run("run", "--dry-run", expect=OK)

    out = proc.stdout  # the plan is the output asked for: stdout, even with -q
    for expected in (f"would download packages/{sha}.zip", "package for release 2:",
                     "alpha 2.0 (all) from alpha_2.0_all.deb",
                     "beta 1.0 (all) from beta_1.0_all.deb",
                     "run script update.sh: run once every package is installed",
                     "health check healthcheck.sh",
                     f"run-parts --exit-on-error {w.box.hooks_dir}/pre-update.d",
                     f"dpkg --root={w.box.dpkg_root}",
                     f"--pre-invoke=run-parts --exit-on-error {w.box.hooks_dir}/pre-invoke.d",
                     "opq_box_updater.guard", f"run-parts {w.box.hooks_dir}/post-update.d"):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert out.index("alpha 2.0") < out.index("beta 1.0")  # manifest order
    assert w.box.digest() == before  # state, dpkg root, hooks, caches: byte for byte
    assert tree_digest(w.box.download_dir) == downloads
    assert w.lines() == []  # no hook, maintainer script or run script ran
    w.assert_clean({"alpha": "1.0"})
    assert w.box.status()["last_result"] == "dry-run"

    w.run("check", expect=UPDATE_AVAILABLE)
    w.run("run", expect=OK)
    w.assert_clean({"alpha": "2.0", "beta": "1.0"})
    proc = w.run("check", expect=OK)
    assert "up to date" in proc.stdout


# --- phased rollout and the random delay ----------------------------------------------------


def box_ids(version: int, percent: int) -> tuple[str, str]:
    """A box id inside and one outside ``percent`` for release ``version`` (DESIGN 2.3)."""
    inside = next(f"box-{i}" for i in range(1000) if rollout_bucket(f"box-{i}", version) <
                  percent)
    outside = next(f"box-{i}" for i in range(1000) if rollout_bucket(f"box-{i}", version) >=
                   percent)
    return inside, outside


def test_phased_rollout_and_random_delay(world: World, box_factory: Any) -> None:
    w = world
    inside_id, outside_id = box_ids(1, 30)
    inside = box_factory(w.server.url, w.sim.anchor, name="inside", box_id=inside_id)
    outside = box_factory(w.server.url, w.sim.anchor, name="outside", box_id=outside_id)
    w.publish(1, [w.deb("alpha", "1.0")], rollout=30)

    proc = w.run("run", box=outside, expect=OK)
    assert "rolled out to 30% of boxes; not this one yet" in proc.stderr
    assert outside.status()["last_result"] == "outside-rollout"
    assert package_requests(w) == 0  # no download at all
    w.run("check", box=outside, expect=OK)
    assert w.installed(outside) == {} and outside.status()["installed_version"] == 0
    assert tree_digest(outside.download_dir) == {}  # nothing downloaded or extracted

    w.run("check", box=inside, expect=UPDATE_AVAILABLE)
    started = time.monotonic()
    w.run("run", "--random-delay", "1", box=inside, expect=OK)
    assert time.monotonic() - started < 30
    w.assert_clean({"alpha": "1.0"}, box=inside)
    assert package_requests(w) >= 1

    # The operators widen the rollout of the same release: the other box follows.
    w.sim.now += timedelta(seconds=1)
    w.publish(1, [w.deb("alpha", "1.0")], rollout=100)
    w.run("run", "--random-delay", "1", box=outside, expect=OK)
    w.assert_clean({"alpha": "1.0"}, box=outside)
    assert outside.status()["installed_version"] == 1


# --- two runs at once -----------------------------------------------------------------------


def test_a_second_run_exits_6_naming_the_holder_while_the_first_sits_in_a_hook(
        world: World) -> None:
    w = world
    inside, go_on = w.tmp / "inside-hook", w.tmp / "go-on"
    w.hook("pre-invoke.d", "10-slow",
           f"touch {inside}; i=0; while [ ! -e {go_on} ] && [ $i -lt 600 ]; do "
           "sleep 0.05; i=$((i+1)); done")
    w.publish(1, [w.deb("alpha", "1.0")])
    first = subprocess.Popen(
        [PY, "-m", "opq_box_updater.cli", "--config", str(w.box.config_path), "run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not inside.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never reached its hook"
            time.sleep(0.05)

        proc = w.run("run", expect=LOCKED)
        assert f"pid {first.pid}" in proc.stderr and "holds" in proc.stderr
        w.run("check", expect=LOCKED)
        status = w.box.status()  # status never takes the lock
        assert status["phase"] == "applying" and status["installed_version"] == 0
    finally:
        go_on.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == OK, stderr
    w.assert_clean({"alpha": "1.0"})
    assert w.box.status()["last_result"] == "updated"


# --- self-update ----------------------------------------------------------------------------

SITE = "usr/lib/python3/dist-packages"
#: Instrumentation added to the copied guard: it records which updater version it belongs to.
GUARD_MARK = '''    args = parser.parse_args(argv)
    from . import __version__ as _selftest_version
    if os.environ.get("OPQ_TEST_GUARD_LOG"):
        with open(os.environ["OPQ_TEST_GUARD_LOG"], "a") as _log:
            _log.write(_selftest_version + "\\n")
'''


def updater_deb(out_dir: Path, version: str) -> Path:
    """An ``opq-box-updater`` deb shipping this tree's ``opq_box_updater`` package (sources
    only) under /usr/lib/python3/dist-packages, as Debian's package does, with
    ``__version__`` set to ``version`` and the guard instrumented."""
    import opq_box_updater

    src = Path(opq_box_updater.__file__).parent
    files: dict[str, str | bytes] = {}
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src.parent).as_posix()
        text = path.read_text()
        if rel == "opq_box_updater/__init__.py":
            text, n = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text)
            assert n == 1
            # Sizes differ from build to build: debs built within one second give the same
            # mtime, and Python would then take a child's cached bytecode of the previous
            # version for this one (Debian's py3compile/py3clean handle this for real debs).
            text += f"# build {version} {'.' * int(version.split('.')[0])}\n"
        elif rel == "opq_box_updater/guard.py":
            assert "    args = parser.parse_args(argv)\n" in text
            text = text.replace("    args = parser.parse_args(argv)\n", GUARD_MARK, 1)
        files[f"{SITE}/{rel}"] = text
    return make_deb(out_dir, "opq-box-updater", version, files=files)


def _python_seeing(venv: Path, site: Path) -> str:
    """A Python (a venv over the system's packages) whose path has ``site`` before the
    system's own: found by ``python3 -I`` too, unlike ``PYTHONPATH``."""
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, capture_output=True)
    (lib,) = venv.glob("lib/python3*/site-packages")
    (lib / "box-root.pth").write_text(f"{site}\n")
    return str(venv / "bin" / "python3")


def test_self_update_replaces_the_running_updater_and_the_next_run_uses_it(
        world: World) -> None:
    """An update carrying a newer ``opq-box-updater`` deb replaces the very files the running
    updater was loaded from. The box here runs the updater from the copy dpkg installed in its
    root, through a Python whose own path leads there (as /usr/bin/python3 finds
    dist-packages on a box: children get no ``PYTHONPATH``); the guard that dpkg starts after
    the unpack, the run script and the next run must all be the new code.
    (``test_debian_install.py`` does the same with the real Debian package in an mmdebstrap
    root.)"""
    w = world
    guard_log = w.tmp / "guard.log"
    box_py = _python_seeing(w.tmp / "box-python", w.box.dpkg_root / SITE)
    env = {"PYTHONDONTWRITEBYTECODE": "1", "OPQ_TEST_GUARD_LOG": str(guard_log)}
    workdir = w.tmp / "elsewhere"  # not the source tree: ``-m`` puts the cwd on sys.path
    workdir.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [box_py, "-m", "opq_box_updater.cli", "--config", str(w.box.config_path), *args],
            capture_output=True, text=True, timeout=300, cwd=workdir, env={**os.environ, **env})

    def loaded_from() -> str:
        return subprocess.run(
            [box_py, "-c", "import opq_box_updater as m; print(m.__file__, m.__version__)"],
            capture_output=True, text=True, check=True, cwd=workdir,
            env={**os.environ, **env}).stdout.strip()

    # The box as provisioned: version 1 of the updater installed by dpkg (and, as apt leaves
    # it, its deb in apt's archive cache).
    v1 = updater_deb(w.built, "1.0.0+selftest1")
    subprocess.run(dpkg_command(w.box.dpkg_root, "-i", str(v1)), check=True,
                   capture_output=True)
    archives = w.box.dpkg_root / "var/cache/apt/archives"
    archives.mkdir(parents=True)
    shutil.copy(v1, archives / v1.name)
    assert loaded_from() == f"{w.box.dpkg_root / SITE}/opq_box_updater/__init__.py " \
        "1.0.0+selftest1"
    assert cli("--version").stdout.strip() == "opq-box-updater 1.0.0+selftest1"

    probe = f"{box_py} -c 'import opq_box_updater as m; print(m.__version__)'"
    w.publish(2, [updater_deb(w.built, "2.0.0+selftest2")], run=f'echo "run $({probe})"',
              healthcheck=f'echo "health $({probe})"')
    proc = cli("run")
    assert proc.returncode == OK, proc.stderr
    assert w.installed() == {"opq-box-updater": "2.0.0+selftest2"}
    assert guard_log.read_text().splitlines() == ["2.0.0+selftest2"]  # the new guard ran
    assert w.lines() == ["run 2.0.0+selftest2", "health 2.0.0+selftest2"]
    assert cli("--version").stdout.strip() == "opq-box-updater 2.0.0+selftest2"
    proc = cli("-v", "run")
    assert proc.returncode == OK and "opq-box-updater 2.0.0+selftest2: run" in proc.stderr
    assert "up to date (release 2)" in proc.stderr
    w.assert_clean({"opq-box-updater": "2.0.0+selftest2"})

    # A broken self-update is rolled back by the updater it was replacing.
    w.forget()
    w.publish(3, [updater_deb(w.built, "3.0.0+selftest3")], run=None,
              healthcheck=f'echo "health $({probe})"; exit 1')
    proc = cli("run")
    assert proc.returncode == APPLY_FAILED, proc.stderr
    assert w.lines() == ["health 3.0.0+selftest3"]
    w.assert_clean({"opq-box-updater": "2.0.0+selftest2"})
    assert cli("--version").stdout.strip() == "opq-box-updater 2.0.0+selftest2"
    assert cli("run").returncode == OK  # skips the failed release, with the restored code


# --- issue 12, items 2 and 3: hooks are root's; a run script that reboots -----------------


def test_a_hook_another_user_could_change_postpones_without_changing_anything(
        world: World) -> None:
    w = world
    install_v1(w)
    w.hook("pre-update.d", "10-log", f"echo pre-update >> {w.order}")
    planted = w.hook("health.d", "10-planted", f"echo planted >> {w.order}")
    os.chown(planted, 65534, 65534)  # nobody
    planted.chmod(0o777)
    publish_v2(w)
    before = tree_digest(w.box.dpkg_root, w.box.state_dir / "debs", w.box.hooks_dir)

    proc = w.run("run", expect=OK)
    assert "release 2 postponed: not running hooks another user could change: hook " \
           f"{planted} is owned by uid 65534" in proc.stderr, proc.stderr
    assert w.lines() == []  # not even the root-owned pre-update.d hook ran
    assert tree_digest(w.box.dpkg_root, w.box.state_dir / "debs", w.box.hooks_dir) == before
    w.assert_clean({"alpha": "1.0"})
    status = w.box.status()
    assert (status["last_result"], status["installed_version"], status["failed_versions"]) \
        == ("postponed", 1, [])

    os.chown(planted, 0, 0)
    planted.chmod(0o755)
    w.run("run", expect=OK)
    w.assert_clean({"alpha": "2.0", "beta": "1.0"})
    assert [x for x in w.lines() if x in ("pre-update", "planted")] == ["pre-update", "planted"]


#: Shell: what a reboot does to the run: SIGKILL every ancestor up to the updater, and the
#: run script's own process group.
REBOOT = """
pids="" p=$PPID
while [ "$p" -gt 1 ]; do
    pids="$p $pids"
    tr '\\0' ' ' < /proc/$p/cmdline | grep -q 'opq_box_updater[.]cli' && break
    p=$(awk '/^PPid:/ {print $2}' /proc/$p/status)
done
kill -9 $pids 0
"""


def test_a_run_script_that_reboots_at_once_is_rolled_back_and_given_up_on(
        world: World) -> None:
    """The journal says ``applying`` and the guard's status ``started`` when the box goes
    down; each next run recovers before any network request: the script was cut off, so
    the update is rolled back (exit 5) and retried, and the third interruption counts as a
    failure (docs/reliability.md, "Scripts that reboot the box")."""
    w = world
    install_v1(w)
    publish_v2(w, run=f"echo rebooting >> {w.order}\n{REBOOT}\necho 'not reached'")
    for interruption in (1, 2, 3):
        killed = w.run("run")
        assert killed.returncode == -9, killed.stderr
        assert json.loads((w.box.state_dir / "state.json").read_bytes())["journal"]["phase"] \
            == "applying"
        proc = w.run("run", expect=APPLY_FAILED)
        w.assert_clean({"alpha": "1.0"})
        if interruption < 3:
            assert f"(interruption {interruption} of 3)" in proc.stderr, proc.stderr
            assert w.box.status()["failed_versions"] == []
    assert "interrupted 3 times, it now counts as failed" in proc.stderr, proc.stderr
    assert w.box.status()["failed_versions"] == [2]
    assert [x for x in w.lines() if not x.startswith("postinst")] == ["rebooting"] * 3
