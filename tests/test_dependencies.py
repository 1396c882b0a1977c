"""Dependencies a box lacks (issue 13, 4; DESIGN 3.2).

With ``installer: dpkg`` a release whose debs need a package the box lacks fails with
``dependency problems - leaving unconfigured``: the box's one-line error must name what is
missing, and ``opq-box-publish build``/``release`` warn before such a release goes out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from debs import make_deb
from test_apply_e2e import APPLY_FAILED, World, install_v1, world  # noqa: F401

from opq_box_updater.applyplan import error_summary, missing_dependencies
from opq_box_updater.publish import cli
from opq_box_updater.publish.build import (
    DebRelations,
    build_package,
    order_problems,
    read_base_packages,
    unmet_dependencies,
)
from opq_box_updater.publish.common import PublishError

#: dpkg 1.21.22 (Debian 12), ``dpkg -i app_2.0_all.deb pre_1.0_all.deb`` in a root holding
#: only libold 1.0 (stderr; stdout's progress lines interleave in the real run).
DPKG_OUTPUT = """\
Selecting previously unselected package app.
(Reading database ... 1 file or directory currently installed.)
Preparing to unpack /tmp/depx/app_2.0_all.deb ...
Unpacking app (2.0) ...
dpkg: regarding /tmp/depx/pre_1.0_all.deb containing pre, pre-dependency problem:
 pre pre-depends on libpre
  libpre is not installed.

dpkg: error processing archive /tmp/depx/pre_1.0_all.deb (--install):
 pre-dependency problem - not installing pre
dpkg: dependency problems prevent configuration of app:
 app depends on libfoo (>= 1.2); however:
  Package libfoo is not installed.
 app depends on libbar | libbaz; however:
  Package libbar is not installed.
  Package libbaz is not installed.
 app depends on libold (>= 2.0); however:
  Version of libold on system is 1.0.
 app depends on libq:amd64; however:
  Package libq is not installed.

dpkg: error processing package app (--install):
 dependency problems - leaving unconfigured
Errors were encountered while processing:
 /tmp/depx/pre_1.0_all.deb
 app
"""

#: apt-get 2.6 installing ./app_2.0_all.deb whose dependencies no source has.
APT_OUTPUT = """\
Reading package lists...
Building dependency tree...
Some packages could not be installed. This may mean that you have
requested an impossible situation or if you are using the unstable
distribution that some required packages have not yet been created
or been moved out of Incoming.
The following information may help to resolve the situation:

The following packages have unmet dependencies:
 app : Depends: libfoo (>= 1.2) but it is not installable
       Depends: libq but it is not going to be installed
E: Unable to correct problems, you have held broken packages.
"""


# --- the box: naming what dpkg says is missing -----------------------------------------------


def test_missing_dependencies_in_dpkgs_output() -> None:
    assert missing_dependencies(DPKG_OUTPUT) == [
        "pre needs libpre (not installed)",
        "app needs libfoo (>= 1.2) (not installed), libbar | libbaz (libbar not installed, "
        "libbaz not installed), libold (>= 2.0) (libold 1.0 is installed), libq:amd64 "
        "(not installed)"]


def test_missing_dependencies_in_apts_output() -> None:
    assert missing_dependencies(APT_OUTPUT) == [
        "app needs libfoo (>= 1.2) (not installable), libq (not going to be installed)"]


@pytest.mark.parametrize("output", ["", "dpkg: error processing archive x.deb (--install):\n"
                                        " cannot access archive: No such file or directory\n",
                                    "Setting up app (2.0) ...\n"])
def test_no_dependency_problem_reads_as_none(output: str) -> None:
    assert missing_dependencies(output) == []
    assert "missing" not in error_summary(output)


def test_the_summary_is_one_line_naming_the_packages() -> None:
    summary = error_summary(DPKG_OUTPUT)
    assert "\n" not in summary
    assert summary.startswith("missing dependencies: pre needs libpre (not installed); app "
                              "needs libfoo (>= 1.2)")
    assert "use installer: apt" in summary
    assert summary.endswith("dependency problems - leaving unconfigured")
    assert "apt sources" in error_summary(APT_OUTPUT, "apt-get")


def test_a_release_needing_a_package_the_box_lacks_names_it_and_rolls_back(
        world: World) -> None:  # noqa: F811
    w = world
    install_v1(w)
    before = w.installed()
    app = make_deb(w.built, "app", "2.0", depends="libmissing (>= 3), alpha (>= 1.0)")
    w.publish(2, [w.deb("alpha", "2.0"), app])
    proc = w.run("run", expect=APPLY_FAILED)
    line = proc.stderr.strip().splitlines()[-1]
    assert "app needs libmissing (>= 3) (not installed)" in line
    assert "alpha" not in line.partition("missing dependencies:")[2].partition(" - ")[0]
    assert "app needs libmissing (>= 3)" in w.box.log_file.read_text()
    status = w.assert_clean(before)  # app purged, alpha back at 1.0
    assert (status["installed_version"], status["failed_versions"]) == (1, [2])
    assert "run 2" not in "\n".join(w.lines())  # the guard kept the run script from running


# --- the publisher: warning before the release goes out ---------------------------------------


RELEASE = [DebRelations("app", "2.0", "", "libc6 (>= 2.36), mta | exim4, lib (>= 1.1)"),
           DebRelations("lib", "1.2", "mta"),
           DebRelations("tool", "1.0", "", "python3:any, app (= 2.0), virt (>= 2)"),
           DebRelations("virt-impl", "1.0", "virt (= 2.5)")]


@pytest.mark.parametrize(("debs", "base", "unmet"), [
    # inside the release: real packages, versions compared, unversioned and versioned Provides
    (RELEASE, {"libc6": "2.36-9", "python3": None}, []),
    # no base set: what the release cannot satisfy itself
    (RELEASE, None, ["app 2.0 needs libc6 (>= 2.36)", "tool 1.0 needs python3:any"]),
    # a base version too old; a base name without version meets any constraint
    (RELEASE, {"libc6": "2.31-13", "python3": "3.11.2-1"}, ["app 2.0 needs libc6 (>= 2.36)"]),
    (RELEASE, {"libc6": None, "python3": None}, []),
    # a version outside the release: lib 1.0 does not meet (>= 1.1)
    ([DebRelations("app", "2", "", "lib (>= 1.1)"), DebRelations("lib", "1.0")], {},
     ["app 2 needs lib (>= 1.1)"]),
    # an unversioned Provides never meets a versioned relation (Debian policy 7.5)
    ([DebRelations("app", "2", "", "mta (>= 1)"), DebRelations("exim", "4", "mta")], {},
     ["app 2 needs mta (>= 1)"]),
    # Pre-Depends is read as well; alternatives are met by either side
    ([DebRelations("app", "2", "", "libpre, a | b")], {"b": None}, ["app 2 needs libpre"]),
    # epochs and tildes compare as dpkg does
    ([DebRelations("app", "2", "", "lib (>> 1.0), lib (<< 2.0~)")], {"lib": "1:0.5"},
     ["app 2 needs lib (<< 2.0~)"]),
])
def test_unmet_dependencies(debs: list[DebRelations], base: dict[str, str | None] | None,
                            unmet: list[str]) -> None:
    assert unmet_dependencies(debs, base) == unmet


def test_read_base_packages_takes_dpkg_query_output(tmp_path: Path) -> None:
    path = tmp_path / "base.txt"
    path.write_text("# the box image\nlibc6:armhf\t2.36-9\npython3\n\nbase-files 12.4  # x\n")
    assert read_base_packages(path) == {"libc6": "2.36-9", "python3": None,
                                        "base-files": "12.4"}
    path.write_text("libc6 2.36 extra\n")
    with pytest.raises(PublishError, match=r"base\.txt:1: expected a package name"):
        read_base_packages(path)


def test_build_and_release_warn_about_what_boxes_may_lack(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = make_deb(tmp_path / "debs", "app", "2.0", depends="libmissing, python3 (>= 3.9)")
    base = tmp_path / "base.txt"
    base.write_text("python3\t3.11.2-1\n")
    out = tmp_path / "p.zip"
    assert cli.main(["build", str(out), "--deb", str(app), "--version", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: not satisfied inside the release: app 2.0 needs libmissing; app 2.0 " \
           "needs python3 (>= 3.9)" in err
    assert "installer: apt resolves them" in err

    assert cli.main(["build", str(out), "--deb", str(app), "--version", "2",
                     "--base-packages", str(base)]) == 0
    err = capsys.readouterr().err
    assert "warning: app 2.0 needs libmissing: neither the release nor" in err
    assert "python3" not in err

    repo, keydir = tmp_path / "repo", tmp_path / "keys"
    assert cli.main(["init", str(repo), "--keys", str(keydir)]) == 0
    capsys.readouterr()
    assert cli.main(["release", str(repo), str(out), "--keys", str(keydir),
                     "--base-packages", str(base)]) == 0
    captured = capsys.readouterr()
    assert "published release v2" in captured.out
    assert "warning: app 2.0 needs libmissing" in captured.err
    assert json.loads((repo / "version.json").read_bytes())["signed"]["version"] == 2


def test_a_complete_release_gets_no_warning(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    debs = [make_deb(tmp_path, "app", "2.0", depends="lib (>= 1)"),
            make_deb(tmp_path, "lib", "1.5")]
    build_package(tmp_path / "p.zip", version=1, debs=debs)
    assert cli.main(["build", str(tmp_path / "q.zip"), "--version", "1",
                     *(arg for deb in debs for arg in ("--deb", str(deb)))]) == 0
    assert "warning" not in capsys.readouterr().err


# --- the order of debs a box can apply (issue 8: the package split) --------------------------

SPLIT_MODULE = DebRelations("python3-opq-box-updater", "1.1.0", "", "python3:any",
                            "opq-box-updater (<< 1.1.0~)")
SPLIT_UPDATER = DebRelations("opq-box-updater", "1.1.0", "", "python3-opq-box-updater (= 1.1.0)")


@pytest.mark.parametrize("debs, problems", [
    ([SPLIT_UPDATER, SPLIT_MODULE], 0),
    ([SPLIT_MODULE, SPLIT_UPDATER], 1),
    ([SPLIT_MODULE], 0),  # breaks nothing in the release: the box's own business
    ([DebRelations("a", "1", "", "", "b, c (<< 2)"), DebRelations("c", "2"),
      DebRelations("b", "1")], 2),
], ids=["updater-first", "module-first", "module-alone", "two-later"])
def test_order_problems(debs: list[DebRelations], problems: int) -> None:
    found = order_problems(debs)
    assert len(found) == problems, found
    if debs == [SPLIT_MODULE, SPLIT_UPDATER]:
        assert found[0].startswith("list opq-box-updater before python3-opq-box-updater: ")
        assert "Breaks opq-box-updater (<< 1.1.0~)" in found[0]


def test_build_warns_about_the_module_package_listed_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With real debs, as the 1.0 -> 1.1 release of docs/operations.md is built."""
    module = make_deb(tmp_path, "python3-opq-box-updater", "1.1.0",
                      extra_control={"Breaks": "opq-box-updater (<< 1.1.0~)",
                                     "Replaces": "opq-box-updater (<< 1.1.0~)"})
    updater = make_deb(tmp_path, "opq-box-updater", "1.1.0",
                       depends="python3-opq-box-updater (= 1.1.0)")
    out = tmp_path / "p.zip"
    assert cli.main(["build", str(out), "--deb", str(module), "--deb", str(updater),
                     "--version", "12"]) == 0
    assert "warning: list opq-box-updater before python3-opq-box-updater" in \
        capsys.readouterr().err
    assert cli.main(["build", str(out), "--deb", str(updater), "--deb", str(module),
                     "--version", "12"]) == 0
    assert "warning" not in capsys.readouterr().err
