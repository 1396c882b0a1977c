"""Multi-Arch: same packages in the rollback (issue 12, item 3).

``libfoo:amd64`` and ``libfoo:i386`` are two installed instances of one package. The
snapshot, the rollback, the guard and the rollback cache key them apart (``name:arch``, as
dpkg's ``${binary:Package}``); keyed by ``${Package}`` the second copy was neither purged
nor restored. Real debs, dpkg in a temporary root with a foreign architecture added.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from debs import dpkg_command, make_deb, require_tool
from test_installer import Sandbox, sandbox  # noqa: F401
from test_rollback_scope import _apply

from opq_box_updater.applyplan import apt_keys, decode_states, encode_states
from opq_box_updater.guard import PackageState, not_installed, parse_query
from opq_box_updater.installer import UpdatePlan
from opq_box_updater.package import dpkg_architectures, inspect_debs

SAME = {"Multi-Arch": "same"}


def _architectures() -> tuple[str, str]:
    native = subprocess.run([require_tool("dpkg"), "--print-architecture"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return native, "i386" if native != "i386" else "amd64"


@pytest.fixture
def box(sandbox: Sandbox) -> Sandbox:  # noqa: F811
    """A sandbox whose dpkg database also takes the foreign architecture."""
    _native, foreign = _architectures()
    subprocess.run(dpkg_command(sandbox.root, "--add-architecture", foreign), check=True,
                   capture_output=True)
    return sandbox


def _libfoo(box: Sandbox, version: str, arch: str) -> Path:
    # files shared by the instances must be identical, as dpkg requires
    return make_deb(box.debs, "libfoo", version, arch=arch, extra_control=SAME,
                    files={"usr/share/doc/libfoo/version": version})


def _plan(box: Sandbox, version: int, debs: list[Path],
          healthcheck: str | None = None) -> UpdatePlan:
    """``Sandbox.plan`` with the debs read by the box's own inspection (Multi-Arch too)."""
    plan = box.plan(version, debs, healthcheck=healthcheck)
    infos = inspect_debs(plan.workdir, plan.manifest, dpkg_architectures(box.root))
    return dataclasses.replace(plan, debs=infos)


def test_both_instances_go_back_to_the_old_version(box: Sandbox) -> None:
    native, foreign = _architectures()
    v1 = _plan(box, 1, [_libfoo(box, "1.0", native), _libfoo(box, "1.0", foreign)])
    assert set(v1.targets) == {f"libfoo:{native}", f"libfoo:{foreign}"}
    installer = box.installer()
    installer.apply(v1)
    installer.cache_debs(v1)
    v2 = _plan(box, 2, [_libfoo(box, "2.0", native), _libfoo(box, "2.0", foreign)],
               healthcheck="exit 1")
    error, state = _apply(box, v2)
    assert "rolled back" in str(error) and "incomplete" not in str(error)
    assert state.unrestored == ()
    assert _instances(box) == {f"libfoo:{native}": "1.0 ii", f"libfoo:{foreign}": "1.0 ii"}
    cached = sorted(p.name for p in (box.config.state_dir / "debs").glob("*.deb"))
    assert cached == [f"libfoo_1.0_{a}.deb" for a in sorted((native, foreign))]


def test_a_second_instance_the_update_added_is_purged_alone(box: Sandbox) -> None:
    native, foreign = _architectures()
    installer = box.installer()
    v1 = _plan(box, 1, [_libfoo(box, "1.0", native)])
    installer.apply(v1)
    installer.cache_debs(v1)
    v2 = _plan(box, 2, [_libfoo(box, "1.0", foreign), box.deb("app", "2.0")],
               healthcheck="exit 1")
    assert v2.targets == {f"libfoo:{foreign}": "1.0", "app": "2.0"}
    error, state = _apply(box, v2)
    assert "rolled back" in str(error) and state.unrestored == ()
    assert _instances(box) == {f"libfoo:{native}": "1.0 ii"}
    log = (box.root / "var/log/dpkg.log").read_text()
    assert f"status not-installed libfoo:{foreign}" in log  # purged
    assert (box.root / "usr/share/doc/libfoo/version").read_text() == "1.0"


def test_the_cache_keeps_each_architecture(box: Sandbox) -> None:
    """Pruning works per package *and* architecture: keeping libfoo 3.0 for amd64 must not
    throw away the i386 debs a rollback of the next update needs."""
    native, foreign = _architectures()
    installer = box.installer()
    for version, number in (("1.0", 1), ("2.0", 2), ("3.0", 3)):
        plan = _plan(box, number, [_libfoo(box, version, native),
                                   _libfoo(box, version, foreign)])
        installer.apply(plan)
        installer.cache_debs(plan)
    cached = sorted(p.name for p in (box.config.state_dir / "debs").glob("*.deb"))
    assert cached == sorted(f"libfoo_{v}_{a}.deb" for v in ("2.0", "3.0")
                            for a in (native, foreign))


def _instances(box: Sandbox) -> dict[str, str]:
    out = subprocess.run([require_tool("dpkg-query"), f"--root={box.root}", "-W",
                          "-f=${binary:Package} ${Version} ${db:Status-Abbrev}\n"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split(" ")[0]: line.split(" ", 1)[1].strip() for line in out.splitlines()
            if line.startswith("libfoo")}


# --- the keys, without dpkg -----------------------------------------------------------------


def test_query_lines_are_keyed_per_instance() -> None:
    mark = "opq-pkg"
    output = "\n".join([
        f"{mark}\tlibfoo\tamd64\tsame\t1.0\tinstall ok installed",
        f"{mark}\tlibfoo\ti386\tsame\t1.0\tinstall ok installed",
        f"{mark}\ttool\ti386\tforeign\t2.0\tinstall ok installed",
        f"{mark}\tdoc\tall\tno\t3.0\tdeinstall ok config-files"])
    assert parse_query(output) == {
        "libfoo:amd64": PackageState("1.0", "install ok installed", "amd64"),
        "libfoo:i386": PackageState("1.0", "install ok installed", "i386"),
        "tool": PackageState("2.0", "install ok installed", "i386"),
        "doc": PackageState("3.0", "deinstall ok config-files", "all")}


def test_journal_states_stay_readable_by_an_older_updater() -> None:
    """An older updater reads ``rpartition(" ")``: the last word must stay the version."""
    states = {"libfoo:i386": PackageState("1:1.0", "install ok installed", "i386")}
    encoded = encode_states(states)
    assert encoded == {"libfoo:i386": "install ok installed 1:1.0"}
    assert encoded["libfoo:i386"].rpartition(" ")[2] == "1:1.0"
    assert decode_states(encoded) == {
        "libfoo:i386": PackageState("1:1.0", "install ok installed", "")}


def test_an_older_updaters_bare_name_stands_for_every_instance() -> None:
    """The guard of a new updater run with an old updater's ``--expect libfoo=2.0``."""
    states = {"libfoo:amd64": PackageState("2.0", "install ok installed", "amd64"),
              "libfoo:i386": PackageState("1.0", "install ok installed", "i386")}
    assert not_installed({"libfoo": "2.0"}, states) == ["libfoo:i386 is at 1.0, not 2.0"]
    assert not_installed({"libfoo:amd64": "2.0"}, states) == []


def test_apt_names_map_to_instances() -> None:
    states = {"libfoo:amd64": PackageState("1.0", "install ok installed", "amd64"),
              "libfoo:i386": PackageState("1.0", "install ok installed", "i386"),
              "tool": PackageState("1.0", "install ok installed", "i386")}
    assert apt_keys("libfoo", states, "amd64") == ["libfoo:amd64"]
    assert apt_keys("libfoo:i386", states, "amd64") == ["libfoo:i386"]
    assert apt_keys("tool:i386", states, "amd64") == ["tool"]
    assert apt_keys("new", states, "amd64") == ["new", "new:all", "new:amd64"]
