"""The box package's maintainer scripts on a box that had the original updater (issue 8,
part 2): its ``/etc/opq/updater_config.json`` (only ``download_dir_path``, ``server_url``,
``version_file``) becomes the new config with the server URL from debconf; the original is
kept as ``.legacy`` and every change is said on stderr.

The scripts run with the debconf stand-in of tests/test_debian_packaging.py, against a
directory instead of /etc; the clean-root run is tests/test_bridge_install.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from test_debian_packaging import CONFIG_SCRIPT, POSTINST, POSTRM, Debconf

NEW_URL = "https://emilia.example.org/opq-updates/"
LEGACY_URL = "http://emilia.example.org:8151/"
#: The original updater's config as its setup.py installs it.
LEGACY = {"download_dir_path": "/var/opq/updater/", "server_url": LEGACY_URL,
          "version_file": "version.json"}


def legacy_box(tmp_path: Path, content: dict[str, object] | None = None) -> Debconf:
    debconf = Debconf(tmp_path)
    debconf.config.parent.mkdir(parents=True)
    debconf.config.write_text(json.dumps(content or LEGACY))
    debconf.config.chmod(0o640)
    return debconf


def test_a_legacy_config_becomes_the_new_one_and_the_original_is_kept(tmp_path: Path) -> None:
    debconf = legacy_box(tmp_path)
    original = debconf.config.read_bytes()
    debconf.set("server_url", NEW_URL)  # preseeded by the bridge
    assert debconf.run(CONFIG_SCRIPT).returncode == 0
    assert debconf.get("server_url") == NEW_URL, "the legacy URL does not win over the answer"
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(debconf.config.read_text()) == {"server_url": NEW_URL,
                                                       "version_file": "version.json"}
    assert stat.S_IMODE(debconf.config.stat().st_mode) == 0o640, "the admin's mode kept"
    copy = debconf.config.with_name("updater_config.json.legacy")
    assert copy.read_bytes() == original
    for said in (f"original kept as {copy}", f"server_url '{LEGACY_URL}' -> '{NEW_URL}'",
                 "download_dir_path '/var/opq/updater/' dropped", "version_file "):
        assert said in proc.stderr, proc.stderr
    assert debconf.get("applied_server_url") == NEW_URL

    # Configured again (dpkg-reconfigure, an upgrade): the new config is not legacy any more.
    after = debconf.config.read_bytes()
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0 and "legacy" not in proc.stderr, proc.stderr
    assert debconf.config.read_bytes() == after and copy.read_bytes() == original


def test_a_download_directory_of_the_admins_choice_is_kept(tmp_path: Path) -> None:
    debconf = legacy_box(tmp_path, {**LEGACY, "download_dir_path": "/mnt/sd/updater/",
                                    "version_file": "version-beta.json"})
    debconf.set("server_url", NEW_URL)
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(debconf.config.read_text()) == {
        "download_dir_path": "/mnt/sd/updater/", "server_url": NEW_URL,
        "version_file": "version-beta.json"}
    assert "download_dir_path '/mnt/sd/updater/' kept" in proc.stderr


def test_an_earlier_different_copy_is_never_overwritten(tmp_path: Path) -> None:
    debconf = legacy_box(tmp_path)
    earlier = debconf.config.with_name("updater_config.json.legacy")
    earlier.write_text('{"server_url": "http://older.example/"}')
    debconf.set("server_url", NEW_URL)
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert earlier.read_text() == '{"server_url": "http://older.example/"}'
    copies = sorted(debconf.config.parent.glob("updater_config.json.legacy.*"))
    assert len(copies) == 1 and json.loads(copies[0].read_text()) == LEGACY


def test_without_a_new_url_the_legacy_config_is_left_alone(tmp_path: Path) -> None:
    debconf = legacy_box(tmp_path)
    before = debconf.config.read_bytes()
    assert debconf.run(CONFIG_SCRIPT).returncode == 0
    assert debconf.get("server_url") == "", "the legacy server is not offered as the answer"
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert debconf.config.read_bytes() == before
    assert "may be the original updater's" in proc.stderr and "dpkg-reconfigure" in proc.stderr
    assert not debconf.config.with_name("updater_config.json.legacy").exists()


@pytest.mark.parametrize("content", [
    {"server_url": LEGACY_URL, "version_file": "version.json"},  # made by this package
    {**LEGACY, "timeouts": {"total": 600}},  # an admin's key: not the original's file
])
def test_a_config_that_is_not_the_legacy_one_keeps_its_other_keys(
        tmp_path: Path, content: dict[str, object]) -> None:
    debconf = legacy_box(tmp_path, content)
    debconf.set("server_url", NEW_URL)
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(debconf.config.read_text()) == {**content, "server_url": NEW_URL}
    assert "legacy" not in proc.stderr
    assert not debconf.config.with_name("updater_config.json.legacy").exists()


def test_purge_removes_the_copies(tmp_path: Path) -> None:
    debconf = legacy_box(tmp_path)
    debconf.set("server_url", NEW_URL)
    assert debconf.run(POSTINST).returncode == 0
    debconf.config.with_name("updater_config.json.legacy.20260101T000000Z").write_text("{}")
    proc = debconf.run(POSTRM, action="purge")
    assert proc.returncode == 0, proc.stderr
    assert not debconf.config.parent.exists() or not list(debconf.config.parent.iterdir())
