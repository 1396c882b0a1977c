"""The updater's verification steps, in-process and fast (make mutate's second pass, issue 9).

Each test runs ``Updater(config).run(check_only=True)`` — the steps DESIGN 3.1 takes before
anything is downloaded — against a :class:`RepoSim` served on 127.0.0.1, and checks the
outcome or the typed error *and* what was stored: the trust anchor and its checks
(``load_anchor``, ``_trusted_set``), the root walk (``_fetch_root``), what is persisted and
only after verification (``_refresh_metadata``), and the decision (``_decide``). The CLI
tests run the same code in subprocesses, where a mutation tool cannot see which test covers
which function; these do not. One server serves every test's repository.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Box
from faultserver import Fault, FaultServer
from reposim import RepoSim

from opq_box_updater import metadata as md
from opq_box_updater.config import load_config
from opq_box_updater.errors import (
    BadVersionError,
    ConfigError,
    DownloadHTTPError,
    LengthOrHashMismatchError,
    RollbackError,
    UnsignedMetadataError,
)
from opq_box_updater.state import ChannelState, State, Store
from opq_box_updater.updater import Outcome, Updater

CHANNEL = "version.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultServer]:
    """One server for the module; each test points it at its own repository."""
    with FaultServer(tmp_path_factory.mktemp("empty")) as srv:
        yield srv


class Rig:
    """A repository with release 1 and a box that has never run, sharing ``server``."""

    def __init__(self, tmp_path: Path, server: FaultServer, box_factory: Any) -> None:
        self.tmp = tmp_path
        self.server = server
        self.sim = RepoSim(tmp_path / "repo")
        self.sim.release(1)
        server.root = self.sim.path
        server.clear_faults()
        server.clear_log()
        self.box: Box = box_factory(server.url, self.sim.anchor)
        self.store = Store(self.box.state_dir)

    def check(self, *, force: bool = False, clock: Any = None) -> Outcome:
        updater = Updater(load_config(self.box.config_path), **({"clock": clock} if clock else {}))
        return updater.run(check_only=True, force=force)

    def requests(self) -> list[tuple[str, str | None, int]]:
        """(path, If-None-Match, status) of every request since the last call."""
        log = [(r.path, r.headers.get("If-None-Match"), r.status) for r in self.server.log]
        self.server.clear_log()
        return log

    def installed(self, version: int, channel: str = CHANNEL, **fields: Any) -> None:
        """Pretend ``version`` of ``channel`` is installed (the apply is not under test)."""
        self.store.ensure_dirs()
        state = self.store.load()
        ch = state.channel(channel)._replace(installed_version=version, **fields)
        self.store.save(state.with_channel(channel, ch)._replace(installed_channel=channel))

    def state_files(self) -> dict[str, bytes]:
        root = self.box.state_dir
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("last_run.json", "lock")}


@pytest.fixture
def rig(tmp_path: Path, server: FaultServer, box_factory: Any) -> Rig:
    return Rig(tmp_path, server, box_factory)


# --- what a verified check stores -----------------------------------------------------------


def test_a_first_check_stores_exactly_what_it_verified(rig: Rig) -> None:
    outcome = rig.check()
    assert (outcome.result, outcome.version) == ("update-available", 1)
    release = md.parse_release(md.parse_envelope(rig.sim.read(CHANNEL)))
    keys = md.release_keys_id(rig.sim.root)
    state = rig.store.load()
    assert state.channel(CHANNEL) == ChannelState(floor_version=1,
                                                  floor_issued=release.issued_str,
                                                  floor_keys=keys)
    assert (state.time_floor, state.time_floor_keys) == (release.issued_str, keys)
    assert state.metadata_url == f"{rig.server.url}/{CHANNEL}"
    assert state.etag and state.last_modified and state.installed_channel is None
    assert rig.store.load_release() == rig.sim.read(CHANNEL)
    assert {v: p.read_bytes() for v, p in rig.store.stored_roots().items()} == \
        {1: rig.sim.anchor_bytes}
    assert rig.requests() == [(f"/{CHANNEL}", None, 200)]


def test_an_unchanged_version_file_is_asked_for_conditionally_and_changes_nothing(
        rig: Rig) -> None:
    rig.check()
    etag, before = rig.store.load().etag, rig.state_files()
    rig.requests()
    outcome = rig.check()
    assert (outcome.result, outcome.version) == ("update-available", 1)
    assert rig.requests() == [(f"/{CHANNEL}", etag, 304)]
    assert rig.state_files() == before


def test_validators_are_sent_only_with_the_release_they_belong_to(rig: Rig) -> None:
    """Without the cached release a 304 could not be verified: ask unconditionally."""
    rig.check()
    rig.store.release_path.unlink()
    rig.requests()
    assert rig.check().version == 1
    assert rig.requests() == [(f"/{CHANNEL}", None, 200)]
    rig.store.save(rig.store.load()._replace(metadata_url="http://elsewhere/version.json"))
    assert rig.check().version == 1
    assert rig.requests() == [(f"/{CHANNEL}", None, 200)]


def test_a_server_without_etags_is_asked_with_the_date(rig: Rig) -> None:
    rig.server.set_fault(f"/{CHANNEL}", Fault(headers={"ETag": None}))
    rig.check()
    state = rig.store.load()
    assert state.etag is None and state.last_modified
    rig.requests()
    assert rig.check().version == 1
    log = rig.server.log
    assert [(r.headers.get("If-Modified-Since"), r.status) for r in log] == \
        [(state.last_modified, 304)]


def test_a_refused_release_stores_nothing(rig: Rig) -> None:
    rig.check()
    before = rig.state_files()
    rig.sim.publish(2, signers=[rig.sim.stranger()])
    with pytest.raises(UnsignedMetadataError):
        rig.check()
    assert rig.state_files() == before


# --- the trust anchor -----------------------------------------------------------------------


def _bad_anchor(rig: Rig, kind: str) -> None:
    anchor = rig.tmp / "anchor.json"
    if kind == "directory":
        anchor.mkdir()
    elif kind == "garbage":
        anchor.write_bytes(b"{")
    elif kind == "bad-signature":
        anchor.write_bytes(rig.sim.sign(rig.sim.root_doc(1), [rig.sim.stranger()]))
    rig.box.trust_root = anchor
    rig.box.write_config()


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "bad-signature"])
def test_an_unusable_trust_anchor_is_a_config_error_before_any_request(rig: Rig,
                                                                      kind: str) -> None:
    _bad_anchor(rig, kind)
    with pytest.raises(ConfigError, match="trust anchor"):
        rig.check()
    assert rig.requests() == []
    assert rig.store.stored_roots() == {}


def test_a_new_operators_anchor_supersedes_the_old_chain_and_its_validators(
        rig: Rig, tmp_path: Path) -> None:
    """The box is re-pinned to another repository (a reinstall, a new operator): roots of
    the old chain are removed, the new anchor must verify, and the old validators go."""
    rig.sim.rotate("release")
    rig.check()
    assert sorted(rig.store.stored_roots()) == [1, 2]
    other = RepoSim(tmp_path / "other")
    other.release(5)
    rig.server.root = other.path
    rig.box.trust_root = other.anchor
    rig.box.write_config()
    rig.requests()
    assert rig.check().version == 5
    assert rig.requests() == [(f"/{CHANNEL}", None, 200)]
    assert {v: p.read_bytes() for v, p in rig.store.stored_roots().items()} == \
        {1: other.anchor_bytes}


def test_a_re_pin_cut_short_never_lets_a_304_bring_back_the_old_chains_release(
        rig: Rig, tmp_path: Path) -> None:
    """The box is re-pinned to another operator's anchor while its server still serves the
    old repository, and the first run under the new anchor stops at a network error. The
    validators must be gone on disk too: otherwise the next run's conditional request gets
    a 304 and the release verified under the old chain (same root version, other keys) is
    taken as trusted without ever meeting the new anchor's keys."""
    rig.check()
    other = RepoSim(tmp_path / "other")
    other.release(5)
    rig.box.trust_root = other.anchor
    rig.box.write_config()
    rig.server.set_fault(f"/{CHANNEL}", Fault(status=500))
    with pytest.raises(DownloadHTTPError):
        rig.check()
    rig.server.clear_faults()
    rig.requests()
    with pytest.raises(UnsignedMetadataError):
        rig.check()
    assert rig.requests() == [(f"/{CHANNEL}", None, 200)]


# --- the root walk --------------------------------------------------------------------------


def test_the_walk_stores_new_roots_and_later_runs_start_from_them(rig: Rig) -> None:
    rig.check()
    rig.sim.rotate("release")
    rig.sim.rotate("release")
    rig.requests()
    assert rig.check().version == 1
    assert [r[0] for r in rig.requests()] == [f"/{CHANNEL}", "/root/2.root.json",
                                             "/root/3.root.json"]
    assert sorted(rig.store.stored_roots()) == [1, 2, 3]
    state = rig.store.load()
    assert state.channel(CHANNEL).floor_keys == md.release_keys_id(rig.sim.root)
    rig.store.release_path.unlink()  # a fresh fetch: the walk starts at the stored root 3
    assert rig.check().version == 1
    assert [r[0] for r in rig.requests()] == [f"/{CHANNEL}"]


def test_a_root_the_server_lacks_is_refused_and_a_broken_server_is_a_network_error(
        rig: Rig) -> None:
    rig.check()
    before = rig.state_files()
    rig.sim.rotate("release")
    rig.sim.rotate("release")
    rig.server.set_fault("/root/2.root.json", Fault(status=500))
    with pytest.raises(DownloadHTTPError):
        rig.check()
    rig.sim.remove("root/2.root.json")
    rig.server.clear_faults()
    with pytest.raises(BadVersionError) as info:
        rig.check()
    assert "release names root v3, but the server has no root/2.root.json" in str(info.value)
    assert rig.state_files() == before


def test_a_new_release_key_resets_the_floors_to_the_installed_version(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.sim.release(2)
    rig.check()
    rig.installed(1)
    assert rig.store.load().channel(CHANNEL).floor_version == 2
    rig.sim.rotate("release", resign=False)
    rig.sim.publish(1, root_version=2)  # fast-forward recovery: back to 1 under new keys
    with caplog.at_level(logging.WARNING):
        assert rig.check().result == "up-to-date"
    assert "changed the release keys" in caplog.text
    ch = rig.store.load().channel(CHANNEL)
    assert (ch.floor_version, ch.floor_keys) == (1, md.release_keys_id(rig.sim.root))


def test_the_channels_floors_refuse_an_older_release_and_an_earlier_reissue(rig: Rig) -> None:
    rig.sim.release(2)
    rig.check()
    issued = rig.sim.now
    rig.sim.publish(1)  # validly signed, older than the floor
    with pytest.raises(RollbackError):
        rig.check()
    rig.sim.publish(2, issued=issued - timedelta(days=1))  # same version, issued earlier
    with pytest.raises(RollbackError):
        rig.check()
    assert rig.store.load().channel(CHANNEL).floor_version == 2


@pytest.mark.parametrize(("installed", "refused"), [(1, None), (2, RollbackError)])
def test_floors_set_under_old_release_keys_fall_back_when_the_new_root_is_already_stored(
        rig: Rig, installed: int, refused: type[Exception] | None) -> None:
    """A power cut stored root 2 (new release keys) but not the floors: the next run starts
    at root 2 without walking, and must still see that both floors were set under the old
    keys: the release floor falls back to the installed version, the time floor (here
    pushed far ahead by a compromised old key) to the clock."""
    rig.sim.release(2)
    rig.check()
    rig.installed(installed)
    state = rig.store.load()
    rig.store.save(state._replace(time_floor=md.format_time(rig.sim.now + timedelta(days=400))))
    root2 = rig.sim.rotate("release", resign=False)
    rig.store.save_root(2, root2)
    rig.sim.publish(1, root_version=2)
    if refused is None:
        assert rig.check() == Outcome("up-to-date", "up to date (release 1)", 1)
        ch = rig.store.load().channel(CHANNEL)
        assert (ch.floor_version, ch.floor_keys) == (1, md.release_keys_id(rig.sim.root))
    else:
        with pytest.raises(refused):
            rig.check()
    assert [r.path for r in rig.server.log if r.path.startswith("/root/")] == []


def test_a_clock_behind_the_time_floor_uses_the_floor(rig: Rig,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    rig.check()
    past = rig.sim.now - timedelta(days=400)
    with caplog.at_level(logging.WARNING):
        assert rig.check(clock=lambda: past).version == 1
    assert "is behind the newest release seen" in caplog.text


# --- the decision ---------------------------------------------------------------------------


def test_installed_release_is_up_to_date_and_only_for_its_own_channel(rig: Rig) -> None:
    rig.installed(1)
    assert rig.check() == Outcome("up-to-date", "up to date (release 1)", 1)
    rig.installed(0)
    rig.installed(7, channel="version-beta.json")
    assert rig.check().result == "update-available"


def test_a_failed_release_is_skipped_unless_forced(rig: Rig) -> None:
    rig.installed(0, failed_versions=(1,))
    assert rig.check() == Outcome(
        "skipped-failed", "release 1 failed before; skipped (use 'run --force' to retry it)", 1)
    assert rig.check(force=True).result == "update-available"


def test_the_rollout_bucket_is_this_boxs_for_this_release(rig: Rig) -> None:
    """DESIGN 2.3: sha256("test-box:3") % 100 is 7, so release 3 reaches this box at 8 %
    and not at 7 % (other ids or versions would give other buckets: 88, 18)."""
    rig.sim.publish(3, rollout=7)
    assert rig.check() == Outcome(
        "outside-rollout", "release 3 is rolled out to 7% of boxes; not this one yet", 3)
    rig.sim.publish(3, rollout=8, issued=rig.sim.now + timedelta(seconds=1))
    assert rig.check().result == "update-available"


def test_max_package_bytes_is_the_largest_package_taken(rig: Rig) -> None:
    length = md.parse_release(md.parse_envelope(rig.sim.read(CHANNEL))).package.length
    rig.box.write_config(max_package_bytes=length)
    assert rig.check().result == "update-available"
    rig.box.write_config(max_package_bytes=length - 1)
    with pytest.raises(LengthOrHashMismatchError, match="max_package_bytes"):
        rig.check()
    assert State().channel(CHANNEL).failed_versions == ()
    assert rig.store.load().channel(CHANNEL).failed_versions == ()  # the box's own limit
    assert json.loads(rig.box.config_path.read_text())["max_package_bytes"] == length - 1
