"""What a package may carry besides what its manifest names (DESIGN 2.4, 3.2; issue 13, 4).

* A ``.deb`` the manifest does not list is refused (3), on the box and by the publisher:
  what is applied is exactly what is signed and what ``run --dry-run`` shows.
* The updater's own files in an extraction directory (``.opq-run-script.json``, the guard's
  status; ``.opq-apt.conf``) are not the package's "unlisted entries"; a package may not
  carry them, since a planted status file could vouch for a run script that never ran.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
from debs import make_deb
from test_apply_e2e import OK, World, install_v1, publish_v2, world  # noqa: F401
from test_powercut import Cut, cut_power

from opq_box_updater.errors import UnsafePackageError
from opq_box_updater.package import (
    APT_CONFIG_FILE,
    RUN_STATUS_FILE,
    extract_package,
    load_manifest,
)
from opq_box_updater.publish.build import inspect_package

REFUSED = 3
MANIFEST = {"format": 1, "version": 2, "debs": ["a_1.0_all.deb"], "run": "update.sh",
            "healthcheck": None}


def extracted(root: Path, *extra: str) -> Path:
    """An extraction directory holding the manifest's files plus ``extra`` paths."""
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(MANIFEST))
    for name in ("a_1.0_all.deb", "update.sh", *extra):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


@pytest.mark.parametrize("extra", ["b_1.0_all.deb", "sub/b_1.0_all.deb", "B_1.0_ALL.DEB"])
def test_an_unlisted_deb_is_refused(tmp_path: Path, extra: str) -> None:
    root = extracted(tmp_path / "x", extra)
    with pytest.raises(UnsafePackageError, match=r"a \.deb that manifest\.json does not list"):
        load_manifest(root, 2)


def test_the_updaters_own_files_are_not_unlisted_entries(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Recovery re-reads an extraction directory the updater has written its status into."""
    root = extracted(tmp_path / "x", RUN_STATUS_FILE, APT_CONFIG_FILE, "data.csv")
    with caplog.at_level(logging.INFO, logger="opq_box_updater.package"):
        load_manifest(root, 2)
    assert "unlisted entries: data.csv" in caplog.text
    assert ".opq" not in caplog.text


def make_zip(path: Path, members: dict[str, str | bytes],
             manifest: dict[str, object] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest or MANIFEST))
        for name, data in {"a_1.0_all.deb": "!<arch>\n", "update.sh": "",
                           **members}.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("name", [RUN_STATUS_FILE, f"./{APT_CONFIG_FILE}"])
def test_a_package_carrying_the_updaters_files_is_refused(tmp_path: Path, name: str) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    package = make_zip(tmp_path / "p.zip", {name: '{"state": "finished", "returncode": 0}'})
    with pytest.raises(UnsafePackageError, match="reserved for the updater"):
        extract_package(package, downloads, max_unpacked_bytes=1 << 20)
    assert not list(downloads.iterdir())
    with pytest.raises(UnsafePackageError, match="reserved for the updater"):
        inspect_package(package)


@pytest.mark.parametrize("name", ["b_1.0_all.deb", "sub/b.deb"])
def test_the_publisher_refuses_an_unlisted_deb(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePackageError, match="does not list"):
        inspect_package(make_zip(tmp_path / "p.zip", {name: "!<arch>\n"}))
    real = make_deb(tmp_path / "debs", "opq-a", "1.0").read_bytes()  # boxes read its control
    assert inspect_package(make_zip(tmp_path / "ok.zip", {"README": "x", "a_1.0_all.deb": real})
                           ).debs == ("a_1.0_all.deb",)


# --- end to end -------------------------------------------------------------------------------


def test_a_signed_package_with_an_unlisted_deb_is_refused_and_changes_nothing(
        world: World) -> None:  # noqa: F811
    w = world
    install_v1(w)
    before = w.installed()
    listed, unlisted = w.deb("alpha", "2.0"), w.deb("evil", "6.6")
    package = w.sim.make_package(
        2, debs={listed.name: listed.read_bytes()}, run=b"#!/bin/sh\necho run >> "
        + str(w.order).encode() + b"\n", members={unlisted.name: unlisted.read_bytes()})
    w.sim.publish(2, package=package)
    proc = w.run("run", expect=REFUSED)
    assert "evil_6.6_all.deb: a .deb that manifest.json does not list" in proc.stderr
    assert w.installed() == before  # neither deb applied
    assert w.lines() == []  # no run script, no maintainer script
    status = w.assert_clean(before)
    assert (status["installed_version"], status["failed_versions"]) == (1, [2])
    assert not [p for p in w.box.download_dir.iterdir() if p.is_dir()]  # extraction removed


def test_a_recovery_does_not_call_the_guards_status_an_unlisted_entry(
        world: World) -> None:  # noqa: F811
    """A cut after the run script ran leaves its status file; the next run re-reads the
    extraction directory and commits, without logging our own file as the package's."""
    w = world
    install_v1(w)
    publish_v2(w)
    assert cut_power(w, Cut("commit", fault="commit")).returncode == -9
    w.run("run", expect=OK)
    w.assert_clean({"alpha": "2.0", "beta": "1.0"})
    log = w.box.log_file.read_text()
    assert "recover" in log
    assert "unlisted entries" not in log
