"""``installer: apt`` may remove exactly what the release allows (issue 12, item 1).

The manifest's optional ``apt_allow_remove`` lists the installed packages apt may remove
while applying; ``opq-box-publish build --apt-allow-remove`` writes it and ``load_manifest``
checks it on both sides (its tests are in test_mutants_package.py, which ``make mutate``
runs). A removal not listed postpones the update with nothing changed. A listed removal is
in the rollback's scope: its deb must be at hand before apt runs, and a failed release
brings it back. Real debs, apt and dpkg in a temporary root.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from debs import make_deb, require_tool
from reposim import RepoSim
from test_installer import Sandbox, sandbox  # noqa: F401
from test_rollback_scope import _apply, _conflicting_v2, _dpkg, _image_package, _postponed

from opq_box_updater.applyplan import Commands, parse_apt_simulation
from opq_box_updater.errors import ApplyError
from opq_box_updater.installer import UpdatePlan
from opq_box_updater.package import Manifest
from opq_box_updater.publish import build, cli, repo, stage
from opq_box_updater.publish.common import PublishError
from opq_box_updater.state import Store
from opq_box_updater.transaction import Transaction

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)
# --- the publisher ------------------------------------------------------------------------


def test_build_writes_the_key_only_when_asked(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    deb = make_deb(tmp_path / "debs", "opq-hello", "1.0")
    build.build_package(tmp_path / "plain.zip", version=2, debs=[deb])
    with zipfile.ZipFile(tmp_path / "plain.zip") as zf:
        assert "apt_allow_remove" not in json.loads(zf.read("manifest.json"))  # old boxes
    code = cli.main(["build", str(tmp_path / "rm.zip"), "--deb", str(deb), "--version", "2",
                     "--apt-allow-remove", "old", "--apt-allow-remove", "libfoo:i386"])
    assert code == 0
    assert "apt may remove [old, libfoo:i386]" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "rm.zip") as zf:
        assert json.loads(zf.read("manifest.json"))["apt_allow_remove"] == ["old",
                                                                            "libfoo:i386"]
    assert build.inspect_package(tmp_path / "rm.zip").apt_allow_remove == ("old",
                                                                            "libfoo:i386")


@pytest.mark.parametrize("names", [["Old"], ["old", "old"], ["x y"]])
def test_build_refuses_what_boxes_would_refuse(tmp_path: Path, names: list[str]) -> None:
    deb = make_deb(tmp_path / "debs", "opq-hello", "1.0")
    with pytest.raises(PublishError, match="--apt-allow-remove: boxes would refuse it"):
        build.build_package(tmp_path / "out.zip", version=2, debs=[deb],
                            apt_allow_remove=names)
    assert not (tmp_path / "out.zip").exists()


def test_build_refuses_the_option_without_debs(tmp_path: Path) -> None:
    (tmp_path / "update.sh").write_text("#!/bin/sh\n")
    with pytest.raises(PublishError, match="needs at least one --deb"):
        build.build_package(tmp_path / "out.zip", version=2, run=tmp_path / "update.sh",
                            apt_allow_remove=["old"])


def test_release_refuses_a_hand_made_package_boxes_would_refuse(tmp_path: Path) -> None:
    """Parity: a zip not made by ``build`` with a bad key is refused before signing."""
    repo.init_repo(tmp_path / "repo", tmp_path / "keys", now=NOW)
    package = tmp_path / "bad.zip"
    package.write_bytes(RepoSim.make_package(2, manifest={"apt_allow_remove": "old"}))
    before = sorted(p.name for p in (tmp_path / "repo").rglob("*"))
    with pytest.raises(PublishError, match="apt_allow_remove must be a list"):
        repo.publish_release(tmp_path / "repo", tmp_path / "keys", package, now=NOW)
    assert sorted(p.name for p in (tmp_path / "repo").rglob("*")) == before


def test_a_recall_keeps_the_removals_its_content_allowed(tmp_path: Path) -> None:
    """``recall`` republishes v1's content as v3: its manifest must still allow what v1
    allowed, or boxes with installer: apt would postpone the recall for ever."""
    repo.init_repo(tmp_path / "repo", tmp_path / "keys", now=NOW)
    deb = make_deb(tmp_path / "debs", "opq-hello", "1.0")
    build.build_package(tmp_path / "v1.zip", version=1, debs=[deb],
                        apt_allow_remove=["old"])
    build.build_package(tmp_path / "v2.zip", version=2, debs=[deb])
    for version in (1, 2):
        repo.publish_release(tmp_path / "repo", tmp_path / "keys", tmp_path / f"v{version}.zip",
                             now=NOW)
    result = stage.recall(tmp_path / "repo", tmp_path / "keys", [], now=NOW)
    assert (result.source.version, result.release.version) == (1, 3)
    recalled = build.inspect_package(tmp_path / "repo" / result.release.package.path)
    assert recalled.version == 3 and recalled.apt_allow_remove == ("old",)


# --- the box ------------------------------------------------------------------------------


def _allowing(plan: UpdatePlan, *names: str) -> UpdatePlan:
    manifest: Manifest = dataclasses.replace(plan.manifest, apt_allow_remove=names)
    return dataclasses.replace(plan, manifest=manifest)


@pytest.fixture
def apt_box(sandbox: Sandbox) -> Sandbox:  # noqa: F811
    require_tool("apt-get")
    sandbox.config = sandbox.config._replace(installer="apt")
    sandbox.install_v1()
    return sandbox


def test_a_removal_the_release_does_not_list_postpones(apt_box: Sandbox) -> None:
    _image_package(apt_box, "old", "1.0")
    _image_package(apt_box, "other", "1.0")
    message = _postponed(apt_box, _allowing(_conflicting_v2(apt_box), "other"))
    assert "apt would remove old to apply release 2, and the release does not allow it" \
        in message
    assert apt_box.installed() == {"a": "1.0", "old": "1.0", "other": "1.0"}


def test_an_allowed_removal_is_applied_and_rolled_back(apt_box: Sandbox) -> None:
    """apt removes ``old`` (the release allows it); the health check fails; the rollback
    reinstalls ``old`` from the deb copied into the updater's cache before applying."""
    _image_package(apt_box, "old", "1.0", files={"usr/share/old/data": "old\n"})
    plan = _allowing(_conflicting_v2(apt_box), "old")
    error, state = _apply(apt_box, plan)
    assert "rolled back" in str(error) and "incomplete" not in str(error)
    log = (apt_box.root / "var/log/dpkg.log").read_text()
    assert "remove old:all 1.0" in log  # apt did remove it
    assert apt_box.installed() == {"a": "1.0", "old": "1.0"}
    assert (apt_box.root / "usr/share/old/data").read_text() == "old\n"
    assert state.unrestored == () and state.journal.phase == "idle"
    assert (apt_box.config.state_dir / "debs/old_1.0_all.deb").is_file()


def test_an_allowed_removal_without_a_deb_to_go_back_to_postpones(apt_box: Sandbox) -> None:
    """Neither cached nor downloadable (the sandbox has no apt sources): apt must not run."""
    _image_package(apt_box, "old", "1.0", in_apt_cache=False)
    message = _postponed(apt_box, _allowing(_conflicting_v2(apt_box), "old"))
    assert "a rollback would need old=1.0" in message
    assert not (apt_box.root / "var/log/apt/history.log").exists() or \
        "Remove: old" not in (apt_box.root / "var/log/apt/history.log").read_text()


def _removing_v2(box: Sandbox, victim: str) -> UpdatePlan:
    """Release 2: a 2.0 that Conflicts+Replaces ``victim``, healthy, allowing its removal."""
    a2 = make_deb(box.debs, "a", "2.0", files={"usr/share/a/version": "2.0"},
                  extra_control={"Conflicts": victim, "Replaces": victim})
    return _allowing(box.plan(2, [a2]), victim)


@pytest.mark.parametrize("victim", ["opq-box-updater", "python3-opq-box-updater"])
def test_a_release_never_has_apt_remove_the_updater_itself(apt_box: Sandbox,
                                                           victim: str) -> None:
    """Even allowed by a (stolen) release key: a box without its updater never updates
    again, and nothing on it would notice. Postponed, nothing changed."""
    _image_package(apt_box, victim, "1.0")
    message = _postponed(apt_box, _removing_v2(apt_box, victim))
    assert f"apt would remove {victim}, the updater itself" in message
    assert apt_box.installed() == {"a": "1.0", victim: "1.0"}


def test_a_release_never_has_apt_remove_an_essential_package(apt_box: Sandbox) -> None:
    """apt itself will not plan it (no --allow-remove-essential): postponed, unchanged."""
    _image_package(apt_box, "core", "1.0", extra_control={"Essential": "yes"})
    message = _postponed(apt_box, _removing_v2(apt_box, "core"))
    assert "apt-get cannot plan release 2" in message
    assert apt_box.installed() == {"a": "1.0", "core": "1.0"}


class _PowerCut(BaseException):
    """Ends the run where it is, journal and all, like SIGKILL (nothing catches it)."""


def test_a_power_cut_after_apt_removed_a_package_brings_it_back(
        apt_box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """apt removes a conflicting package in its own dpkg call before it unpacks the new
    one; the power goes there. The next run's recovery, without network, must bring the
    removed package back with the old release."""
    _image_package(apt_box, "old", "1.0", files={"usr/share/old/data": "old\n"})
    plan = _allowing(_conflicting_v2(apt_box), "old")
    store = Store(apt_box.config.state_dir)
    store.ensure_dirs()
    installer = apt_box.installer()

    def removed_then_cut(_: UpdatePlan) -> None:
        _dpkg(apt_box, "--remove", "old")  # what apt's first dpkg call did
        raise _PowerCut

    monkeypatch.setattr(installer, "apply", removed_then_cut)
    with pytest.raises(_PowerCut):
        Transaction(apt_box.config, store).apply(store.load(), "version.json", plan,
                                                 installer, "0" * 64)
    assert store.load().journal.phase == "applying" and "old" not in apt_box.installed()
    with pytest.raises(ApplyError, match="rolled back") as caught:
        Transaction(apt_box.config, store).recover(store.load())
    assert "incomplete" not in str(caught.value)
    assert apt_box.installed() == {"a": "1.0", "old": "1.0"}
    assert (apt_box.root / "usr/share/old/data").read_text() == "old\n"
    assert store.load().journal.phase == "idle"


@pytest.fixture
def purging_box(apt_box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """A box whose administrator set ``APT::Get::Purge "true";`` in /etc/apt/apt.conf.d
    (the sandbox's apt reads only the updater's APT_CONFIG: the line goes there)."""
    real = Commands.apt_config
    monkeypatch.setattr(Commands, "apt_config",
                        lambda self: real(self) + 'APT::Get::Purge "true";\n')
    return apt_box


def test_apts_purge_setting_hides_no_removal(purging_box: Sandbox) -> None:
    """apt -s then says ``Purg old [1.0]``, not ``Remv``: still a removal the release must
    allow (it went through unchecked, and unrolled-back, before)."""
    _image_package(purging_box, "old", "1.0")
    _image_package(purging_box, "other", "1.0")
    message = _postponed(purging_box, _allowing(_removing_v2(purging_box, "old"), "other"))
    assert "apt would remove old to apply release 2" in message
    assert purging_box.installed() == {"a": "1.0", "old": "1.0", "other": "1.0"}


def test_an_allowed_removal_keeps_the_admins_conffile_under_apts_purge_setting(
        purging_box: Sandbox) -> None:
    """A listed removal is a removal, never a purge: after the failed release's rollback
    the administrator's edit of the removed package's conffile is still there."""
    _image_package(purging_box, "old", "1.0", files={"etc/old.conf": "default\n"},
                   control_files={"conffiles": "/etc/old.conf\n"})
    (purging_box.root / "etc/old.conf").write_text("edited by the admin\n")
    error, state = _apply(purging_box, _allowing(_conflicting_v2(purging_box), "old"))
    assert "rolled back" in str(error) and "incomplete" not in str(error)
    assert purging_box.installed() == {"a": "1.0", "old": "1.0"} and state.unrestored == ()
    assert (purging_box.root / "etc/old.conf").read_text() == "edited by the admin\n"


def test_the_simulation_reads_a_purge_as_a_removal() -> None:
    """Defence in depth beside Purge=false: ``Purg`` lines (apt 2.6's wording) count."""
    sim = parse_apt_simulation("Purg old [1.0]\nRemv gone:i386 [2.0]\n"
                               "Inst a [1.0] (2.0 local [all])\nInst new (1.0 local [all])\n")
    assert (sim.removes, sim.upgrades, sim.new) == ({"old": "1.0", "gone:i386": "2.0"},
                                                    {"a": "1.0"}, ("new",))


def test_apts_autoremove_setting_neither_blocks_nor_removes(
        apt_box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """``APT::Get::AutomaticRemove "true";`` on a box with an automatically installed
    package nothing needs: apt would remove it with every install, so every release was
    postponed for ever. The updater's apt call removes only what the release needs."""
    real = Commands.apt_config
    monkeypatch.setattr(Commands, "apt_config",
                        lambda self: real(self) + 'APT::Get::AutomaticRemove "true";\n')
    _image_package(apt_box, "leftover", "1.0")
    states = apt_box.root / "var/lib/apt/extended_states"
    states.parent.mkdir(parents=True, exist_ok=True)
    states.write_text("Package: leftover\nArchitecture: all\nAuto-Installed: 1\n\n")
    a2 = make_deb(apt_box.debs, "a", "2.0", files={"usr/share/a/version": "2.0"})
    store = Store(apt_box.config.state_dir)
    store.ensure_dirs()
    applied = Transaction(apt_box.config, store).apply(store.load(), "version.json",
                                                       apt_box.plan(2, [a2]),
                                                       apt_box.installer(), "0" * 64)
    assert applied.result == "updated", applied.message
    assert apt_box.installed() == {"a": "2.0", "leftover": "1.0"}


@pytest.mark.parametrize("setting", ['APT::Get::Only-Upgrade "true";',
                                     'APT::Get::Upgrade "false";'])
def test_apts_upgrade_settings_do_not_skip_the_releases_debs(
        apt_box: Sandbox, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    """A box's apt.conf.d with ``--only-upgrade`` or ``--no-upgrade`` made apt skip a new
    (or an upgraded) package of the release and exit 0: the release failed on every such
    box ('apt-get succeeded but b is not installed') and was marked failed."""
    real = Commands.apt_config
    monkeypatch.setattr(Commands, "apt_config", lambda self: real(self) + setting + "\n")
    debs = [make_deb(apt_box.debs, "a", "2.0"), make_deb(apt_box.debs, "b", "1.0")]
    store = Store(apt_box.config.state_dir)
    store.ensure_dirs()
    applied = Transaction(apt_box.config, store).apply(store.load(), "version.json",
                                                       apt_box.plan(2, debs),
                                                       apt_box.installer(), "0" * 64)
    assert applied.result == "updated", applied.message
    assert apt_box.installed() == {"a": "2.0", "b": "1.0"}
