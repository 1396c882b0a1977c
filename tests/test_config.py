"""The config file: defaults, and one clear error naming key and file for every bad value."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from opq_box_updater import config as config_module
from opq_box_updater.config import (
    Timeouts,
    join_url,
    load_config,
    parse_config,
    url_problem,
    with_box_id,
)
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


# --- one URL rule: config.py, the debconf config script and the postinst (issue 13, 3) ----

BAD_URLS = {
    "http://?x": "no host",
    "http:///path": "no host",
    "http://#frag": "no host",
    "https://emilia.example.org/opq-updates/repo?token=a": "query",
    "https://emilia.example.org/opq-updates/#top": "fragment",
    "http://127.0.0.1:99999/": "port",
    "http://127.0.0.1:0/": "port",
    "http://127.0.0.1:x/": "port",
    "http://[::1": "parsed",
    "http://[zzz]/": "parsed",
    "http://user:secret@emilia.example.org/": "password",
    "http://emilia example.org/": "whitespace",
    "http://emilia.example.org/\x1b[31m": "control",
    "ftp://emilia.example.org/": "http:// or https://",
    "emilia.example.org/opq-updates/": "http:// or https://",
    "http://-bad-.example.org/": "host name",
}
GOOD_URLS = ["https://emilia.example.org/opq-updates/", "http://127.0.0.1:8151",
             "http://[::1]:8151/opq-updates/", "http://box-server_1.lan:65535/a/b/",
             "HTTPS://Emilia.Example.org/"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_urls_are_refused_everywhere_with_the_reason(url: str) -> None:
    reason = BAD_URLS[url]
    assert reason in (url_problem(url) or "")
    for key in ("server_url", "report_url"):
        with pytest.raises(ConfigError) as err:
            parse_config(cfg(**{key: url}), P)
        assert f"'{key}'" in str(err.value) and reason in str(err.value)
    proc = check_url(url)
    assert proc.returncode == 2 and reason in proc.stdout, proc


@pytest.mark.parametrize("url", GOOD_URLS)
def test_good_urls_are_accepted(url: str) -> None:
    assert url_problem(url) is None
    assert parse_config(cfg(server_url=url, report_url=url), P).server_url == url
    proc = check_url(url)
    assert proc.returncode == 0 and proc.stdout == "", proc


def check_url(url: str) -> subprocess.CompletedProcess[str]:
    """The maintainer scripts' call, in isolated mode as they make it."""
    return subprocess.run([sys.executable, "-I", "-m", "opq_box_updater.config", "--check-url",
                           url], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent, check=False)


@pytest.mark.parametrize("name", ["version-beta.json", "version.json", "version-arm_64.json"])
def test_channel_names_are_accepted(name: str) -> None:
    assert parse_config(cfg(version_file=name), P).version_file == name


@pytest.mark.parametrize("name", ["versionX.json", "version-a-b.json", "version-.json",
                                  "beta.json", "version-beta.json.bak"])
def test_version_file_must_be_a_channel_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"'version_file'.*version-NAME\.json"):
        parse_config(cfg(version_file=name), P)


# --- box identity (issue 13, 4) ---------------------------------------------------------


@pytest.fixture
def no_machine_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    machine_id = tmp_path / "machine-id"
    monkeypatch.setattr(config_module, "MACHINE_ID", machine_id)
    return machine_id


@pytest.mark.parametrize("content", [None, "", "uninitialized\n", "0" * 32 + "\n"])
def test_a_box_without_identity_generates_one_once_and_keeps_it(
        tmp_path: Path, no_machine_id: Path, content: str | None) -> None:
    if content is not None:
        no_machine_id.write_text(content)
    state = tmp_path / "state"
    config = parse_config(cfg(state_dir=str(state)), P)
    assert config.box_id == ""
    first = with_box_id(config)
    assert re.fullmatch(r"[0-9a-f]{32}", first.box_id)
    assert (state / "box_id").read_text() == first.box_id + "\n"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert with_box_id(parse_config(cfg(state_dir=str(state)), P)).box_id == first.box_id
    other = with_box_id(parse_config(cfg(state_dir=str(tmp_path / "other")), P))
    assert other.box_id != first.box_id


def test_the_machine_id_and_the_config_win_over_a_generated_id(
        tmp_path: Path, no_machine_id: Path) -> None:
    no_machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    state = tmp_path / "state"
    assert with_box_id(parse_config(cfg(state_dir=str(state)), P)).box_id == \
        "0123456789abcdef0123456789abcdef"
    assert with_box_id(parse_config(cfg(state_dir=str(state), box_id="b7"), P)).box_id == "b7"
    assert not state.exists()


def test_no_box_id_is_generated_into_a_state_dir_others_can_write(
        tmp_path: Path, no_machine_id: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o777)
    with pytest.raises(ConfigError, match=f"state directory {state}.*writable"):
        with_box_id(parse_config(cfg(state_dir=str(state)), P))
    assert list(state.iterdir()) == []
