"""Boundaries of the verification core that mutation testing (make mutate) showed untested:
each test here failed against at least one surviving mutant of metadata.py or trust.py."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from test_metadata import NOW, Key, envelope, release_signed, root_signed, ts
from test_trust import DAY, Box, Repo

from opq_box_updater import metadata as md
from opq_box_updater.errors import (
    BadVersionError,
    ExpiredMetadataError,
    FormatError,
    UnsignedMetadataError,
)
from opq_box_updater.trust import TrustedSet, starting_root

# --- JSON shape ----------------------------------------------------------------------------


def test_nesting_cap_is_exactly_max_depth() -> None:
    """MAX_DEPTH containers deep parse; one more is refused (the cap is not off by one)."""
    ok = b"[" * md.MAX_DEPTH + b"]" * md.MAX_DEPTH
    assert md.parse_json(ok) is not None
    deep = b"[" * (md.MAX_DEPTH + 1) + b"]" * (md.MAX_DEPTH + 1)
    with pytest.raises(FormatError, match="nested deeper"):
        md.parse_json(deep)
    objects = b'{"a":' * md.MAX_DEPTH + b"1" + b"}" * md.MAX_DEPTH
    assert md.parse_json(objects) is not None


def test_surrogate_check_skips_non_strings_and_catches_the_last_one() -> None:
    """A valid pair beside a number parses; the lone surrogate U+DFFF is refused."""
    assert md.parse_json(b'{"a": "\\ud83d\\ude00", "b": 1, "c": [2, null]}')["b"] == 1
    with pytest.raises(FormatError, match="lone surrogate"):
        md.parse_json(b'{"a": "x\\udfff"}')


# --- times ---------------------------------------------------------------------------------


def test_parse_time_keeps_every_field_and_accepts_the_first_year() -> None:
    assert md.parse_time("2026-01-31T12:34:56Z") == datetime(2026, 1, 31, 12, 34, 56, tzinfo=UTC)
    assert md.parse_time("1970-01-01T00:00:00Z") == datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("value", [
    "2026-01-31T12:00:00Zjunk", "2026-01-31T12:00:00Z\n", " 2026-01-31T12:00:00Z",
    "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z", "1969-12-31T23:59:59Z",
])
def test_parse_time_refuses_with_a_format_error(value: str) -> None:
    """Trailing characters, impossible dates: FormatError (exit 3), never a ValueError."""
    with pytest.raises(FormatError):
        md.parse_time(value)


def test_format_time_converts_to_utc_whatever_the_local_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        moment = datetime(2026, 1, 1, 2, 0, 0, tzinfo=timezone(timedelta(hours=2)))
        assert md.format_time(moment) == "2026-01-01T00:00:00Z"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# --- signatures ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["zz" * 64, "ab" * 63 + "a", "AB" * 64, "", "ab" * 65])
def test_malformed_signature_is_ignored_not_counted(bad: str) -> None:
    """A non-hex, odd-length or wrong-length signature from a role key counts for nothing:
    the document is unsigned, and no bytes.fromhex crash escapes."""
    k = Key()
    doc = json.loads(envelope(root_signed(1, [k], [k]), []))
    doc["signatures"] = [{"keyid": k.keyid, "sig": bad}]
    with pytest.raises(UnsignedMetadataError):
        md.verify_trust_anchor(json.dumps(doc).encode())


def test_duplicate_keyids_in_a_role_are_refused() -> None:
    k = Key()
    signed = root_signed(1, [k], [k])
    signed["roles"]["release"]["keyids"] = [k.keyid, k.keyid]
    with pytest.raises(FormatError, match="distinct"):
        md.parse_root(envelope(signed, [k]))


def test_release_keys_id_is_a_16_digit_fingerprint_of_threshold_and_keys() -> None:
    """Stored beside the floors: its form must not drift between versions."""
    a, b = Key(), Key()
    root = md.parse_root(envelope(root_signed(1, [a], [b, a], release_threshold=2), [a]))
    keys = ",".join(sorted([a.keyid, b.keyid]))
    assert md.release_keys_id(root) == hashlib.sha256(f"2:{keys}".encode()).hexdigest()[:16]


# --- release fields ------------------------------------------------------------------------


def _release(**over: Any) -> md.Release:
    k = Key()
    return md.parse_release(md.parse_envelope(envelope(release_signed(**over), [k])))


def test_release_fields_are_kept() -> None:
    sha = "ef" * 32
    rel = _release(package={"path": f"packages/{sha}.zip", "sha256": sha, "length": 1},
                   rollout_percent=0)
    assert rel.package == md.PackageRef(f"packages/{sha}.zip", sha, 1)
    assert rel.rollout_percent == 0
    assert _release(rollout_percent=37).rollout_percent == 37


@pytest.mark.parametrize("over", [
    {"version": 0}, {"root_version": 0}, {"rollout_percent": -1}, {"rollout_percent": 101},
    {"package": {"path": "packages/" + "ab" * 32 + ".zip", "sha256": "ab" * 32, "length": 0}},
    {"package": {"path": "packages/" + "AB" * 32 + ".zip", "sha256": "AB" * 32, "length": 1}},
    {"package": {"path": "packages/" + "ab" * 31 + ".zip", "sha256": "ab" * 31, "length": 1}},
])
def test_release_field_bounds(over: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        _release(**over)


# --- expiry at the exact second ------------------------------------------------------------


def test_root_and_release_expire_at_their_expiry_second() -> None:
    k = Key()
    root = md.parse_root(envelope(root_signed(1, [k], [k], expires=ts()), [k]))
    with pytest.raises(ExpiredMetadataError):
        md.check_root_fresh(root, NOW)
    md.check_root_fresh(root, NOW - timedelta(seconds=1))
    good = md.parse_root(envelope(root_signed(1, [k], [k]), [k]))
    data = envelope(release_signed(root_version=1, expires=ts()), [k])
    with pytest.raises(ExpiredMetadataError):
        md.verify_release(good, data, NOW, md.Floors())
    assert md.verify_release(good, data, NOW - timedelta(seconds=1), md.Floors()).version == 2


# --- trust.py ------------------------------------------------------------------------------


def test_starting_root_from_the_stored_chain() -> None:
    repo = Repo()
    two = repo.add_root()
    anchor = repo.roots[1]
    start = starting_root(anchor, anchor, None)
    assert start.root.version == 1 and start.store_anchor is False
    start = starting_root(anchor, anchor, two)
    assert start.root.version == 2 and start.store_anchor is False
    start = starting_root(anchor, None, two)
    assert start.root.version == 1 and start.store_anchor is True


def test_clock_behind_only_past_the_skew() -> None:
    trusted = Box(Repo(), time_floor=NOW).trusted()
    assert trusted.clock_behind(NOW - DAY - timedelta(seconds=1))
    assert not trusted.clock_behind(NOW - DAY)
    assert not Box(Repo()).trusted().clock_behind(NOW - 1000 * DAY)


def test_root_walk_cap_is_exactly_max_root_steps() -> None:
    steps = 32  # DESIGN 2.2, literally: mutmut does not mutate module constants
    repo = Repo()
    for _ in range(steps):
        repo.add_root()
    box = Box(repo)
    trusted = box.trusted()
    walk = trusted.roots_to_fetch(repo.release(2, root_version=1 + steps))
    assert list(walk) == list(range(2, steps + 2))
    with pytest.raises(BadVersionError):
        trusted.roots_to_fetch(repo.release(2, root_version=2 + steps))
    walked = Box(repo, root_version=3).trusted()
    assert list(walked.roots_to_fetch(repo.release(2, root_version=3 + steps - 1))
                ) == list(range(4, 3 + steps))


def test_accepted_carries_what_to_persist() -> None:
    repo = Repo()
    two = repo.add_root()
    box = Box(repo)
    accepted = box.update(repo.release(5, root_version=2))
    assert accepted.release.version == 5
    assert accepted.new_roots == ((2, two),)
    assert accepted.keys_id == md.release_keys_id(md.parse_root(two))
    assert accepted.floors == md.Floors(5, NOW)


def test_cached_release_with_keys_changed_ignores_the_time_floor() -> None:
    """A time floor set under other release keys (a stolen key's far-future issued) must not
    make an unexpired stored release look expired; under the same keys it does."""
    repo = Repo()
    data = repo.release(3, expires=NOW + 2 * DAY)
    far = NOW + 10 * DAY
    root = md.parse_root(repo.roots[1])
    same = TrustedSet(root, channel="version.json", floors=md.Floors(3, NOW), time_floor=far,
                      installed_version=3, floors_keys=md.release_keys_id(root),
                      time_floor_keys=md.release_keys_id(root))
    with pytest.raises(ExpiredMetadataError):
        same.check_cached(data, NOW)
    other = TrustedSet(root, channel="version.json", floors=md.Floors(3, NOW), time_floor=far,
                       installed_version=3, floors_keys="0" * 16, time_floor_keys="0" * 16)
    assert other.check_cached(data, NOW).version == 3
    with pytest.raises(ExpiredMetadataError):  # the exact expiry second
        other.check_cached(data, NOW + 2 * DAY)
