"""Signed reports (issue 10, item 2): the box's report key and counter (reporting.py), and
what the collector's intake (publish/reports.py) refuses — forged, replayed, stale, from
another key — asserting the HTTP status and what the store holds afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Box
from faultserver import Fault, FaultServer
from reposim import RepoSim

from opq_box_updater import reporting
from opq_box_updater.metadata import keyid_of
from opq_box_updater.publish import reports
from opq_box_updater.publish.reports import RateLimiter, receive
from opq_box_updater.publish.store import (
    ACCEPTED,
    CONFLICT,
    SqlStore,
    open_store,
)

NOW = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
BoxFactory = Callable[..., Box]


# --- the box's key and counter ---------------------------------------------------------------


def test_the_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = reporting.load_or_make_key(state)
    path = state / reporting.KEY_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = reporting.load_or_make_key(state)
    assert reporting.public_hex(again) == reporting.public_hex(key)
    assert sorted(p.name for p in state.iterdir()) == [reporting.KEY_NAME]  # no temp left


def test_a_key_another_process_made_first_is_kept(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two makers at once (postinst and a run): the first link wins, both use its key."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    first = reporting.load_or_make_key(state)
    real_lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda p: False if Path(p).name ==
                        reporting.KEY_NAME else real_lexists(p))
    second = reporting.load_or_make_key(state)  # makes a key, but the link finds the file
    assert reporting.public_hex(second) == reporting.public_hex(first)


@pytest.mark.parametrize(("key_mode", "dir_mode"), [(0o640, 0o700), (0o600, 0o777)],
                         ids=["key-readable-by-group", "state-dir-writable-by-all"])
def test_an_exposed_key_or_foreign_state_dir_is_not_used(tmp_path: Path, key_mode: int,
                                                         dir_mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if key_mode != 0o600:
        reporting.load_or_make_key(state)
        (state / reporting.KEY_NAME).chmod(key_mode)
    state.chmod(dir_mode)
    with pytest.raises(reporting.ReportKeyError):
        reporting.load_or_make_key(state)
    if key_mode == 0o600:
        assert not (state / reporting.KEY_NAME).exists()


def test_the_counter_grows_and_is_persisted(tmp_path: Path) -> None:
    assert [reporting.next_counter(tmp_path) for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / reporting.COUNTER_NAME).read_text() == "3\n"
    assert (tmp_path / reporting.COUNTER_NAME).stat().st_mode & 0o777 == 0o600
    (tmp_path / reporting.COUNTER_NAME).write_text("x7\n")
    with pytest.raises(reporting.ReportKeyError):
        reporting.next_counter(tmp_path)
    assert (tmp_path / reporting.COUNTER_NAME).read_text() == "x7\n"


def test_postinst_makes_the_key_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    argv = [sys.executable, "-I", "-m", "opq_box_updater.reporting", "--make-key", str(state)]
    first = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    second = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    key = reporting.load_or_make_key(state)
    assert first == second == keyid_of(bytes.fromhex(reporting.public_hex(key)))


def test_the_counter_is_spent_even_when_the_report_is_lost(tmp_path: Path,
                                                            box_factory: BoxFactory) -> None:
    """Persisted before sending: a report lost on the way never lets its number be used
    again (the collector might have stored it after all)."""
    sim = RepoSim(tmp_path / "repo")
    sim.release(1)
    with FaultServer(sim.path) as server:
        server.set_fault("/report", Fault(status=500))
        box = box_factory(server.url, sim.anchor, report_url=f"{server.url}/report",
                          timeouts={"connect": 2, "read": 2, "total": 10})
        assert box.run("run").returncode == 0
        server.set_fault("/report", None)
        assert box.run("run").returncode == 0
        envelopes = [json.loads(body) for _, body in server.posted]
    assert [e["signed"]["counter"] for e in envelopes] == [1, 2]
    assert (box.state_dir / reporting.COUNTER_NAME).read_text() == "2\n"
    key = reporting.load_or_make_key(box.state_dir)
    signed = envelopes[1]["signed"]
    assert signed["public_key"] == reporting.public_hex(key)
    assert envelopes[1]["signatures"][0]["keyid"] == keyid_of(bytes.fromhex(
        signed["public_key"]))
    assert signed["box_id"] == signed["report"]["box_id"] == "test-box"


def test_a_failed_run_with_long_localized_output_still_reports(
        tmp_path: Path, box_factory: BoxFactory) -> None:
    """The run script's last output line goes into the message and the error (up to 4000
    characters each); sent as ASCII-escaped JSON, 1000 x "Échec" made a 16.9 KB report,
    which the collector refused (413): the failure never reached the rollout health. The
    box now cuts long text in the middle, keeping both ends."""
    sim = RepoSim(tmp_path / "repo")
    run = "#!/bin/sh\nfor i in $(seq 1000); do printf 'Échec'; done\necho ' fin'\nexit 1\n"
    sim.publish(1, package=RepoSim.make_package(1, run=run.encode()))
    with FaultServer(sim.path) as server:
        box = box_factory(server.url, sim.anchor, report_url=f"{server.url}/report")
        assert box.run("run").returncode == 5
        [(_, body)] = server.posted
    assert len(body) <= reports.REPORT_MAX_BYTES
    store = open_store(f"sqlite:///{tmp_path}/reports.db")
    assert receive(store, body, "192.0.2.1", datetime.now(UTC), RateLimiter()).status == 204
    [record] = store.latest()
    error = record.report["error"]
    assert error.startswith("release 1 failed and was rolled back") and error.endswith(" fin)")
    assert "characters cut" in error and record.report["last_result"] == "apply-failed"
    store.close()


@pytest.mark.parametrize("text", ["\U0001f600" * 3000, "bad \udc80 bytes " * 500, "x" * 9000])
def test_report_text_is_bounded_and_signable(tmp_path: Path, text: str) -> None:
    """Emoji cost 12 bytes as escaped JSON; a lone surrogate (a non-UTF-8 file name) has no
    canonical bytes, so the signing failed and the report was lost."""
    tmp_path.chmod(0o700)
    env = reporting.signed_report(tmp_path, {"error": text, "n": 1}, "box-1", NOW)
    body = json.dumps(env).encode()
    assert len(body) < 2 * reporting.MAX_TEXT_BYTES
    assert reports.verify_signed(body, NOW, "-").report["n"] == 1


def test_a_box_without_report_url_makes_no_key_and_spends_no_counter(
        tmp_path: Path, box_factory: BoxFactory) -> None:
    sim = RepoSim(tmp_path / "repo")
    sim.release(1)
    with FaultServer(sim.path) as server:
        box = box_factory(server.url, sim.anchor)
        assert box.run("run").returncode == 0
        assert server.posted == []
    assert not (box.state_dir / reporting.KEY_NAME).exists()
    assert not (box.state_dir / reporting.COUNTER_NAME).exists()


# --- what the collector refuses ----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = open_store(f"sqlite:///{tmp_path}/reports.db")
    assert isinstance(opened, SqlStore)
    yield opened
    opened.close()


class Signer:
    """A box's key and counter, signing reports as reporting.py does."""

    def __init__(self, box_id: str = "box-1") -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.box_id = box_id
        self.key = Ed25519PrivateKey.generate()
        self.counter = 0

    def body(self, *, counter: int | None = None, at: datetime = NOW,
             **report: Any) -> bytes:
        if counter is None:
            self.counter += 1
        envelope = reporting.sign_report({"box_id": self.box_id, "last_result": "updated",
                                          **report}, self.box_id, self.key,
                                         counter or self.counter, at)
        return json.dumps(envelope).encode()


def send(store: SqlStore, body: bytes, *, limiter: RateLimiter | None = None,
         allow_unsigned: bool = False) -> int:
    return receive(store, body, "192.0.2.7", NOW, limiter or RateLimiter(),
                   allow_unsigned=allow_unsigned).status


def test_a_signed_report_is_accepted_and_its_key_learned(store: SqlStore) -> None:
    box = Signer()
    assert send(store, box.body(installed_version=3)) == 204
    [record] = store.latest()
    assert (record.status, record.counter, record.remote) == (ACCEPTED, 1, "192.0.2.7")
    assert record.report["installed_version"] == 3 and record.timestamp == NOW
    assert record.key_id == keyid_of(bytes.fromhex(reporting.public_hex(box.key)))


def _tamper(body: bytes) -> bytes:
    doc = json.loads(body)
    doc["signed"]["report"]["last_result"] = "apply-failed"
    return json.dumps(doc).encode()


def _resign_other_key(body: bytes) -> bytes:
    """Signed by a stranger, but naming the box's public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    doc = json.loads(body)
    stranger = Ed25519PrivateKey.generate()
    from opq_box_updater.metadata import canonical_bytes

    doc["signatures"][0]["sig"] = stranger.sign(canonical_bytes(doc["signed"])).hex()
    return json.dumps(doc).encode()


def _edit_signed(**fields: Any) -> Callable[[bytes], bytes]:
    def edit(body: bytes) -> bytes:
        doc = json.loads(body)
        doc["signed"].update(fields)
        return json.dumps(doc).encode()
    return edit


@pytest.mark.parametrize(("forge", "status"), [
    (_tamper, 403),
    (_resign_other_key, 403),
    (lambda b: json.dumps({**json.loads(b), "signatures": []}).encode(), 403),
    (_edit_signed(box_id="box-2"), 400),  # the report is about another box
    (_edit_signed(counter=True), 400),
    (_edit_signed(counter=0), 400),
    (_edit_signed(type="release"), 400),
    (_edit_signed(public_key="AB" * 32), 400),
    (lambda b: b.replace(b'"counter": 1', b'"counter": 1.0'), 400),  # floats: not canonical
    (lambda b: b[:-1] + b', "signed": {}}', 400),  # duplicate key
    (lambda b: json.dumps(json.loads(b)["signed"]["report"]).encode(), 401),  # unsigned
    (lambda b: b + b" " * reports.REPORT_MAX_BYTES, 413),
], ids=["tampered", "other-key-sig", "no-signature", "other-box", "bool-counter",
        "zero-counter", "wrong-type", "uppercase-key", "float", "duplicate-key", "unsigned",
        "oversized"])
def test_forged_or_malformed_reports_are_refused_and_not_stored(
        store: SqlStore, forge: Callable[[bytes], bytes], status: int) -> None:
    box = Signer()
    assert send(store, forge(box.body())) == status
    assert store.report_count() == 0 and store.boxes() == []


def test_a_replayed_report_is_refused(store: SqlStore) -> None:
    box = Signer()
    first, second = box.body(), box.body()
    assert send(store, second) == 204
    assert send(store, second) == 409  # the same report again
    assert send(store, first) == 409  # an older one delivered late
    assert store.report_count() == 1
    assert send(store, box.body()) == 204


@pytest.mark.parametrize(("shift", "status"), [
    (timedelta(days=29), 204), (-timedelta(days=29), 204),
    (timedelta(days=31), 403), (-timedelta(days=31), 403),
    (-timedelta(days=365 * 60), 403),  # a box that came up in 1971
])
def test_timestamps_are_checked_tolerantly(store: SqlStore, shift: timedelta,
                                           status: int) -> None:
    assert send(store, Signer().body(at=NOW + shift)) == status
    assert store.report_count() == (1 if status == 204 else 0)


def test_another_key_for_a_known_box_is_a_conflict_never_merged(store: SqlStore) -> None:
    box, impostor = Signer(), Signer()
    assert send(store, box.body(installed_version=3)) == 204
    assert send(store, impostor.body(counter=1000, installed_version=99)) == 409
    [latest] = store.latest()
    assert latest.report["installed_version"] == 3
    [conflict] = store.conflicts()
    assert (conflict.status, conflict.report["installed_version"]) == (CONFLICT, 99)
    assert send(store, box.body(installed_version=4)) == 204  # the box itself goes on


def test_rejected_boxes_and_the_rate_limit(store: SqlStore) -> None:
    box = Signer()
    limiter = RateLimiter(burst=2, seconds=3600)
    assert [send(store, box.body(), limiter=limiter) for _ in range(3)] == [204, 204, 429]
    assert store.report_count() == 2
    store.reject(box.box_id)
    assert send(store, box.body()) == 403
    assert store.report_count() == 2


def test_the_rate_limit_refills_and_forgets_the_oldest() -> None:
    limiter = RateLimiter(burst=1, seconds=10, max_keys=2)
    assert [limiter.allow("a", 0.0), limiter.allow("a", 5.0), limiter.allow("a", 10.0)] == \
        [True, False, True]
    assert limiter.allow("b", 10.0) and limiter.allow("c", 10.0)
    assert len(limiter._buckets) == 2 and "a" not in limiter._buckets
