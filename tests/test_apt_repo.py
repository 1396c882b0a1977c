"""``installer: apt`` against a real apt repository (issue 12, item 2).

A flat repository (``dpkg-scanpackages``, served as ``file:``) and the machine's apt working
on a temporary root through the updater's own ``APT_CONFIG`` (``Dir`` moved into the root):
the host's dpkg database and apt state are never touched. Packages that came with the image
are installed by dpkg only, so their debs are in neither the updater's cache nor apt's
archive cache: ``apt-get download`` from the repository must put them in the rollback cache
before anything is applied. The image also has a ``Multi-Arch: same`` library for the native
and a foreign architecture (added to the root's dpkg), which apt upgrades together. The root
with its apt lists is made once per module; each test works on a copy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from debs import dpkg_command, init_dpkg_root, make_deb, require_tool
from test_installer import Sandbox
from test_rollback_scope import _apply, _postponed

from opq_box_updater.applyplan import Commands
from opq_box_updater.config import Config
from opq_box_updater.installer import UpdatePlan
from opq_box_updater.runner import child_env

#: What the image has: installed with dpkg, no deb kept anywhere on the box.
IMAGE = {"libimg": "1.0", "gone": "1.0", "libold": "0.9"}
#: The native and a foreign architecture (added to the root's dpkg): the image also has
#: libfoo 1.0, Multi-Arch: same, for both.
NATIVE = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                        check=False).stdout.strip()
FOREIGN = "i386" if NATIVE != "i386" else "amd64"
LIBFOO = {f"libfoo:{NATIVE}": "1.0", f"libfoo:{FOREIGN}": "1.0"}


@dataclasses.dataclass(frozen=True)
class Repo:
    template: Path  # a dpkg root with the image installed and apt's lists of the repository
    debs: Path  # debs of the releases (not in the repository)


def _apt_config(root: Path, directory: Path) -> Path:
    """The updater's APT_CONFIG for ``root`` (the same text the installer writes)."""
    config = Config(server_url="http://127.0.0.1:9/", dpkg_root=root, installer="apt")
    path = directory / "apt.conf"
    path.write_text(Commands(config, lock_timeout=10, script_timeout=60).apt_config())
    return path


@pytest.fixture(scope="module")
def apt_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    for tool in ("apt-get", "dpkg-scanpackages", "dpkg", "dpkg-deb"):
        require_tool(tool)
    base = tmp_path_factory.mktemp("apt-repo")
    pool = base / "repo"
    for name, version in (("libimg", "1.0"), ("libimg", "2.0"), ("gone", "1.0"),
                          ("libdep", "1.0"), ("librec", "1.0"), ("libold", "1.0")):
        make_deb(pool, name, version, files={f"usr/share/{name}/version": version})
    for version in ("1.0", "2.0"):
        for arch in (NATIVE, FOREIGN):
            make_deb(pool, "libfoo", version, arch=arch, extra_control={"Multi-Arch": "same"},
                     files={"usr/share/doc/libfoo/version": version})
    scan = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=pool,
                          env=child_env(), capture_output=True, text=True, check=True)
    (pool / "Packages").write_text(scan.stdout)
    root = init_dpkg_root(base / "template")
    image = base / "image"
    for name, version in IMAGE.items():
        deb = make_deb(image, name, version, files={f"usr/share/{name}/version": version})
        subprocess.run(dpkg_command(root, "-i", str(deb)), check=True, capture_output=True)
    subprocess.run(dpkg_command(root, "--add-architecture", FOREIGN), check=True,
                   capture_output=True)
    subprocess.run(dpkg_command(root, "-i", *(str(pool / f"libfoo_1.0_{a}.deb")
                                              for a in (NATIVE, FOREIGN))),
                   check=True, capture_output=True)
    for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d",
                "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/log/apt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{pool} ./\n")
    update = subprocess.run(
        ["apt-get", "update"], capture_output=True, text=True, timeout=120,
        env={**child_env(), "APT_CONFIG": str(_apt_config(root, base))})
    assert update.returncode == 0, update.stdout + update.stderr
    shutil.rmtree(image)
    return Repo(root, base / "release-debs")


@pytest.fixture
def box(apt_repo: Repo, tmp_path: Path) -> Sandbox:
    """A copy of the template root as an ``installer: apt`` box."""
    root = tmp_path / "root"
    shutil.copytree(apt_repo.template, root, symlinks=True)
    config = Config(server_url="http://127.0.0.1:9/", dpkg_root=root, installer="apt",
                    hooks_dir=tmp_path / "hooks", state_dir=tmp_path / "state",
                    download_dir_path=tmp_path / "downloads")
    config.hooks_dir.mkdir()
    config.state_dir.mkdir()
    box = Sandbox(tmp_path, config)
    assert _installed(box) == {**IMAGE, **LIBFOO}
    return box


def _installed(box: Sandbox) -> dict[str, str]:
    """``${binary:Package}`` -> version of what is installed (``ii``) in the box's root."""
    out = subprocess.run(["dpkg-query", f"--root={box.root}", "-W",
                          "-f=${binary:Package} ${Version} ${db:Status-Abbrev}\n"],
                         capture_output=True, text=True, check=True).stdout
    fields = [line.split(" ") for line in out.splitlines()]
    return {name: version for name, version, status, *_ in fields if status == "ii"}


def _release(box: Sandbox, version: int, control: dict[str, str], *, remove: tuple[str, ...]
             = (), healthcheck: str | None = None) -> UpdatePlan:
    app = make_deb(box.debs, "app", f"{version}.0", extra_control=control,
                   files={"usr/share/app/version": f"{version}.0"})
    plan = box.plan(version, [app], healthcheck=healthcheck)
    return dataclasses.replace(plan, manifest=dataclasses.replace(
        plan.manifest, apt_allow_remove=remove))


def _cached(box: Sandbox) -> list[str]:
    return sorted(p.name for p in (box.config.state_dir / "debs").glob("*.deb"))


def test_a_failed_release_takes_back_what_apt_added_upgraded_and_removed(box: Sandbox) -> None:
    """app 2.0 needs libimg 2.0 (the image has 1.0) and the new libdep, recommends librec
    and conflicts with gone. Before applying, the debs of libimg 1.0 and gone 1.0 are
    fetched from the repository; during the apply the box has exactly apt's transaction;
    after the failed health check it has exactly the image again."""
    seen = box.base / "during.txt"
    plan = _release(box, 2, {"Depends": "libimg (>= 2.0), libdep", "Recommends": "librec",
                             "Conflicts": "gone"}, remove=("gone",),
                    healthcheck=f"dpkg-query --root={box.root} -W -f='${{binary:Package}} "
                                f"${{Version}} ${{db:Status-Abbrev}}\\n' > {seen}; exit 1")
    error, state = _apply(box, plan)
    during = {line.split(" ")[0]: line.split(" ", 1)[1].strip()
              for line in seen.read_text().splitlines()}
    # apt upgraded libimg, added libdep (not librec: no recommends) and removed gone
    assert during == {"app": "2.0 ii", "libimg": "2.0 ii", "libdep": "1.0 ii",
                      "libold": "0.9 ii", **{k: f"{v} ii" for k, v in LIBFOO.items()}}
    assert "rolled back" in str(error) and "incomplete" not in str(error)
    assert state.unrestored == () and state.journal.phase == "idle"
    assert _installed(box) == {**IMAGE, **LIBFOO}
    assert not box.installed().get("libdep", "").endswith("rc")  # purged, not removed
    assert _cached(box) == ["gone_1.0_all.deb", "libimg_1.0_all.deb"]
    for name, version in IMAGE.items():
        assert (box.root / f"usr/share/{name}/version").read_text() == version
    assert not (box.root / "usr/share/libdep").exists()  # purged, not just removed


def test_a_removal_the_release_does_not_allow_postpones(box: Sandbox) -> None:
    message = _postponed(box, _release(box, 2, {"Depends": "libdep", "Conflicts": "gone"}))
    assert "apt would remove gone" in message
    assert _cached(box) == []


def test_an_image_package_the_repository_no_longer_has_postpones(box: Sandbox) -> None:
    """libold 0.9 came with the image and the repository has only 1.0: a rollback could not
    go back, so apt must not upgrade it."""
    message = _postponed(box, _release(box, 3, {"Depends": "libold (>= 1.0)"}))
    assert "a rollback would need libold=0.9" in message


def test_a_good_release_keeps_what_apt_installed(box: Sandbox) -> None:
    plan = _release(box, 2, {"Depends": "libimg (>= 2.0), libdep", "Recommends": "librec"})
    installer = box.installer()
    installer.prepare_rollback(plan, installer.snapshot_all())
    installer.apply(plan)
    assert _installed(box) == {**IMAGE, **LIBFOO, "app": "2.0", "libimg": "2.0",
                               "libdep": "1.0"}
    assert _cached(box) == ["libimg_1.0_all.deb"]  # fetched before applying
    assert os.path.exists(box.root / "usr/share/libdep/version")


def test_both_copies_of_a_multi_arch_package_go_back(box: Sandbox) -> None:
    """apt upgrades libfoo for both architectures (Multi-Arch: same versions move together);
    both 1.0 debs, never cached, are fetched per architecture before applying, and the
    failed release returns each copy to 1.0."""
    plan = _release(box, 4, {"Depends": "libfoo (>= 2.0)"}, healthcheck="exit 1")
    error, state = _apply(box, plan)
    assert "rolled back" in str(error) and state.unrestored == ()
    log = (box.root / "var/log/dpkg.log").read_text()
    assert f"upgrade libfoo:{FOREIGN} 1.0 2.0" in log  # apt did upgrade both
    assert _installed(box) == {**IMAGE, **LIBFOO}
    assert _cached(box) == sorted(f"libfoo_1.0_{a}.deb" for a in (NATIVE, FOREIGN))
