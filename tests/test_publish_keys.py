"""Keys at rest (issue 12, item 5): a passphrase seals keys with scrypt (memory-hard) instead
of PKCS#8's PBKDF2 with 2048 iterations; ``init`` without one says the keys are in the clear;
a passphrase file others can read is refused; keys written by older versions still load."""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opq_box_updater.publish import build, cli, keys, repo, sealed
from opq_box_updater.publish.common import PublishError

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)


def test_a_passphrase_seals_keys_with_scrypt_and_they_sign(tmp_path: Path) -> None:
    store = keys.KeyStore(tmp_path / "k", b"s3cret")
    store.ensure_dir()
    key = Ed25519PrivateKey.generate()
    path = store.store(key, "release")
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN OPQ SCRYPT ED25519 PRIVATE KEY-----\n")
    blob = base64.b64decode(b"".join(data.splitlines()[1:-1]))
    assert blob[:5] == b"OPQK1" and tuple(blob[5:8]) == (17, 8, 1), "N=2**17, r=8, p=1"
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    assert raw not in data and base64.b64encode(raw) not in data
    loaded = keys.KeyStore(tmp_path / "k", b"s3cret").private_key(keys.key_id(key))
    assert keys.public_hex(loaded) == keys.public_hex(key)
    with pytest.raises(PublishError, match="wrong passphrase"):
        keys.KeyStore(tmp_path / "k", b"wrong").private_key(keys.key_id(key))
    with pytest.raises(PublishError, match="is encrypted"):
        keys.KeyStore(tmp_path / "k").private_key(keys.key_id(key))


def test_a_changed_sealed_key_or_a_cheap_cost_is_refused() -> None:
    pem = sealed.seal(b"k" * 32, b"pw")
    blob = bytearray(base64.b64decode(b"".join(pem.splitlines()[1:-1])))
    for index, value in ((5, 10), (5, 30), (len(blob) - 1, blob[-1] ^ 1)):
        changed = bytearray(blob)
        changed[index] = value
        text = base64.encodebytes(bytes(changed))
        with pytest.raises(ValueError, match=r"out of bounds|wrong passphrase|changed"):
            sealed.unseal(pem.splitlines()[0] + b"\n" + text + pem.splitlines()[-1], b"pw")


def test_keys_of_the_old_format_still_load_and_sign(tmp_path: Path) -> None:
    """PKCS#8 with BestAvailableEncryption, as every earlier version wrote them."""
    repo.init_repo(tmp_path / "repo", tmp_path / "keys", passphrase=b"old", now=NOW)
    for pem in (tmp_path / "keys").glob("*.pem"):  # rewrite as an older publisher did
        key = keys.KeyStore(tmp_path / "keys", b"old")._load(pem)
        pem.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"old")))
        assert pem.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    (tmp_path / "run.sh").write_bytes(b"#!/bin/sh\n")
    build.build_package(tmp_path / "p.zip", version=1, run=tmp_path / "run.sh")
    release = repo.publish_release(tmp_path / "repo", tmp_path / "keys", tmp_path / "p.zip",
                                   passphrase=b"old", now=NOW)
    assert release.version == 1


def test_init_without_a_passphrase_warns_that_keys_are_plaintext(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        repo.init_repo(tmp_path / "repo", tmp_path / "keys", now=NOW)
    assert "written unencrypted" in caplog.text and keys.PASSPHRASE_ENV in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        repo.init_repo(tmp_path / "repo2", tmp_path / "keys2", passphrase=b"x", now=NOW)
    assert "unencrypted" not in caplog.text


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_a_passphrase_file_others_can_read_is_refused(
        tmp_path: Path, mode: int, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    secret.chmod(mode)
    with pytest.raises(PublishError, match=f"mode {mode:o}.*chmod 600"):
        keys.read_passphrase(secret)
    code = cli.main(["init", str(tmp_path / "repo"), "--keys", str(tmp_path / "keys"),
                     "--passphrase-file", str(secret)])
    assert code == 2
    assert "chmod 600" in capsys.readouterr().err
    assert not (tmp_path / "keys").exists() and not (tmp_path / "repo").exists()
    secret.chmod(0o600)
    assert keys.read_passphrase(secret) == b"s3cret"
