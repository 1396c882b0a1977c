"""Write the seed corpora into ``fuzz/seeds/`` (committed; rerun only to change them).

    python -m fuzz.seeds

Seeds are small valid documents and archives of each format, so the fuzzer starts from
inputs that get past the first checks. The .deb seeds are built with ``dpkg-deb``.
"""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
import zipfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from opq_box_updater.metadata import keyid_of, make_envelope

SEEDS = Path(__file__).resolve().parent / "seeds"


def _write(target: str, name: str, data: bytes) -> None:
    (SEEDS / target).mkdir(parents=True, exist_ok=True)
    (SEEDS / target / name).write_bytes(data)


def _public(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def metadata_seeds() -> None:
    keys = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2, 3)]
    pubs = [_public(k) for k in keys]
    ids = [keyid_of(bytes.fromhex(p)) for p in pubs]
    root = {"type": "root", "spec_version": 1, "version": 1, "expires": "2030-01-01T00:00:00Z",
            "keys": {i: {"keytype": "ed25519", "public": p}
                     for i, p in zip(ids, pubs, strict=True)},
            "roles": {"root": {"keyids": ids[:2], "threshold": 2},
                      "release": {"keyids": ids[2:], "threshold": 1}}}
    _write("root", "root-2of2.json", json.dumps(make_envelope(root, keys[:2])).encode())
    root1 = {**root, "version": 2, "roles": {"root": {"keyids": ids[:1], "threshold": 1},
                                             "release": {"keyids": ids[:1], "threshold": 1}}}
    _write("root", "root-1of1.json", json.dumps(make_envelope(root1, keys[:1]),
                                                indent=1).encode())
    sha = "ab" * 32
    release = {"type": "release", "spec_version": 1, "version": 7, "root_version": 1,
               "channel": "version-beta.json", "issued": "2026-01-31T12:00:00Z",
               "expires": "2026-03-02T12:00:00Z",
               "package": {"path": f"packages/{sha}.zip", "sha256": sha, "length": 12345},
               "rollout_percent": 50, "notes": "caf\u00e9 \\ \"notes\""}
    _write("release", "release.json", json.dumps(make_envelope(release, keys[2:])).encode())
    _write("release", "release-unsigned.json",
           json.dumps({"signed": {**release, "channel": "version.json"}, "signatures": []},
                      ensure_ascii=False).encode())
    _write("json", "object.json", b'{"a": [1, -2, true, false, null, "x\\u00e9\\n"], "b": {}}')
    _write("json", "nested.json", b'[[[{"k": [[]]}]], 0, "\\ud83d\\ude00"]')
    _write("json", "root.json", (SEEDS / "root" / "root-2of2.json").read_bytes())


def manifest_seeds() -> None:
    base = {"format": 1, "version": 3, "debs": ["a_1.0_all.deb"], "run": "update.sh",
            "healthcheck": "health.sh"}
    _write("manifest", "full.json", json.dumps(base).encode())
    _write("manifest", "two-debs.json", json.dumps(
        {**base, "debs": ["a_1.0_all.deb", "b_2.0_all.deb"], "run": None,
         "healthcheck": None}).encode())
    _write("manifest", "run-only.json", json.dumps({**base, "debs": []}, indent=2).encode())


def _zip(entries: list[tuple[str, bytes | None]], method: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in entries:
            if data is None:
                archive.writestr(zipfile.ZipInfo(name), b"")
            else:
                archive.writestr(name, data)
    return buffer.getvalue()


def zip_seeds() -> None:
    manifest = json.dumps({"format": 1, "version": 3, "debs": [], "run": "update.sh",
                           "healthcheck": None}).encode()
    files: list[tuple[str, bytes | None]] = [("manifest.json", manifest),
                                             ("update.sh", b"#!/bin/sh\necho hi\n")]
    _write("zip", "stored.zip", _zip(files, zipfile.ZIP_STORED))
    _write("zip", "deflated-dirs.zip", _zip(
        [*files, ("data/", None), ("data/x.txt", b"x" * 200)], zipfile.ZIP_DEFLATED))


def deb_seeds() -> None:
    for compression in ("xz", "gzip", "none"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "pkg"
            (root / "DEBIAN").mkdir(parents=True)
            (root / "DEBIAN" / "control").write_text(
                "Package: opq-seed\nVersion: 1:1.0-1\nArchitecture: all\n"
                "Maintainer: OPQ <opq@example.org>\nDescription: seed\n")
            (root / "usr" / "share" / "opq-seed").mkdir(parents=True)
            (root / "usr" / "share" / "opq-seed" / "x").write_text("x\n")
            out = Path(tmp) / "seed.deb"
            subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "-b",
                            str(root), str(out)], check=True, capture_output=True)
            _write("deb", f"seed-{compression}.deb", out.read_bytes())


if __name__ == "__main__":
    metadata_seeds()
    manifest_seeds()
    zip_seeds()
    deb_seeds()
