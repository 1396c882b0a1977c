"""The verification core, table-driven: bytes and a clock in, a verdict out (no I/O)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from opq_box_updater import metadata as md
from opq_box_updater.errors import (
    BadVersionError,
    ExpiredMetadataError,
    FormatError,
    RollbackError,
    UnsignedMetadataError,
)

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
SHA = "ab" * 32


def ts(delta: timedelta = timedelta()) -> str:
    return md.format_time(NOW + delta)


@dataclass
class Key:
    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def keyid(self) -> str:
        return md.keyid_of(self.public)


def root_signed(version: int, root_keys: list[Key], release_keys: list[Key],
                root_threshold: int = 1, release_threshold: int = 1,
                expires: str | None = None) -> dict[str, Any]:
    keys = {k.keyid: {"keytype": "ed25519", "public": k.public.hex()}
            for k in [*root_keys, *release_keys]}
    return {"type": "root", "spec_version": 1, "version": version,
            "expires": expires or ts(timedelta(days=365)), "keys": keys,
            "roles": {"root": {"keyids": [k.keyid for k in root_keys],
                               "threshold": root_threshold},
                      "release": {"keyids": [k.keyid for k in release_keys],
                                  "threshold": release_threshold}}}


def envelope(signed: dict[str, Any], signers: list[Key]) -> bytes:
    return json.dumps(md.make_envelope(signed, [k.private for k in signers])).encode()


def release_signed(version: int = 2, root_version: int = 1, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "release", "spec_version": 1, "version": version, "root_version": root_version,
        "channel": "version.json", "issued": ts(), "expires": ts(timedelta(days=30)),
        "package": {"path": f"packages/{SHA}.zip", "sha256": SHA, "length": 10},
        "rollout_percent": 100, "notes": ""}
    doc.update(over)
    return doc


@pytest.fixture
def keys() -> dict[str, Key]:
    return {name: Key() for name in ("r1", "r2", "r3", "rel1", "rel2", "stranger")}


# --- canonical JSON ------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    b'{"a": 1.0}', b'{"a": 1e3}', b'{"a": NaN}', b'{"a": Infinity}', b'{"a": [1, -0.5]}',
    b'{"a": 1, "a": 2}', b'{"x": {"b": 1, "b": 1}}', b'\xff\xfe', b'{"a": ', b"",
    b'{"a": ' + b"9" * 5000 + b"}",  # past int()'s digit limit: a ValueError, not a crash
])
def test_parse_json_refuses(text: bytes) -> None:
    with pytest.raises(FormatError):
        md.parse_json(text)


def test_canonical_form_is_sorted_compact_utf8() -> None:
    assert md.canonical_bytes({"b": [1, "é"], "a": None, "c": True}) == \
        '{"a":null,"b":[1,"é"],"c":true}'.encode()
    with pytest.raises(FormatError):
        md.canonical_bytes({"a": [{"b": 0.5}]})


def test_keyid_is_sha256_of_raw_public_key(keys: dict[str, Key]) -> None:
    assert keys["r1"].keyid == hashlib.sha256(keys["r1"].public).hexdigest()


# --- trust anchor and root structure -------------------------------------------------------


def test_trust_anchor_accepts_self_signed_root(keys: dict[str, Key]) -> None:
    data = envelope(root_signed(1, [keys["r1"]], [keys["rel1"]]), [keys["r1"]])
    root = md.verify_trust_anchor(data)
    assert root.version == 1 and root.role("release").keyids == (keys["rel1"].keyid,)


def _bad_root(keys: dict[str, Key], case: str) -> bytes:
    s = root_signed(1, [keys["r1"]], [keys["rel1"]])
    rid = keys["r1"].keyid
    if case == "keyid-not-hash":
        entry = s["keys"].pop(rid)
        s["keys"]["00" * 32] = entry
        s["roles"]["root"]["keyids"] = ["00" * 32]
    elif case == "keytype":
        s["keys"][rid]["keytype"] = "rsa"
    elif case == "missing-key":
        s["roles"]["release"]["keyids"].append("11" * 32)
    elif case == "threshold-zero":
        s["roles"]["root"]["threshold"] = 0
    elif case == "threshold-too-high":
        s["roles"]["root"]["threshold"] = 2
    elif case == "bool-for-int":
        s["version"] = True
    elif case == "spec-version":
        s["spec_version"] = 2
    elif case == "wrong-type":
        s["type"] = "release"
    elif case == "bad-time":
        s["expires"] = "2027-01-01 00:00:00"
    elif case == "missing-role":
        del s["roles"]["release"]
    data = envelope(s, [keys["r1"]])
    if case == "float-in-signatures":
        doc = json.loads(data)
        doc["signatures"][0]["extra"] = 1.5
        data = json.dumps(doc).encode()
    return data


@pytest.mark.parametrize("case", [
    "keyid-not-hash", "keytype", "missing-key", "threshold-zero", "threshold-too-high",
    "bool-for-int", "spec-version", "wrong-type", "bad-time", "missing-role",
    "float-in-signatures",
])
def test_invalid_roots_are_refused(keys: dict[str, Key], case: str) -> None:
    with pytest.raises(FormatError):
        md.verify_trust_anchor(_bad_root(keys, case))


def test_trust_anchor_must_meet_its_own_threshold(keys: dict[str, Key]) -> None:
    data = envelope(root_signed(1, [keys["r1"], keys["r2"]], [keys["rel1"]], root_threshold=2),
                    [keys["r1"], keys["r1"]])  # a repeated keyid counts once
    with pytest.raises(UnsignedMetadataError):
        md.verify_trust_anchor(data)


# --- root rotation (python-tuf test_updater_key_rotations style) ---------------------------


@dataclass(frozen=True)
class Rotation:
    old_keys: tuple[str, ...]
    old_threshold: int
    new_keys: tuple[str, ...]
    new_threshold: int
    signers: tuple[str, ...]
    ok: bool


ROTATIONS = {
    "same key": Rotation(("r1",), 1, ("r1",), 1, ("r1",), True),
    "1-of-1 to new key, both sign": Rotation(("r1",), 1, ("r2",), 1, ("r1", "r2"), True),
    "new key alone": Rotation(("r1",), 1, ("r2",), 1, ("r2",), False),
    "old key alone": Rotation(("r1",), 1, ("r2",), 1, ("r1",), False),
    "2-of-3, two old sign, new threshold 1": Rotation(("r1", "r2", "r3"), 2, ("r1",), 1,
                                                      ("r1", "r2"), True),
    "2-of-3, one signs": Rotation(("r1", "r2", "r3"), 2, ("r1", "r2", "r3"), 2, ("r1",), False),
    "threshold raised to 3, two sign": Rotation(("r1", "r2", "r3"), 2, ("r1", "r2", "r3"), 3,
                                               ("r1", "r2"), False),
    "threshold raised to 3, all sign": Rotation(("r1", "r2", "r3"), 2, ("r1", "r2", "r3"), 3,
                                               ("r1", "r2", "r3"), True),
    "stranger signatures ignored": Rotation(("r1",), 1, ("r1",), 1, ("stranger", "r1"), True),
    "only stranger": Rotation(("r1",), 1, ("r1",), 1, ("stranger",), False),
    "duplicate signature counts once": Rotation(("r1", "r2"), 2, ("r1", "r2"), 2, ("r1", "r1"),
                                                False),
}


@pytest.mark.parametrize("name", ROTATIONS)
def test_root_rotation(keys: dict[str, Key], name: str) -> None:
    case = ROTATIONS[name]
    old = md.parse_root(envelope(root_signed(1, [keys[k] for k in case.old_keys],
                                             [keys["rel1"]], case.old_threshold), []))
    new_data = envelope(root_signed(2, [keys[k] for k in case.new_keys], [keys["rel1"]],
                                    case.new_threshold), [keys[k] for k in case.signers])
    if case.ok:
        assert md.verify_next_root(old, new_data).version == 2
    else:
        with pytest.raises(UnsignedMetadataError):
            md.verify_next_root(old, new_data)


@pytest.mark.parametrize("version", [1, 3, 10])
def test_next_root_must_be_exactly_n_plus_1(keys: dict[str, Key], version: int) -> None:
    old = md.parse_root(envelope(root_signed(1, [keys["r1"]], [keys["rel1"]]), []))
    data = envelope(root_signed(version, [keys["r1"]], [keys["rel1"]]), [keys["r1"]])
    with pytest.raises(BadVersionError):
        md.verify_next_root(old, data)


def test_expired_root_is_refused(keys: dict[str, Key]) -> None:
    root = md.parse_root(envelope(root_signed(1, [keys["r1"]], [keys["rel1"]],
                                              expires=ts(-timedelta(seconds=1))), []))
    with pytest.raises(ExpiredMetadataError):
        md.check_root_fresh(root, NOW)
    md.check_root_fresh(root, NOW - timedelta(days=1))


def test_release_keys_changed(keys: dict[str, Key]) -> None:
    a = md.parse_root(envelope(root_signed(1, [keys["r1"]], [keys["rel1"]]), []))
    b = md.parse_root(envelope(root_signed(2, [keys["r2"]], [keys["rel1"]]), []))
    c = md.parse_root(envelope(root_signed(3, [keys["r2"]], [keys["rel2"]]), []))
    assert not md.release_keys_changed(a, b)
    assert md.release_keys_changed(b, c)


# --- release -------------------------------------------------------------------------------


@pytest.fixture
def root(keys: dict[str, Key]) -> md.Root:
    return md.parse_root(envelope(root_signed(1, [keys["r1"]], [keys["rel1"], keys["rel2"]],
                                              release_threshold=2), []))


def test_release_verifies(keys: dict[str, Key], root: md.Root) -> None:
    data = envelope(release_signed(), [keys["rel1"], keys["rel2"]])
    release = md.verify_release(root, data, NOW, md.Floors())
    assert release.version == 2 and release.package.sha256 == SHA


RELEASE_FAILURES: dict[str, tuple[dict[str, Any], tuple[str, ...], md.Floors, type]] = {
    "stranger key": ({}, ("stranger", "rel1"), md.Floors(), UnsignedMetadataError),
    "below threshold": ({}, ("rel1",), md.Floors(), UnsignedMetadataError),
    "root key is not a release key": ({}, ("r1", "rel1"), md.Floors(), UnsignedMetadataError),
    "expired (freeze)": ({"expires": ts(-timedelta(seconds=1))}, ("rel1", "rel2"), md.Floors(),
                         ExpiredMetadataError),
    "older version (rollback)": ({"version": 1}, ("rel1", "rel2"), md.Floors(2),
                                 RollbackError),
    "same version, older issued": ({"issued": ts(-timedelta(hours=1))}, ("rel1", "rel2"),
                                   md.Floors(2, NOW), RollbackError),
    "names an older root (mix-and-match)": ({"root_version": 0}, ("rel1", "rel2"), md.Floors(),
                                            FormatError),
    "names a newer root": ({"root_version": 2}, ("rel1", "rel2"), md.Floors(), BadVersionError),
    "path does not match sha": ({"package": {"path": "packages/x.zip", "sha256": SHA,
                                             "length": 1}}, ("rel1", "rel2"), md.Floors(),
                                FormatError),
    "bool length": ({"package": {"path": f"packages/{SHA}.zip", "sha256": SHA,
                                 "length": True}}, ("rel1", "rel2"), md.Floors(), FormatError),
    "rollout over 100": ({"rollout_percent": 101}, ("rel1", "rel2"), md.Floors(), FormatError),
    "unknown field": ({"extra": 1}, ("rel1", "rel2"), md.Floors(), FormatError),
    "wrong type": ({"type": "root"}, ("rel1", "rel2"), md.Floors(), FormatError),
}


@pytest.mark.parametrize("name", RELEASE_FAILURES)
def test_release_refused(keys: dict[str, Key], root: md.Root, name: str) -> None:
    over, signers, floors, error = RELEASE_FAILURES[name]
    data = envelope(release_signed(**over), [keys[k] for k in signers])
    with pytest.raises(error):
        md.verify_release(root, data, NOW, floors)


def test_release_signed_then_tampered(keys: dict[str, Key], root: md.Root) -> None:
    doc = json.loads(envelope(release_signed(), [keys["rel1"], keys["rel2"]]))
    doc["signed"]["version"] = 3
    with pytest.raises(UnsignedMetadataError):
        md.verify_release(root, json.dumps(doc).encode(), NOW, md.Floors())


def test_release_with_mix_and_match_root_version(keys: dict[str, Key]) -> None:
    root2 = md.parse_root(envelope(root_signed(2, [keys["r1"]], [keys["rel2"]]), []))
    data = envelope(release_signed(root_version=1), [keys["rel1"]])
    with pytest.raises(BadVersionError):
        md.verify_release(root2, data, NOW, md.Floors())


def test_equal_version_later_issued_is_accepted(keys: dict[str, Key], root: md.Root) -> None:
    data = envelope(release_signed(issued=ts(timedelta(hours=1))), [keys["rel1"], keys["rel2"]])
    assert md.verify_release(root, data, NOW, md.Floors(2, NOW)).version == 2


def test_non_canonical_storage_still_verifies(keys: dict[str, Key], root: md.Root) -> None:
    doc = md.make_envelope(release_signed(), [keys["rel1"].private, keys["rel2"].private])
    pretty = json.dumps(doc, indent=4).encode()  # stored pretty, verified canonically
    assert md.verify_release(root, pretty, NOW, md.Floors()).version == 2


# --- time and rollout ----------------------------------------------------------------------


@pytest.mark.parametrize(("clock", "issued", "expected"), [
    (NOW, None, NOW),
    (NOW, NOW - timedelta(days=1), NOW),
    (datetime(1970, 1, 1, tzinfo=UTC), NOW, NOW),
])
def test_trusted_now(clock: datetime, issued: datetime | None, expected: datetime) -> None:
    assert md.trusted_now(clock, issued) == expected


def test_rollout_bucket_matches_the_contract() -> None:
    bucket = int(hashlib.sha256(b"box-7:3").hexdigest(), 16) % 100
    assert md.rollout_bucket("box-7", 3) == bucket
    assert md.in_rollout("box-7", 3, bucket + 1) and not md.in_rollout("box-7", 3, bucket)
    assert not md.in_rollout("box-7", 3, 0) and md.in_rollout("box-7", 3, 100)


def test_rollout_spreads_boxes() -> None:
    inside = sum(md.in_rollout(f"box-{i}", 5, 30) for i in range(2000))
    assert 500 < inside < 700
