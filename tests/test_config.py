"""The config file: defaults, and one clear error naming key and file for every bad value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from opq_box_updater.config import Timeouts, join_url, load_config, parse_config
from opq_box_updater.errors import ConfigError

P = Path("/etc/opq/updater_config.json")


def cfg(**over: Any) -> bytes:
    return json.dumps({"server_url": "http://emilia.example/updates", **over}).encode()


def test_defaults() -> None:
    c = parse_config(cfg(box_id="b1"), P)
    assert c.version_file == "version.json"
    assert c.download_dir_path == Path("/var/cache/opq-box-updater/")
    assert c.trust_root == Path("/usr/share/opq-box-updater/root.json")
    assert c.state_dir == Path("/var/lib/opq-box-updater/")
    assert c.log_file == Path("/var/log/opq/box_updater.log")
    assert c.hooks_dir == Path("/etc/opq/updater/hooks/")
    assert c.dpkg_root == Path("/") and c.installer == "dpkg"
    assert c.timeouts == Timeouts(10, 30, 3600, 120)
    assert c.max_package_bytes == 1024**3 and c.max_unpacked_bytes == 2 * 1024**3
    assert c.ca_bundle is None and c.report_url is None and c.box_id == "b1"


@pytest.mark.parametrize(("base", "rel", "url"), [
    ("http://h/u", "version.json", "http://h/u/version.json"),
    ("http://h/u/", "/packages/x.zip", "http://h/u/packages/x.zip"),
    ("http://h/u//", "root/2.root.json", "http://h/u/root/2.root.json"),
])
def test_join_url_uses_exactly_one_slash(base: str, rel: str, url: str) -> None:
    assert join_url(base, rel) == url


@pytest.mark.parametrize(("over", "key"), [
    ({"server_url": "ftp://x"}, "server_url"),
    ({"server_url": 7}, "server_url"),
    ({"version_file": "../x.json"}, "version_file"),
    ({"version_file": "beta.txt"}, "version_file"),
    ({"state_dir": "relative/dir"}, "state_dir"),
    ({"dpkg_root": 1}, "dpkg_root"),
    ({"installer": "yum"}, "installer"),
    ({"timeouts": {"connect": -1}}, "timeouts.connect"),
    ({"timeouts": {"connect": True}}, "timeouts.connect"),
    ({"timeouts": {"bogus": 1}}, "timeouts.bogus"),
    ({"timeouts": 5}, "timeouts"),
    ({"max_package_bytes": "1G"}, "max_package_bytes"),
    ({"max_unpacked_bytes": 0}, "max_unpacked_bytes"),
    ({"max_unpacked_bytes": 1.5}, "max_unpacked_bytes"),
    ({"box_id": ""}, "box_id"),
    ({"report_url": "not a url"}, "report_url"),
    ({"ca_bundle": "certs.pem"}, "ca_bundle"),
])
def test_bad_values_name_key_and_file(over: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(cfg(**over), P)
    assert f"'{key}'" in str(err.value) and str(P) in str(err.value)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"version_file": "v.json"}', b"\xff"])
def test_malformed_files(data: bytes) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, P)
    assert str(P) in str(err.value)


def test_unknown_keys_are_collected_not_fatal() -> None:
    assert parse_config(cfg(colour="blue", zz=1), P).unknown_keys == ("colour", "zz")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.json")
