"""``opq-box-publish bridge`` (issue 8, part 2): a legacy-format release, checked with the
tools the original updater uses (``openssl base64 -d``, ``openssl dgst -sha256 -verify``,
Python's ``tarfile``), and what the publisher refuses before it writes anything.

The bridge's ``update.sh`` runs in a clean Debian root in tests/test_bridge_install.py;
here it is checked with shellcheck and read as the original updater would unpack it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import require_tool, tree_digest
from debs import make_deb

from opq_box_updater.publish import bridge

PUBLISH = [sys.executable, "-m", "opq_box_updater.publish.cli"]
SCRIPT = Path(bridge.__file__).with_name("bridge-update.sh")
URL = "http://127.0.0.1:8080/opq/"
#: openssl genpkey arguments of the key types the original updater's operators may hold.
KEY_TYPES = {
    "rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    "ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
}


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("openssl"), *args], capture_output=True, text=True,
                          check=check)


def publish(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PUBLISH, *map(str, args)], capture_output=True, text=True,
                          check=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Legacy keys made by openssl, a new repository's trust anchor, and debs."""
    base = tmp_path_factory.mktemp("bridge-inputs")
    out = {}
    for kind, args in KEY_TYPES.items():
        out[kind] = base / f"legacy-{kind}.pem"
        openssl("genpkey", *args, "-out", str(out[kind]))
    openssl("genpkey", "-algorithm", "ED25519", "-out", str(base / "ed25519.pem"))
    out["ed25519"] = base / "ed25519.pem"
    proc = publish("init", base / "repo", "--keys", base / "keys")
    assert proc.returncode == 0, proc.stderr
    out["anchor"] = base / "repo/root/1.root.json"
    out["updater"] = make_deb(base / "debs", "opq-box-updater", "1.2.0", depends="python3")
    out["other"] = make_deb(base / "deps", "python3-example", "1.0")
    return out


def bridge_args(inputs: dict[str, Path], legacy: Path, key: str = "rsa") -> list[str | Path]:
    return ["bridge", legacy, "--legacy-key", inputs[key], "--deb", inputs["updater"],
            "--server-url", URL, "--trust-root", inputs["anchor"]]


def legacy_check(legacy: Path, version_file: str = "version.json") -> tuple[dict[str, object],
                                                                            str]:
    """What the original updater does with a release: base64 -d, then dgst -verify."""
    doc = json.loads((legacy / version_file).read_text())
    sig_bin = legacy.parent / "sig.bin"
    openssl("base64", "-d", "-in", str(legacy / str(doc["signature"])), "-out", str(sig_bin))
    verify = openssl("dgst", "-sha256", "-verify", str(legacy / str(doc["public_key"])),
                     "-signature", str(sig_bin), str(legacy / str(doc["package"])), check=False)
    return doc, verify.stdout + verify.stderr


@pytest.mark.parametrize("key", ["rsa", "ec"])
def test_openssl_verifies_the_bridge_and_refuses_a_flipped_byte(
        inputs: dict[str, Path], tmp_path: Path, key: str) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    proc = publish(*bridge_args(inputs, legacy, key))
    assert proc.returncode == 0, proc.stderr
    doc, verdict = legacy_check(legacy)
    assert "Verified OK" in verdict, verdict
    assert doc == {"version": 1, "package": "opq-bridge-1.tar.gz",
                   "public_key": "opq-bridge-1.pem", "signature": "opq-bridge-1.sig"}
    lines = (legacy / "opq-bridge-1.sig").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(0 < len(line) <= 64 for line in lines[:-1])

    package = legacy / "opq-bridge-1.tar.gz"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x01
    package.write_bytes(bytes(data))
    _, verdict = legacy_check(legacy)
    assert "Verified OK" not in verdict and "Verification failure" in verdict, verdict


def test_the_version_goes_up_from_a_float_and_old_files_stay(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    old = {"version": 1.3, "public_key": "key.pem", "package": "update.tar.gz",
           "signature": "update.sig"}
    (legacy / "version.json").write_text(json.dumps(old))
    (legacy / "update.tar.gz").write_bytes(b"the release boxes have now")
    assert publish(*bridge_args(inputs, legacy)).returncode == 0
    assert json.loads((legacy / "version.json").read_text())["version"] == 2
    assert (legacy / "update.tar.gz").read_bytes() == b"the release boxes have now"
    assert publish(*bridge_args(inputs, legacy)).returncode == 0
    doc, verdict = legacy_check(legacy)
    assert doc["version"] == 3 and "Verified OK" in verdict
    assert (legacy / "opq-bridge-2.tar.gz").is_file(), "the previous bridge stays served"

    proc = publish(*bridge_args(inputs, legacy), "--legacy-version", "3")
    assert proc.returncode == 2 and "not higher than the current legacy version 3" in proc.stderr
    assert publish(*bridge_args(inputs, legacy), "--legacy-version", "10").returncode == 0
    assert json.loads((legacy / "version.json").read_text())["version"] == 10


def test_the_package_unpacks_as_the_original_updater_runs_it(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    proc = publish(*bridge_args(inputs, legacy), "--with-debs", inputs["other"].parent,
                   "--version-file", "version-box.json")
    assert proc.returncode == 0, proc.stderr
    assert not (legacy / "version.json").exists()
    doc, verdict = legacy_check(legacy, "version-box.json")
    assert "Verified OK" in verdict
    download = tmp_path / "download"
    with tarfile.open(legacy / str(doc["package"])) as tar:  # any compression, as the seed
        members = {m.name: m for m in tar.getmembers()}
        assert {(m.uid, m.gid, m.uname) for m in members.values()} == {(0, 0, "root")}
        tar.extractall(download)
    script = download / "update.sh"
    assert script.read_bytes() == b"#!/bin/sh\n" + SCRIPT.read_bytes()
    assert os.access(script, os.X_OK), "the original updater runs it directly"
    conf = dict(shlex.split(line)[0].split("=", 1)
                for line in (download / "bridge.conf").read_text().splitlines()
                if not line.startswith("#"))
    assert conf == {"BRIDGE_VERSION": "1", "SERVER_URL": URL, "REPORT_URL": "",
                    "DEBS": f"{inputs['updater'].name} {inputs['other'].name}",
                    "PACKAGES": "opq-box-updater python3-example",
                    "UPDATER_DEB": inputs["updater"].name, "APT_SOURCE": "",
                    "APT_KEYRING": "", "APT_KEYRING_PATH": ""}
    assert (download / "trust-root.json").read_bytes() == inputs["anchor"].read_bytes()
    for deb in (inputs["updater"], inputs["other"]):
        assert (download / "debs" / deb.name).read_bytes() == deb.read_bytes()


def test_an_apt_source_is_carried_with_the_keyring_its_signed_by_names(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    sources = tmp_path / "opq.sources"
    sources.write_text("Types: deb\nURIs: http://127.0.0.1:8080/apt/\nSuites: bookworm\n"
                       "Components: main\nSigned-By: /etc/apt/keyrings/opq-archive.gpg\n")
    keyring = tmp_path / "opq-archive.gpg"
    keyring.write_bytes(b"\x99keyring")
    args = [*bridge_args(inputs, legacy), "--apt-source", sources]
    proc = publish(*args)
    assert proc.returncode == 2 and "go together" in proc.stderr
    assert publish(*args, "--apt-keyring", keyring).returncode == 0
    with tarfile.open(legacy / "opq-bridge-1.tar.gz") as tar:
        conf = tar.extractfile("bridge.conf").read().decode()  # type: ignore[union-attr]
        assert tar.extractfile("apt/opq-archive.gpg").read() == b"\x99keyring"  # type: ignore[union-attr]
    assert "APT_KEYRING_PATH=/etc/apt/keyrings/opq-archive.gpg" in conf.splitlines()


def _broken_anchor(inputs: dict[str, Path], tmp_path: Path) -> Path:
    doc = json.loads(inputs["anchor"].read_text())
    doc["signed"]["version"] = 2
    path = tmp_path / "anchor.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(("change", "code", "message"), [
    ("ed25519", 2, "needs RSA or EC"),
    ("no-updater-deb", 2, "exactly one opq-box-updater .deb"),
    ("two-updater-debs", 2, "exactly one opq-box-updater .deb, got 2"),
    ("not-a-deb", 3, "is not a valid .deb"),
    ("anchor", 3, "trust anchor"),
    ("url", 2, "--server-url"),
    ("report-url", 2, "--report-url"),
    ("version-file", 2, "--version-file"),
    ("not-a-number", 2, "is not a number"),
    ("sources-without-signed-by", 2, "Signed-By"),
    ("keyring-outside-the-keyring-dirs", 2, "Signed-By"),
])
def test_refusals_write_nothing(inputs: dict[str, Path], tmp_path: Path, change: str,
                                code: int, message: str) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "version.json").write_text('{"version": 1.3, "package": "p.tar"}')
    args = bridge_args(inputs, legacy)
    if change == "ed25519":
        args = bridge_args(inputs, legacy, "ed25519")
    elif change == "no-updater-deb":
        args[args.index(inputs["updater"])] = inputs["other"]
    elif change == "two-updater-debs":
        args += ["--deb", make_deb(tmp_path / "b", "opq-box-updater", "1.3.0")]
    elif change == "not-a-deb":
        fake = tmp_path / "opq-box-updater_9_all.deb"
        fake.write_bytes(b"!<arch>\nnot really")
        args += ["--deb", fake]
    elif change == "anchor":
        args[args.index(inputs["anchor"])] = _broken_anchor(inputs, tmp_path)
    elif change == "url":
        args[args.index(URL)] = "http://x/ y"
    elif change == "report-url":
        args += ["--report-url", "ftp://x/report"]
    elif change == "version-file":
        args += ["--version-file", "../version.json"]
    elif change == "not-a-number":
        (legacy / "version.json").write_text('{"version": "1.3"}')
    elif change == "sources-without-signed-by":
        sources = tmp_path / "opq.sources"
        sources.write_text("Types: deb\nURIs: http://x/\nSuites: bookworm\nComponents: main\n")
        args += ["--apt-source", sources, "--apt-keyring", inputs["anchor"]]
    elif change == "keyring-outside-the-keyring-dirs":
        sources = tmp_path / "opq.sources"
        sources.write_text("Types: deb\nURIs: http://x/\nSuites: bookworm\nComponents: main\n"
                           "Signed-By: /etc/apt/keyrings/../../shadow\n")
        args += ["--apt-source", sources, "--apt-keyring", inputs["anchor"]]
    before = tree_digest(legacy)
    proc = publish(*args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert tree_digest(legacy) == before


def test_update_script_passes_shellcheck() -> None:
    proc = subprocess.run([require_tool("shellcheck"), "-s", "sh", str(SCRIPT)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_encrypted_legacy_key_needs_its_passphrase(inputs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    encrypted = tmp_path / "legacy-encrypted.pem"
    openssl("pkey", "-in", str(inputs["ec"]), "-aes256", "-passout", "pass:s3cret",
            "-out", str(encrypted))
    args = bridge_args(inputs, legacy)
    args[args.index(inputs["rsa"])] = encrypted
    proc = publish(*args)
    assert proc.returncode == 2 and "--legacy-key-passphrase-file" in proc.stderr
    assert list(legacy.iterdir()) == []
    secret = tmp_path / "passphrase"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    proc = publish(*args, "--legacy-key-passphrase-file", secret)
    assert proc.returncode == 0, proc.stderr
    assert "Verified OK" in legacy_check(legacy)[1]


def test_the_trial_run_of_the_checklist_is_the_cron_line() -> None:
    """docs/migration.md's by-hand run of the original updater is the deployed cron line's
    command (its output appended to the log the checklist then reads) in cron's
    environment, as test_bridge_install.py runs it."""
    from test_bridge_install import CRON_LINE

    doc = (Path(__file__).resolve().parent.parent / "docs" / "migration.md").read_text()
    step = doc.split("**Try one box first.**", 1)[1].split("**Publish the bridge**", 1)[0]
    block = step.split("```sh", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    words = shlex.split(block.splitlines()[1])
    assert words[:7] == ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/root", "SHELL=/bin/sh",
                         "LOGNAME=root", "/bin/sh"], words
    command = CRON_LINE.split(None, 5)[5].removesuffix(" # run_updater")
    assert words[7:] == ["-c", command]
