"""Rollback restores the box, not only the update's own packages (issue 12, item 1).

Real debs, dpkg in a temporary root; each test ends with dpkg-query on the whole root.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from debs import dpkg_command, make_deb, require_tool
from test_installer import Sandbox, sandbox  # noqa: F401

from opq_box_updater.applyplan import decode_states, encode_states, rollback_steps
from opq_box_updater.errors import ApplyError, PostponedError
from opq_box_updater.guard import PackageState
from opq_box_updater.installer import UpdatePlan
from opq_box_updater.state import State, Store
from opq_box_updater.transaction import Transaction


def _dpkg(box: Sandbox, *args: str) -> None:
    subprocess.run(dpkg_command(box.root, *args), check=True, capture_output=True)


def _apply(box: Sandbox, plan: UpdatePlan) -> tuple[ApplyError, State]:
    """Apply ``plan`` through the journaled transaction (as a run does); it must fail."""
    store = Store(box.config.state_dir)
    store.ensure_dirs()
    with pytest.raises(ApplyError) as caught:
        Transaction(box.config, store).apply(store.load(), "version.json", plan,
                                             box.installer(), "0" * 64)
    return caught.value, store.load()


def _image_package(box: Sandbox, name: str, version: str, *,
                   in_apt_cache: bool = True, **kwargs: object) -> Path:
    """A package that came with the image: installed by hand, its deb (maybe) in apt's
    archive cache, never in the updater's own cache."""
    deb = make_deb(box.debs / "image", name, version, **kwargs)  # type: ignore[arg-type]
    _dpkg(box, "-i", str(deb))
    if in_apt_cache:
        archives = box.root / "var/cache/apt/archives"
        archives.mkdir(parents=True, exist_ok=True)
        (archives / deb.name).write_bytes(deb.read_bytes())
    return deb


def _conflicting_v2(box: Sandbox) -> UpdatePlan:
    """Release 2: a 2.0 Conflicts+Replaces the image's ``old``; its health check fails."""
    a2 = make_deb(box.debs, "a", "2.0", files={"usr/share/a/version": "2.0"},
                  extra_control={"Conflicts": "old", "Replaces": "old", "Provides": "old"})
    return box.plan(2, [a2], healthcheck="exit 1")


def test_a_package_the_update_removed_comes_back(sandbox: Sandbox) -> None:  # noqa: F811
    sandbox.install_v1()
    _image_package(sandbox, "old", "1.0", files={"usr/share/old/data": "old\n"})
    assert sandbox.installed() == {"a": "1.0", "old": "1.0"}
    error, state = _apply(sandbox, _conflicting_v2(sandbox))
    assert "rolled back" in str(error) and "incomplete" not in str(error)
    log = (sandbox.root / "var/log/dpkg.log").read_text()
    assert "status not-installed old:all" in log  # the update removed it (Conflicts)
    assert sandbox.installed() == {"a": "1.0", "old": "1.0"}
    assert (sandbox.root / "usr/share/old/data").read_text() == "old\n"
    assert state.unrestored == () and state.journal.phase == "idle"


def test_a_removed_package_without_a_deb_is_listed_and_called_incomplete(
        sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    sandbox.install_v1()
    _image_package(sandbox, "old", "1.0", in_apt_cache=False)
    plan = _conflicting_v2(sandbox)
    installer = sandbox.installer()
    previous, before = installer.snapshot(plan), installer.snapshot_all()
    with pytest.raises(ApplyError):
        installer.apply(plan)
    assert installer.rollback(plan, previous, before) == ("old=1.0",)
    assert sandbox.installed() == {"a": "1.0"}  # a's own rollback still happened


def test_an_admins_config_files_survive_the_rollback(sandbox: Sandbox) -> None:  # noqa: F811
    sandbox.install_v1()
    conffile = {"control_files": {"conffiles": "/etc/b.conf\n"}}
    old_b = make_deb(sandbox.debs / "image", "b", "0.9", files={"etc/b.conf": "default\n"},
                     **conffile)  # type: ignore[arg-type]
    _dpkg(sandbox, "-i", str(old_b))
    (sandbox.root / "etc/b.conf").write_text("admin's edit\n")
    _dpkg(sandbox, "--remove", "b")
    assert sandbox.installed()["b"] == "0.9 rc"
    new_b = make_deb(sandbox.debs, "b", "1.0", files={"etc/b.conf": "default\n"},
                     **conffile)  # type: ignore[arg-type]
    error, state = _apply(sandbox, sandbox.plan(2, [new_b], healthcheck="exit 1"))
    assert "rolled back" in str(error) and state.unrestored == ()
    installed = sandbox.installed()
    assert installed["a"] == "1.0" and installed["b"].endswith(" rc")  # removed, not purged
    assert (sandbox.root / "etc/b.conf").read_text() == "admin's edit\n"


def test_states_round_trip_through_the_journal() -> None:
    states = {"a": PackageState("1:1.0", "install ok installed"),
              "b": PackageState("0.9", "deinstall ok config-files"),
              "gone": PackageState("", "purge ok not-installed")}
    assert decode_states(encode_states(states)) == {k: v for k, v in states.items()
                                                    if k != "gone"}


def test_steps_leave_unchanged_half_configured_packages_alone() -> None:
    """Only what changed since the snapshot is touched: a package already broken before the
    update is not the rollback's to fix (and is not reported)."""
    half = PackageState("1.0", "install ok half-configured")
    steps = rollback_steps({}, {"x": half}, {"x": half})
    assert steps.labels() == ()
    steps = rollback_steps({}, {"x": half}, {"x": PackageState("2.0", "install ok installed"),
                                             "new": PackageState("1", "install ok installed")})
    assert steps.reinstall == (("x", "1.0"),) and steps.purge == ("new",)


# --- know before applying that you can go back --------------------------------------------


def _postponed(box: Sandbox, plan: UpdatePlan) -> str:
    """Apply ``plan`` through the transaction: it must be postponed with nothing changed."""
    store = Store(box.config.state_dir)
    store.ensure_dirs()
    installed = box.installed()
    applied = Transaction(box.config, store).apply(store.load(), "version.json", plan,
                                                   box.installer(), "0" * 64)
    assert applied.result == "postponed"
    assert box.installed() == installed
    state = store.load()
    assert state.journal.phase == "idle" and state.channel("version.json").failed_versions == ()
    return applied.message


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_no_intact_deb_to_go_back_to_postpones(sandbox: Sandbox,  # noqa: F811
                                               damage: str) -> None:
    sandbox.install_v1()
    cached = sandbox.config.state_dir / "debs" / "a_1.0_all.deb"
    data = cached.read_bytes()
    if damage == "missing":
        cached.unlink()
    elif damage == "truncated":
        cached.write_bytes(data[: len(data) - 40])
    else:
        cached.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    sandbox.logging_hooks()
    message = _postponed(sandbox, sandbox.plan(2, [sandbox.deb("a", "2.0")]))
    assert "a rollback would need a=1.0" in message
    assert sandbox.lines() == []  # not even pre-update.d ran


def test_a_package_the_update_would_remove_needs_its_deb(sandbox: Sandbox) -> None:  # noqa: F811
    sandbox.install_v1()
    _image_package(sandbox, "old", "1.0", in_apt_cache=False)
    message = _postponed(sandbox, _conflicting_v2(sandbox))
    assert "a rollback would need old=1.0" in message


def test_a_legacy_cached_deb_without_sha256_is_checked_whole(sandbox: Sandbox) -> None:  # noqa: F811
    sandbox.install_v1()
    cache = sandbox.config.state_dir / "debs"
    (cache / "a_1.0_all.deb.sha256").unlink()
    cached = cache / "a_1.0_all.deb"
    cached.write_bytes(cached.read_bytes()[:-40])  # truncated: its control part still reads
    assert "a rollback would need a=1.0" in _postponed(
        sandbox, sandbox.plan(2, [sandbox.deb("a", "2.0")]))


def test_a_deb_lost_after_the_check_makes_the_rollback_incomplete(sandbox: Sandbox) -> None:  # noqa: F811
    sandbox.install_v1()
    cache = sandbox.config.state_dir / "debs"
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0")], healthcheck=f"rm -f {cache}/a_1.0*; exit 1")
    error, state = _apply(sandbox, plan)
    assert "rollback incomplete" in str(error) and "rolled back" not in str(error)
    assert state.unrestored == ("a=1.0",)
    assert 2 in state.channel("version.json").failed_versions


def test_apt_refuses_a_transaction_that_removes_packages(sandbox: Sandbox) -> None:  # noqa: F811
    require_tool("apt-get")
    sandbox.config = sandbox.config._replace(installer="apt")
    sandbox.install_v1()
    _image_package(sandbox, "old", "1.0")
    message = _postponed(sandbox, _conflicting_v2(sandbox))
    assert "apt would remove old" in message
    plan = sandbox.plan(3, [sandbox.deb("a", "3.0")])
    assert "--no-install-recommends" in sandbox.installer().describe(plan)[1]


# --- the rollback's scope: what the update could change, nothing else ------------------------


def test_what_an_admin_changed_while_the_update_ran_is_left_alone(
        sandbox: Sandbox) -> None:  # noqa: F811
    """dpkg's lock is not held during the health check (nor across a power cut): a package
    the admin installed, or another one upgraded, in that window is not the rollback's."""
    sandbox.install_v1()
    _image_package(sandbox, "lib", "1.0")
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0")], healthcheck="exit 1")
    installer = sandbox.installer()
    previous, before = installer.snapshot(plan), installer.snapshot_all()
    scope = installer.prepare_rollback(plan, before)
    assert scope == ("a",)
    with pytest.raises(ApplyError):
        installer.apply(plan)
    _dpkg(sandbox, "-i", str(make_deb(sandbox.debs / "admin", "tool", "4.9")))
    _dpkg(sandbox, "-i", str(make_deb(sandbox.debs / "admin", "lib", "1.1")))
    assert installer.rollback(plan, previous, before, scope) == ()
    assert sandbox.installed() == {"a": "1.0", "lib": "1.1", "tool": "4.9"}


def test_a_package_replaced_through_a_virtual_name_needs_its_deb_first(
        sandbox: Sandbox) -> None:  # noqa: F811
    """postfix Conflicts with the virtual 'mta' that the installed exim Provides: dpkg
    removes exim, so the rollback needs exim's deb; without it the update is postponed."""
    sandbox.install_v1()
    _image_package(sandbox, "exim", "1.0", in_apt_cache=False,
                   extra_control={"Provides": "mta"})
    postfix = make_deb(sandbox.debs, "postfix", "1.0",
                       extra_control={"Provides": "mta", "Conflicts": "mta",
                                      "Replaces": "mta"})
    plan = sandbox.plan(2, [postfix], healthcheck="exit 1")
    installer = sandbox.installer()
    with pytest.raises(PostponedError, match=r"exim=1\.0"):
        installer.prepare_rollback(plan, installer.snapshot_all())
    assert sandbox.installed() == {"a": "1.0", "exim": "1.0"}


def test_a_release_touching_a_held_package_is_postponed(sandbox: Sandbox) -> None:  # noqa: F811
    sandbox.install_v1()
    subprocess.run([*dpkg_command(sandbox.root, "--set-selections")], input=b"a hold\n",
                   check=True, capture_output=True)
    plan = sandbox.plan(2, [sandbox.deb("a", "2.0")])
    installer = sandbox.installer()
    with pytest.raises(PostponedError, match="on hold"):
        installer.prepare_rollback(plan, installer.snapshot_all())
    assert sandbox.installed() == {"a": "1.0 hi"}  # still 1.0, still held


@pytest.mark.parametrize("planted", ["directory", "file"])
def test_a_deb_another_user_could_plant_in_apts_cache_is_never_used(
        sandbox: Sandbox, planted: str) -> None:  # noqa: F811
    """apt's archive cache owned by (or a deb in it writable by) another account: that
    account could put an ``old_1.0_all.deb`` of its own there, which a rollback would
    install as root. Such a deb is not used; without another the update waits."""
    sandbox.install_v1()
    _image_package(sandbox, "old", "1.0", in_apt_cache=False)
    archives = sandbox.root / "var/cache/apt/archives"
    archives.mkdir(parents=True, exist_ok=True)
    evil = make_deb(sandbox.debs / "evil", "old", "1.0",
                    scripts={"postinst": f"touch {sandbox.root}/pwned"})
    planted_deb = archives / evil.name
    planted_deb.write_bytes(evil.read_bytes())
    if planted == "directory":
        os.chown(archives, 65534, 65534)
    else:
        os.chown(planted_deb, 65534, 65534)
        planted_deb.chmod(0o666)
    message = _postponed(sandbox, _conflicting_v2(sandbox))
    assert "a rollback would need old=1.0" in message
    assert not (sandbox.config.state_dir / "debs" / evil.name).exists()
    assert not (sandbox.root / "pwned").exists()
