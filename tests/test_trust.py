"""The trusted state (``trust.py``), table-driven with bytes alone: no disk, no network.

Each row of :data:`CASES` is one rule of DESIGN 2.2-2.3 and names the attack (or the
operator's mistake) it stops. A row builds a box's trusted state and what a server serves,
feeds the bytes to :class:`TrustedSet` the way the updater does, and checks either the error
or what the box would persist.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_metadata import Key, root_signed

from opq_box_updater import metadata as md
from opq_box_updater.errors import (
    BadVersionError,
    ExpiredMetadataError,
    FormatError,
    RepositoryError,
    RollbackError,
    UnsignedMetadataError,
    WrongChannelError,
)
from opq_box_updater.trust import Accepted, TrustedSet, starting_root

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SHA = "cd" * 32


def ts(moment: datetime) -> str:
    return md.format_time(moment)


def sign(signed: dict[str, Any], signers: list[Key]) -> bytes:
    return json.dumps(md.make_envelope(signed, [k.private for k in signers])).encode()


@dataclass
class Repo:
    """An operator's repository in memory: root keys, release keys, roots by version."""

    root_keys: list[Key] = field(default_factory=lambda: [Key(), Key()])
    release_keys: list[Key] = field(default_factory=lambda: [Key()])
    root_threshold: int = 1
    release_threshold: int = 1
    roots: dict[int, bytes] = field(default_factory=dict)
    known: dict[str, Key] = field(default_factory=dict)  # every key ever used, by keyid

    def __post_init__(self) -> None:
        self.add_root()

    def add_root(self, *, signers: list[Key] | None = None,
                 expires: datetime | None = None) -> bytes:
        """Publish the next root with the current keys, signed by ``signers`` (default: the
        previous root's root keys and the new ones, as a rotation is signed)."""
        version = len(self.roots) + 1
        self.known.update({k.keyid: k for k in [*self.root_keys, *self.release_keys]})
        if signers is None:
            previous = md.parse_root(self.roots[version - 1]) if self.roots else None
            old = [self.known[i] for i in previous.role("root").keyids] if previous else []
            signers = [*old, *(k for k in self.root_keys if k not in old)]
        signed = root_signed(version, self.root_keys, self.release_keys, self.root_threshold,
                             self.release_threshold, ts(expires or NOW + 365 * DAY))
        self.roots[version] = sign(signed, signers)
        return self.roots[version]

    def rotate_release(self, keys: list[Key], threshold: int = 1) -> bytes:
        self.release_keys, self.release_threshold = keys, threshold
        return self.add_root()

    def release(self, version: int, *, channel: str = "version.json",
                issued: datetime = NOW, expires: datetime | None = None,
                root_version: int | None = None, signers: list[Key] | None = None,
                fields: dict[str, Any] | None = None) -> bytes:
        signed = {"type": "release", "spec_version": 1, "version": version,
                  "root_version": root_version or max(self.roots), "channel": channel,
                  "issued": ts(issued), "expires": ts(expires or issued + 30 * DAY),
                  "package": {"path": f"packages/{SHA}.zip", "sha256": SHA, "length": 10},
                  "rollout_percent": 100, "notes": "", **(fields or {})}
        return sign(signed, signers if signers is not None else self.release_keys)


@dataclass
class Box:
    """What a box stored: its trusted root, one channel's floors, the time floor."""

    repo: Repo
    root_version: int = 1
    channel: str = "version.json"
    floor: int = 0
    floor_issued: datetime | None = None
    time_floor: datetime | None = None
    installed: int = 0
    keys_of_root: int | None = None  # the root whose release keys set both floors

    def trusted(self) -> TrustedSet:
        root = md.parse_root(self.repo.roots[self.root_version])
        keys = md.release_keys_id(md.parse_root(self.repo.roots[self.keys_of_root])) \
            if self.keys_of_root else None
        return TrustedSet(root, channel=self.channel,
                          floors=md.Floors(self.floor, self.floor_issued), floors_keys=keys,
                          time_floor=self.time_floor, time_floor_keys=keys,
                          installed_version=self.installed)

    def update(self, release: bytes, clock: datetime = NOW) -> Accepted:
        """What the updater does with a fetched release: walk, then verify."""
        trusted = self.trusted()
        for version in trusted.roots_to_fetch(release):
            trusted.update_root(self.repo.roots[version])
        return trusted.update_release(release, clock)


Case = Callable[[], tuple[Box, bytes, datetime]]  # the box, what is served, the clock


@dataclass(frozen=True)
class Row:
    attack: str
    make: Case
    error: type[RepositoryError] | None = None  # None: accepted
    check: Callable[[Accepted], bool] | None = None


def _plain() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(1), NOW


def _rollback() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo, floor=5, floor_issued=NOW - DAY), repo.release(4), NOW


def _replayed_copy() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo, floor=4, floor_issued=NOW), repo.release(4, issued=NOW - DAY), NOW


def _resigned_copy() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo, floor=4, floor_issued=NOW - DAY), repo.release(4, issued=NOW), NOW


def _freeze() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(2, issued=NOW - 40 * DAY), NOW


def _freeze_clock_in_1970() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    box = Box(repo, time_floor=NOW)
    return box, repo.release(2, issued=NOW - 40 * DAY), datetime(1970, 1, 1, tzinfo=UTC)


def _expiry_second() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(2, issued=NOW - DAY, expires=NOW), NOW


def _stranger() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(2, signers=[Key()]), NOW


def _signed_by_root_key() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(2, signers=repo.root_keys), NOW


def _other_channel() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo, floor=3), repo.release(4, channel="version-arm64.json"), NOW


def _own_channel_below_other() -> tuple[Box, bytes, datetime]:
    repo = Repo()  # the box moved from arm64 (floor 9 there) to its own channel at v3
    box = Box(repo, channel="version-beta.json")
    return box, repo.release(3, channel="version-beta.json"), NOW


def _bad_channel_name() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(2, channel="../version.json"), NOW


def _mix_and_match() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    old = repo.release_keys
    repo.rotate_release([Key()])  # the box already walked to root v2
    return Box(repo, root_version=2), repo.release(2, root_version=1, signers=old), NOW


def _removed_key_new_root() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    old = repo.release_keys
    repo.rotate_release([Key()])
    return Box(repo), repo.release(2, signers=old), NOW


def _root_below_threshold() -> tuple[Box, bytes, datetime]:
    repo = Repo(root_threshold=2)
    old = repo.root_keys
    repo.root_keys = [Key(), Key()]
    repo.add_root(signers=[old[0], *repo.root_keys])  # one of the two old keys
    return Box(repo), repo.release(2), NOW


def _root_skips_a_version() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    repo.roots[2] = sign(root_signed(3, repo.root_keys, repo.release_keys), repo.root_keys)
    return Box(repo), repo.release(2, root_version=2), NOW


def _too_many_steps() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(2, root_version=1 + md.MAX_ROOT_STEPS + 1), NOW


def _stored_root_expired_new_one_served() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    repo.roots[1] = sign(root_signed(1, repo.root_keys, repo.release_keys,
                                     expires=ts(NOW - DAY)), repo.root_keys)
    repo.add_root()
    return Box(repo), repo.release(2), NOW


def _newest_root_expired() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    repo.roots[1] = sign(root_signed(1, repo.root_keys, repo.release_keys,
                                     expires=ts(NOW - DAY)), repo.root_keys)
    return Box(repo), repo.release(2), NOW


def _stolen_key_recovery() -> tuple[Box, bytes, datetime]:
    repo = Repo()  # a stolen release key published v1000 issued in 2090; operators rotate
    box = Box(repo, floor=1000, floor_issued=NOW + 20000 * DAY, time_floor=NOW + 20000 * DAY,
              installed=3)
    repo.rotate_release([Key()])
    return box, repo.release(4), NOW


def _cut_after_the_new_root_was_stored() -> tuple[Box, bytes, datetime]:
    """The run that walked to the rotated root stored it, then the power went before the
    floors were written: the next run walks nothing, yet the floors must still fall back."""
    repo = Repo()
    box = Box(repo, floor=1000, floor_issued=NOW + 20000 * DAY, time_floor=NOW + 20000 * DAY,
              installed=3, keys_of_root=1)
    repo.rotate_release([Key()])
    box.root_version = 2
    return box, repo.release(4), NOW


def _channel_returned_to_after_the_rotation() -> tuple[Box, bytes, datetime]:
    """beta's floor was raised by the stolen key; the rotation was walked on stable; the box
    comes back to beta, whose floor was set under the old keys."""
    repo = Repo()
    box = Box(repo, channel="version-beta.json", floor=1000, floor_issued=NOW,
              keys_of_root=1, installed=0)
    repo.rotate_release([Key()])
    box.root_version = 2
    return box, repo.release(2, channel="version-beta.json"), NOW


def _floor_set_under_the_current_keys() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    repo.add_root()  # a root-role-only rotation: the release keys are the same
    return Box(repo, root_version=2, floor=5, floor_issued=NOW, keys_of_root=1), \
        repo.release(4), NOW


def _threshold_only_change() -> tuple[Box, bytes, datetime]:
    repo = Repo(release_keys=[Key(), Key()])
    box = Box(repo, floor=1000, floor_issued=NOW, installed=3)
    repo.release_threshold = 2
    repo.add_root()
    return box, repo.release(4), NOW


def _root_keys_only_change() -> tuple[Box, bytes, datetime]:
    repo = Repo()  # the root role rotates, the release keys stay: the floor stays
    box = Box(repo, floor=1000, floor_issued=NOW, installed=3)
    repo.root_keys = [Key()]
    repo.add_root()
    return box, repo.release(4), NOW


def _year_999() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo), repo.release(2, fields={"issued": "0999-01-01T00:00:00Z"}), NOW


def _lone_surrogate() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    data = repo.release(2, fields={"notes": "x"}).replace(b'"notes": "x"',
                                                           b'"notes": "\\ud800"')
    return Box(repo), data, NOW


def _time_floor_moves() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo, time_floor=NOW - DAY), repo.release(2, issued=NOW + DAY), NOW


def _time_floor_never_goes_back() -> tuple[Box, bytes, datetime]:
    repo = Repo()
    return Box(repo, time_floor=NOW + 2 * DAY), repo.release(2, issued=NOW - DAY), NOW


CASES = [
    Row("nothing: a fresh release is accepted and becomes the floor", _plain,
        check=lambda a: a.floors == md.Floors(1, NOW) and a.time_floor == NOW),
    Row("rollback: an older, validly signed release", _rollback, RollbackError),
    Row("replay: the same version with an older issued", _replayed_copy, RollbackError),
    Row("re-signed copy of the same version is accepted", _resigned_copy,
        check=lambda a: a.floors == md.Floors(4, NOW)),
    Row("freeze: an expired release", _freeze, ExpiredMetadataError),
    Row("freeze with the clock in 1970: the time floor decides", _freeze_clock_in_1970,
        ExpiredMetadataError),
    Row("freeze: valid until the very second it expires, not at it", _expiry_second,
        ExpiredMetadataError),
    Row("arbitrary package: a stranger's signature", _stranger, UnsignedMetadataError),
    Row("role confusion: a root key is no release key", _signed_by_root_key,
        UnsignedMetadataError),
    Row("cross-channel: another channel's release at this path", _other_channel,
        WrongChannelError),
    Row("channel move: a box on its own channel is not held by another's floor",
        _own_channel_below_other, check=lambda a: a.floors.version == 3),
    Row("a channel name with a path in it", _bad_channel_name, FormatError),
    Row("mix-and-match: a release naming the old root, signed by a removed key",
        _mix_and_match, BadVersionError),
    Row("mix-and-match: a removed key signing for the new root", _removed_key_new_root,
        UnsignedMetadataError),
    Row("threshold: root N+1 signed by fewer of N's root keys than the threshold",
        _root_below_threshold, UnsignedMetadataError),
    Row("a root served for N+1 that says it is N+2", _root_skips_a_version, BadVersionError),
    Row("endless walk: more than 32 root steps in one run", _too_many_steps, BadVersionError),
    Row("an expired stored root still reaches the operators' new root",
        _stored_root_expired_new_one_served, check=lambda a: a.root.version == 2),
    Row("freeze of the root: the newest trusted root expired", _newest_root_expired,
        ExpiredMetadataError),
    Row("stolen release key: rotating the release keys resets both floors",
        _stolen_key_recovery,
        check=lambda a: a.floors_reset and a.floors.version == 4 and a.time_floor == NOW),
    Row("stolen release key: a threshold-only change of the release role resets too",
        _threshold_only_change, check=lambda a: a.floors_reset),
    Row("a root-role rotation keeps the release floor", _root_keys_only_change,
        RollbackError),
    Row("stolen release key: a power cut after the new root was stored still resets",
        _cut_after_the_new_root_was_stored,
        check=lambda a: a.floors_reset and a.floors.version == 4 and a.time_floor == NOW),
    Row("stolen release key: a channel the box returns to after the rotation resets",
        _channel_returned_to_after_the_rotation, check=lambda a: a.floors_reset),
    Row("rollback: a floor set under the keys still trusted holds",
        _floor_set_under_the_current_keys, RollbackError),
    Row("a signed issued in year 999 (would not survive a round trip)", _year_999,
        FormatError),
    Row("a lone surrogate in a signed string (exit 3, not a crash)", _lone_surrogate,
        FormatError),
    Row("the time floor moves to the newest issued", _time_floor_moves,
        check=lambda a: a.time_floor == NOW + DAY),
    Row("the time floor never moves back", _time_floor_never_goes_back,
        check=lambda a: a.time_floor == NOW + 2 * DAY),
]


@pytest.mark.parametrize("row", CASES, ids=lambda r: r.attack)
def test_trust_rules(row: Row) -> None:
    box, served, clock = row.make()
    if row.error is not None:
        with pytest.raises(row.error):
            box.update(served, clock)
        return
    accepted = box.update(served, clock)
    assert row.check is not None and row.check(accepted), accepted


def test_nothing_is_accepted_until_the_release_verifies() -> None:
    """Roots walked for a release that then fails are not handed out to be stored."""
    repo = Repo()
    old = repo.release_keys
    repo.rotate_release([Key()])
    trusted = Box(repo).trusted()
    release = repo.release(2, signers=old)
    for version in trusted.roots_to_fetch(release):
        trusted.update_root(repo.roots[version])
    with pytest.raises(UnsignedMetadataError):
        trusted.update_release(release, NOW)
    assert trusted.root.version == 2  # walked in memory; the caller stores nothing


def test_walk_is_bounded_even_when_the_caller_keeps_feeding_roots() -> None:
    repo = Repo()
    for _ in range(md.MAX_ROOT_STEPS + 1):
        repo.add_root()
    trusted = Box(repo).trusted()
    for version in range(2, 2 + md.MAX_ROOT_STEPS):
        trusted.update_root(repo.roots[version])
    with pytest.raises(BadVersionError):
        trusted.update_root(repo.roots[2 + md.MAX_ROOT_STEPS])


def test_a_refused_root_keeps_the_old_one() -> None:
    repo = Repo(root_threshold=2)
    trusted = Box(repo).trusted()
    bad = repo.add_root(signers=repo.root_keys[:1])
    with pytest.raises(UnsignedMetadataError):
        trusted.update_root(bad)
    assert trusted.root.version == 1


# --- the starting root ---------------------------------------------------------------------


def test_anchor_with_bad_signatures_is_refused() -> None:
    repo = Repo()
    forged = json.loads(repo.roots[1])
    forged["signatures"] = [{"keyid": s["keyid"], "sig": "00" * 64}
                            for s in forged["signatures"]]
    with pytest.raises(UnsignedMetadataError):
        starting_root(json.dumps(forged).encode(), None, None)


def test_swapped_anchor_is_verified_and_restored() -> None:
    """A new anchor (another copy than the stored one) is verified and replaces the chain."""
    repo, other = Repo(), Repo()
    start = starting_root(other.roots[1], repo.roots[1], None)
    assert start.store_anchor and start.root.keys != md.parse_root(repo.roots[1]).keys


def test_stored_chain_starts_from_its_newest_root_without_crypto() -> None:
    repo = Repo()
    repo.add_root()
    start = starting_root(repo.roots[1], repo.roots[1], repo.roots[2])
    assert (start.root.version, start.store_anchor) == (2, False)


# --- the 304 path ------------------------------------------------------------------------


@pytest.mark.parametrize(("clock", "error"), [
    (NOW, None),
    (NOW + 31 * DAY, ExpiredMetadataError),  # the server keeps answering 304: a freeze
])
def test_cached_release(clock: datetime, error: type[RepositoryError] | None) -> None:
    repo = Repo()
    data = repo.release(2)
    box = Box(repo, floor=2, floor_issued=NOW)
    if error is None:
        assert box.trusted().check_cached(data, clock).version == 2
    else:
        with pytest.raises(error):
            box.trusted().check_cached(data, clock)


def test_cached_release_of_an_older_root_is_refused() -> None:
    """A 304 must not bring back a release verified under a root the box no longer trusts
    (a new anchor, or a rotation): its signers may be the revoked keys."""
    repo = Repo()
    old = repo.release(5)
    repo.rotate_release([Key()])
    with pytest.raises(BadVersionError):
        Box(repo, root_version=2).trusted().check_cached(old, NOW)


def test_nesting_and_surrogates_are_format_errors_not_crashes() -> None:
    repo = Repo()
    deep = b'{"signed": ' + b"[" * 900 + b'"\\ud800"' + b"]" * 900 + b', "signatures": []}'
    for data in (deep, b"[" * 100000, repo.release(2, fields={"notes": [[[[[[["x"]]]]]]]})):
        with pytest.raises(FormatError):
            Box(repo).update(data)


def test_cached_release_of_another_channel_is_refused() -> None:
    repo = Repo()
    box = Box(repo, channel="version-beta.json")
    with pytest.raises(WrongChannelError):
        box.trusted().check_cached(repo.release(2), NOW)


def test_clock_far_behind_the_time_floor_is_noticed() -> None:
    trusted = Box(Repo(), time_floor=NOW).trusted()
    assert trusted.clock_behind(NOW - 2 * DAY) and not trusted.clock_behind(NOW)
    assert trusted.now(datetime(1970, 1, 1, tzinfo=UTC)) == NOW
