"""``run --from DIR`` with ``installer: apt`` fetches nothing either (issue 8, part 3:
"Nothing is fetched from the network in that mode").

The box's apt sources name an http repository on 127.0.0.1, served by the same recording
server as ``server_url`` and ``report_url``. A release from the stick that needs a package
only that repository has, or a rollback deb apt would have to download, is postponed with
nothing changed and no request made; the network path still gets them from apt.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from debs import make_deb, require_tool
from faultserver import FaultServer
from reposim import RepoSim
from test_apply_e2e import DPKG_TOOLS, OK
from test_usb import Usb

from opq_box_updater.publish.export import export_repo


def _apt_repo(u: Usb, *debs: Path) -> None:
    """A flat apt repository under the served directory, named in the box's apt sources,
    and the box's package lists read from it (what ``apt-get update`` did days ago)."""
    repo = u.stick / "apt"
    repo.mkdir(exist_ok=True)
    for deb in debs:
        shutil.copyfile(deb, repo / deb.name)
    with (repo / "Packages").open("w") as out:
        subprocess.run([require_tool("dpkg-scanpackages"), "."], cwd=repo, stdout=out,
                       stderr=subprocess.DEVNULL, check=True)
    root = u.box.dpkg_root
    for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d",
                "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/log/apt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list.d/site.list").write_text(
        f"deb [trusted=yes] {u.server.url}/apt/ ./\n")
    conf = u.tmp / "apt.conf"
    conf.write_text(f'Dir "{root}/";\nDir::State::status "{root}/var/lib/dpkg/status";\n'
                    'APT::Sandbox::User "root";\n')
    subprocess.run([require_tool("apt-get"), "-q", "update"], check=True,
                   capture_output=True, env={**os.environ, "APT_CONFIG": str(conf)})


@pytest.fixture
def usb_apt(tmp_path: Path, box_factory: Any) -> Iterator[Usb]:
    for tool in (*DPKG_TOOLS, "apt-get", "dpkg-scanpackages"):
        require_tool(tool)
    sim = RepoSim(tmp_path / "repo")
    (tmp_path / "stick").mkdir()
    with FaultServer(tmp_path / "stick") as server:
        box = box_factory(server.url, sim.anchor, report_url=f"{server.url}/report",
                          installer="apt")
        yield Usb(tmp_path, sim, server, box)


def _export(u: Usb) -> None:
    export_repo(u.sim.path, u.stick)


def _root(u: Usb) -> dict[str, str]:
    """The box's dpkg root, apt's lists and caches included (its logs left out)."""
    return {path: digest for path, digest in u.box.digest().items()
            if path.startswith(f"{u.box.dpkg_root}/")
            and not path.startswith(f"{u.box.dpkg_root}/var/log/")}


def test_a_dependency_only_the_network_has_postpones_the_stick(usb_apt: Usb) -> None:
    u = usb_apt
    _apt_repo(u, make_deb(u.tmp / "site", "libdep", "1.0"))
    app = make_deb(u.built, "app", "1.0", depends="libdep")
    u.publish(1, [app])
    _export(u)
    before = _root(u)
    proc = u.offline("run", expect=OK)  # asserts: no request at all
    assert "apt cannot apply release 1 with only its own debs" in proc.stderr
    assert "libdep" in proc.stderr
    assert "a --from run downloads nothing" in proc.stderr
    assert u.box.status()["last_result"] == "postponed"
    assert u.installed() == {} and _root(u) == before
    # Over the network apt fetches libdep, as before.
    u.run("run", expect=OK)
    assert u.installed() == {"app": "1.0", "libdep": "1.0"}


def test_a_rollback_deb_is_not_downloaded_from_a_stick(usb_apt: Usb) -> None:
    u = usb_apt
    alpha1 = u.deb("alpha", "1.0")
    _apt_repo(u, alpha1)
    u.publish(1, [alpha1])
    _export(u)
    proc = u.offline("run", expect=OK)
    assert u.installed() == {"alpha": "1.0"}, proc.stderr
    shutil.rmtree(u.box.state_dir / "debs")  # the rollback cache lost (cleaned by hand)
    for cached in (u.box.dpkg_root / "var/cache/apt/archives").glob("*.deb"):
        cached.unlink()
    u.publish(2, [u.deb("alpha", "2.0")])
    _export(u)
    before = _root(u)
    proc = u.offline("run", expect=OK)
    assert "a rollback would need alpha=1.0" in proc.stderr
    assert "a --from run downloads nothing" in proc.stderr
    assert u.installed() == {"alpha": "1.0"} and _root(u) == before
