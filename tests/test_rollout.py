"""Rollout health (issue 10, item 3): the numbers, widen's gate, halt and recall.

The health numbers are pure functions over report records; the steps run against a real
repository and every document they write is checked with the box's own verifier. A refused
step must leave the repository (version files and history) byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import tree_digest

from opq_box_updater.errors import RepositoryError
from opq_box_updater.metadata import Floors, parse_envelope, parse_release, verify_release
from opq_box_updater.publish import build, cli, history, repo, rollout, rotate, stage
from opq_box_updater.publish.common import PublishError
from opq_box_updater.publish.keys import KeyStore
from opq_box_updater.publish.store import ReportRecord, default_store_url, open_store

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def Rec(box_id: str, received: datetime, report: dict[str, Any],
        status: str = "accepted") -> ReportRecord:
    """A stored report as the collector's store returns it."""
    return ReportRecord(box_id, received, "127.0.0.1", report, status, None)


def bucket(box_id: str, version: int) -> int:
    """DESIGN 2.3's bucket, written out here rather than imported from the product."""
    return int(hashlib.sha256(f"{box_id}:{version}".encode()).hexdigest(), 16) % 100


def boxes_where(pred: Any, count: int, version: int, prefix: str = "box") -> list[str]:
    """``count`` box ids whose bucket for ``version`` satisfies ``pred``."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        name = f"{prefix}-{n:04d}"
        if pred(bucket(name, version)):
            found.append(name)
        n += 1
    return found


def report(box_id: str, result: str, installed: int, *, failed: tuple[int, ...] = (),
           channel: str = "version.json", **extra: Any) -> dict[str, Any]:
    return {"box_id": box_id, "last_result": result, "installed_version": installed,
            "failed_versions": list(failed), "channel": channel, "release_version": None,
            "last_run": "2031-03-01T00:00:00Z", "error": None, **extra}


# --- the numbers ---------------------------------------------------------------------------


def test_health_counts_each_kind_of_box() -> None:
    v, since = 7, NOW - DAY
    inside = boxes_where(lambda b: b < 10, 6, v)
    outside = boxes_where(lambda b: b >= 10, 2, v)
    records = [
        Rec(inside[0], NOW, report(inside[0], "updated", 7)),
        Rec(inside[1], NOW, report(inside[1], "apply-failed", 6, failed=(7,))),
        Rec(inside[2], NOW, report(inside[2], "refused", 6)),  # after the release: failed
        Rec(inside[3], since - DAY, report(inside[3], "refused", 6)),  # before: not seen
        Rec(inside[4], NOW, report(inside[4], "postponed", 6)),  # waiting
        Rec(inside[5], NOW - 3 * DAY, report(inside[5], "up-to-date", 6)),  # stale
        Rec(outside[0], NOW, report(outside[0], "outside-rollout", 6)),
        Rec(outside[1], NOW, report(outside[1], "updated", 7, channel="version-beta.json")),
        Rec("conflicted", NOW, report("conflicted", "updated", 7), status="conflict"),
    ]
    boxes = rollout.latest_views(records)
    h = rollout.health(rollout.ReleaseRef("version.json", v, 10, since), boxes, NOW)
    assert (h.boxes, h.in_bucket, h.updated, h.failed, h.waiting, h.not_seen, h.stale) == (
        7, 6, 1, 2, 1, 2, 1)
    assert h.tried == 3 and h.failure_rate == pytest.approx(200 / 3)
    beta = rollout.health(rollout.ReleaseRef("version-beta.json", v, 10, since), boxes, NOW)
    assert (beta.boxes, beta.updated, beta.in_bucket) == (1, 1, 0)


def test_newest_report_wins_and_conflicts_never_count() -> None:
    records = [Rec("a", NOW - DAY, report("a", "apply-failed", 1, failed=(2,))),
               Rec("a", NOW, report("a", "updated", 3)),
               Rec("a", NOW + DAY, report("a", "refused", 0, failed=(3,)), status="conflict")]
    [view] = rollout.latest_views(records)
    assert (view.installed, view.result, view.failed_versions) == (3, "updated", frozenset())


@pytest.mark.parametrize("value", ["7", True, 7.0, [7], None, -1, 2**64, {"v": 7}])
def test_hostile_report_fields_count_as_absent(value: Any) -> None:
    rec = Rec("x", NOW, {"box_id": "x", "installed_version": value, "last_result": 5,
                         "channel": ["version.json"], "failed_versions": [value, "2", 3],
                         "error": ["no"]})
    view = rollout.box_view(rec)
    assert view.installed is None and view.result is None and view.error is None
    assert view.channel == rollout.DEFAULT_CHANNEL and view.failed_versions == {3}
    assert not rollout.is_updated(view, 1)


def test_a_report_that_is_not_an_object_is_an_unknown_box() -> None:
    view = rollout.box_view(Rec("x", NOW, "text"))  # type: ignore[arg-type]
    assert (view.installed, view.result, view.channel) == (None, None, "version.json")


def test_installed_release_of_another_channel_is_not_this_channels() -> None:
    rec = Rec("x", NOW, report("x", "up-to-date", 9, installed_channel="version-beta.json"))
    assert rollout.box_view(rec).installed == 0


def test_widen_gate_is_strictly_above_the_threshold() -> None:
    ref = rollout.ReleaseRef("version.json", 2, 10, NOW)
    at = rollout.Health(ref, 100, 20, updated=19, failed=1, waiting=0, not_seen=0, stale=0)
    assert at.failure_rate == 5.0 and rollout.widen_refusal(at, 5.0) is None
    above = rollout.Health(ref, 100, 20, updated=18, failed=1, waiting=0, not_seen=0, stale=0)
    assert "1 of 19 boxes" in str(rollout.widen_refusal(above, 5.0))
    nobody = rollout.Health(ref, 100, 20, updated=0, failed=0, waiting=0, not_seen=20, stale=0)
    assert nobody.failure_rate == 0.0 and rollout.widen_refusal(nobody, 0.0) is None


def test_format_health_is_a_table() -> None:
    ref = rollout.ReleaseRef("version.json", 2, 10, NOW)
    text = rollout.format_health([rollout.Health(ref, 5, 1, 1, 0, 0, 0, 0)])
    header, row = text.splitlines()
    assert header.split()[:3] == ["CHANNEL", "RELEASE", "ROLLOUT"]
    assert row.split() == ["version.json", "v2", "10%", "5", "1", "1", "0", "0", "0", "0",
                           "0.0%"]


# --- the steps on a real repository --------------------------------------------------------


def run_script(version: int) -> bytes:
    return f"#!/bin/sh\necho content-{version}\n".encode()


@pytest.fixture
def rolled(tmp_path: Path) -> Path:
    """A repository with v1 (good, 100 %) and v2 (bad, 10 %) in version.json."""
    repo_dir, keydir = tmp_path / "repo", tmp_path / "keys"
    repo.init_repo(repo_dir, keydir, now=NOW - 30 * DAY)
    for version, rollout_pct, when in ((1, 100, NOW - 20 * DAY), (2, 10, NOW - DAY)):
        script = tmp_path / "update.sh"
        script.write_bytes(run_script(version))
        zip_path = tmp_path / f"p{version}.zip"
        build.build_package(zip_path, version=version, run=script)
        repo.publish_release(repo_dir, keydir, zip_path, rollout=rollout_pct, now=when)
    return repo_dir


def keys_of(repo_dir: Path) -> Path:
    return repo_dir.parent / "keys"


def bad_stage(version: int = 2, failures: int = 2, successes: int = 3) -> list[rollout.BoxView]:
    """Boxes of v``version``'s 10 % stage: some failed it, some took it, the rest on v1."""
    ids = boxes_where(lambda b: b < 10, failures + successes, version)
    others = boxes_where(lambda b: b >= 10, 5, version)
    recs = [Rec(b, NOW, report(b, "apply-failed", 1, failed=(version,)))
            for b in ids[:failures]]
    recs += [Rec(b, NOW, report(b, "updated", version)) for b in ids[failures:]]
    recs += [Rec(b, NOW, report(b, "outside-rollout", 1)) for b in others]
    return rollout.latest_views(recs)


def current(repo_dir: Path) -> Any:
    return parse_release(parse_envelope((repo_dir / "version.json").read_bytes()))


def box_accepts(repo_dir: Path, seen: Any) -> Any:
    """What a box that saw ``seen`` makes of the version file now (raises if it refuses)."""
    root = repo.load_chain(repo_dir)[-1]
    return verify_release(root, (repo_dir / "version.json").read_bytes(), NOW,
                          Floors(seen.version, seen.issued))


def test_widen_is_refused_above_the_failure_rate_and_changes_nothing(rolled: Path) -> None:
    before = tree_digest(rolled)
    with pytest.raises(stage.UnhealthyRolloutError, match=r"2 of 5 boxes .*40\.0%"):
        stage.widen(rolled, keys_of(rolled), 50, bad_stage(), now=NOW)
    assert tree_digest(rolled) == before
    # A threshold above the stage's rate lets it through; so does force.
    old = current(rolled)
    release, seen = stage.widen(rolled, keys_of(rolled), 30, bad_stage(),
                                max_failure_rate=45.0, now=NOW)
    assert (release.rollout_percent, release.version, seen.failed) == (30, 2, 2)
    assert box_accepts(rolled, old).rollout_percent == 30
    release, _ = stage.widen(rolled, keys_of(rolled), 50, bad_stage(), force=True, now=NOW)
    assert release.rollout_percent == 50
    actions = [(e.action, e.rollout) for e in history.entries(rolled)]
    assert actions[-2:] == [("widen", 30), ("widen", 50)]


def test_widen_goes_up_only(rolled: Path) -> None:
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="already at 10%"):
        stage.widen(rolled, keys_of(rolled), 10, [], now=NOW)
    assert tree_digest(rolled) == before


def test_halt_sets_zero_with_a_later_issued_boxes_accept(rolled: Path) -> None:
    old = current(rolled)
    halted = stage.halt(rolled, keys_of(rolled), now=NOW)
    assert (halted.version, halted.rollout_percent, halted.package) == (2, 0, old.package)
    assert halted.issued > old.issued
    assert box_accepts(rolled, old).rollout_percent == 0
    assert history.entries(rolled)[-1].action == "halt"
    # A halted release with failures is not widened again without --force.
    with pytest.raises(stage.UnhealthyRolloutError):
        stage.widen(rolled, keys_of(rolled), 10, bad_stage(), now=NOW)


def members(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_recall_publishes_the_last_good_content_as_a_new_version(rolled: Path) -> None:
    stage.halt(rolled, keys_of(rolled), now=NOW)
    seen = current(rolled)
    result = stage.recall(rolled, keys_of(rolled), bad_stage(), now=NOW + timedelta(hours=1))
    new = result.release
    assert (result.recalled.version, result.source.version, new.version) == (2, 1, 3)
    assert new.rollout_percent == 100 and "recall of v2" in new.notes
    box_accepts(rolled, seen)  # a box on v2 takes v3: forward, not a rollback
    got = members(rolled / new.package.path)
    want = members(rolled / result.source.package.path)
    assert json.loads(got.pop("manifest.json"))["version"] == 3
    assert json.loads(want.pop("manifest.json"))["version"] == 1
    assert got == want and got["update.sh"] == run_script(1)
    assert history.entries(rolled)[-1].action == "recall"


def test_recall_skips_releases_boxes_failed_and_honours_to_version(rolled: Path,
                                                                  tmp_path: Path) -> None:
    # v3 is bad too: last good is v1, skipping v2 (failed on boxes) and v3 (current).
    script = tmp_path / "update.sh"
    script.write_bytes(run_script(3))
    build.build_package(tmp_path / "p3.zip", version=3, run=script)
    repo.publish_release(rolled, keys_of(rolled), tmp_path / "p3.zip", rollout=10, now=NOW)
    boxes = bad_stage(2) + bad_stage(3)
    assert stage.recall(rolled, keys_of(rolled), boxes, now=NOW).source.version == 1
    with pytest.raises(PublishError, match="--to-version 9"):
        stage.recall(rolled, keys_of(rolled), boxes, to_version=9, now=NOW)
    chosen = stage.recall(rolled, keys_of(rolled), boxes, to_version=3, now=NOW)
    assert (chosen.source.version, chosen.release.version) == (3, 5)


def test_recall_keeps_every_member_of_the_package(tmp_path: Path) -> None:
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"format": 1, "version": 4, "debs": [],
                                                 "run": "go.sh", "healthcheck": "hc.sh"}))
        zf.writestr("go.sh", "#!/bin/sh\n. ./data/conf\n")
        zf.writestr("hc.sh", "#!/bin/sh\ntrue\n")
        zf.writestr("data/conf", "x=1\n")
    manifest = build.rebuild_package(src, tmp_path / "out.zip", version=9)
    assert (manifest.version, manifest.run, manifest.healthcheck) == (9, "go.sh", "hc.sh")
    got = members(tmp_path / "out.zip")
    assert sorted(got) == ["data/conf", "go.sh", "hc.sh", "manifest.json"]
    assert build.inspect_package(tmp_path / "out.zip") == manifest
    # Deterministic: the same input gives the same bytes (the same packages/<sha>.zip).
    build.rebuild_package(src, tmp_path / "again.zip", version=9)
    assert (tmp_path / "again.zip").read_bytes() == (tmp_path / "out.zip").read_bytes()


def test_recall_trusts_no_history_entry_it_cannot_verify(rolled: Path, tmp_path: Path) -> None:
    """An attacker who can write the history (not the keys) names their own package as v1:
    recall ignores the forged entry and uses the signed one."""
    evil_script = tmp_path / "evil.sh"
    evil_script.write_bytes(b"#!/bin/sh\nrm -rf /\n")
    build.build_package(tmp_path / "evil.zip", version=1, run=evil_script)
    with repo.store_package(rolled, tmp_path / "evil.zip") as (_, evil):
        pass
    lines = history.history_path(rolled).read_text().splitlines()
    forged = json.loads(lines[0])
    forged["envelope"]["signed"]["package"] = evil._asdict()
    forged["time"] = "2031-02-25T00:00:00Z"
    with history.history_path(rolled).open("a") as handle:
        handle.write(json.dumps(forged) + "\n")
    result = stage.recall(rolled, keys_of(rolled), bad_stage(), now=NOW)
    assert members(rolled / result.release.package.path)["update.sh"] == run_script(1)


def test_recall_refuses_a_package_changed_on_disk(rolled: Path) -> None:
    v1 = stage.signed_releases(rolled, "version.json")[0].release
    path = rolled / v1.package.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="no longer matches its signed sha256"):
        stage.recall(rolled, keys_of(rolled), bad_stage(), now=NOW)
    assert tree_digest(rolled) == before


def test_recall_without_a_good_earlier_release_changes_nothing(rolled: Path) -> None:
    boxes = bad_stage(1) + bad_stage(2)  # v1 failed on boxes too
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="no earlier release"):
        stage.recall(rolled, keys_of(rolled), boxes, now=NOW)
    assert tree_digest(rolled) == before


def test_status_shows_current_and_earlier_releases(rolled: Path) -> None:
    rows = stage.status(rolled, bad_stage(), NOW)
    assert [(h.release.version, h.release.rollout) for h in rows] == [(2, 10), (1, 100)]
    assert rows[0].release.since == NOW - DAY  # first published, from the history
    assert (rows[0].failed, rows[0].updated, rows[1].updated) == (2, 3, 10)


def test_history_survives_a_torn_line(rolled: Path) -> None:
    path = history.history_path(rolled)
    with path.open("ab") as handle:
        handle.write(b'{"time": "2031-')  # a power cut mid-append
    stage.halt(rolled, keys_of(rolled), now=NOW)
    assert [e.action for e in history.entries(rolled)] == ["release", "release", "halt"]


# --- the commands --------------------------------------------------------------------------


def seed_store(repo_dir: Path, records: list[ReportRecord]) -> None:
    store = open_store(default_store_url(repo_dir))
    try:
        for rec in records:
            store.add(rec)
    finally:
        store.close()


def stage_records(version: int = 2) -> list[ReportRecord]:
    ids = boxes_where(lambda b: b < 10, 3, version)
    hostile = "evil\x1b[2J\u202eliveDneM"
    return [Rec(ids[0], NOW, report(ids[0], "apply-failed", 1, failed=(version,),
                                    error=f"run script said {hostile}")),
            Rec(hostile, NOW, report(hostile, "refused", 1, failed=(version,))),
            Rec(ids[1], NOW, report(ids[1], "updated", version)),
            Rec(ids[2], NOW, report(ids[2], "updated", version))]


def test_cli_status_names_failed_boxes_in_printable_text(rolled: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    seed_store(rolled, stage_records())
    assert cli.main(["rollout", "status", str(rolled)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "failed on evil\\x1b[2J\\u202eliveDneM (refused" in out
    assert "run script said evil\\x1b[2J\\u202eliveDneM" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("version.json"))
    assert row[:2] == ["version.json", "v2"] and row[5:7] == ["2", "2"]  # updated, failed


def test_cli_widen_refused_exit_4_then_halt_and_recall(rolled: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    seed_store(rolled, stage_records())
    keydir = str(keys_of(rolled))
    before = tree_digest(rolled, exclude=(rolled / ".reports",))
    assert cli.main(["rollout", "widen", str(rolled), "--to", "50", "--keys", keydir]) == 4
    err = capsys.readouterr().err
    assert "2 of 4 boxes that tried it failed (50.0%, above 5%)" in err
    assert tree_digest(rolled, exclude=(rolled / ".reports",)) == before
    assert cli.main(["rollout", "widen", str(rolled), "--to", "50", "--keys", keydir,
                     "--max-failure-rate", "60"]) == cli.EXIT_OK
    assert "widened version.json v2 to 50%" in capsys.readouterr().out
    assert cli.main(["rollout", "halt", str(rolled), "--keys", keydir]) == cli.EXIT_OK
    assert current(rolled).rollout_percent == 0
    assert cli.main(["recall", str(rolled), "--keys", keydir]) == cli.EXIT_OK
    assert "published v3 with the content of v1" in capsys.readouterr().out
    assert (current(rolled).version, current(rolled).rollout_percent) == (3, 100)
    with pytest.raises(SystemExit) as usage:
        cli.main(["rollout", "widen", str(rolled), "--to", "101", "--keys", keydir])
    assert usage.value.code == 2


def test_history_skips_what_it_cannot_read_and_never_fails_a_step(
        rolled: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = history.history_path(rolled)
    good = path.read_bytes()
    entry = json.loads(good.splitlines()[0])
    path.write_bytes(good + b"not json\n" + json.dumps({**entry, "version": "2"}).encode()
                     + b"\n" + b"x" * (history.MAX_LINE + 1) + b"\n")
    assert [e.version for e in history.entries(rolled)] == [1, 2]
    assert "line 3 is unreadable" in caplog.text and "line 5 is torn or too long" in caplog.text
    path.unlink()
    path.mkdir()  # the history cannot be written: the step still succeeds, with a warning
    assert stage.halt(rolled, keys_of(rolled), now=NOW).rollout_percent == 0
    assert "could not add to .history.jsonl" in caplog.text


def test_recall_refuses_a_missing_package_and_a_channel_without_release(rolled: Path) -> None:
    v1 = stage.signed_releases(rolled, "version.json")[0].release
    (rolled / v1.package.path).unlink()
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="missing or no longer matches"):
        stage.recall(rolled, keys_of(rolled), [], now=NOW)
    with pytest.raises(PublishError, match=r"version-beta\.json does not exist"):
        stage.recall(rolled, keys_of(rolled), [], version_file="version-beta.json", now=NOW)
    assert tree_digest(rolled) == before


def test_recall_trusts_no_entry_signed_by_a_release_key_rotated_out(rolled: Path,
                                                                    tmp_path: Path) -> None:
    """The release key was stolen and rotated out; the thief can also write the repository
    directory. A release they sign with the old key under root v1 verifies against root v1,
    but boxes refuse it (mix-and-match): ``recall`` must not re-sign its package with the
    current keys. Entries signed before the rotation are not used either (the same rule as
    the boxes'), so recall refuses and changes nothing."""
    store = KeyStore(keys_of(rolled))
    old_keyid = repo.load_chain(rolled)[-1].role("release").keyids[0]
    stolen = store.private_key(old_keyid)
    rotate.rotate_role(rolled, keys_of(rolled), "release", now=NOW - DAY / 2)
    evil_script = tmp_path / "evil.sh"
    evil_script.write_bytes(b"#!/bin/sh\nrm -rf /\n")
    build.build_package(tmp_path / "evil.zip", version=1, run=evil_script)
    with repo.store_package(rolled, tmp_path / "evil.zip") as (_, evil):
        pass
    signed = repo.release_signed(version=1, root_version=1, channel="version.json",
                                 issued=NOW - DAY / 4, expires=NOW + 30 * DAY, package=evil,
                                 rollout=100, notes="")
    forged = {"time": "2031-02-28T20:00:00Z", "action": "release", "channel": "version.json",
              "version": 1, "rollout": 100, "note": "",
              "envelope": json.loads(repo.envelope_bytes(signed, [stolen]))}
    with history.history_path(rolled).open("a") as handle:
        handle.write(json.dumps(forged) + "\n")
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="no earlier release"):
        stage.recall(rolled, keys_of(rolled), bad_stage(), now=NOW)
    assert tree_digest(rolled) == before
    # The status still shows the history as it was (it signs nothing).
    assert [h.release.version for h in stage.status(rolled, bad_stage(), NOW)] == [2, 1]


def test_recall_signs_the_bytes_it_checked(rolled: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer of the repository swaps the old package right after recall checked its
    sha256 (a race): what recall re-signs is still the content it checked."""
    evil_script = tmp_path / "evil.sh"
    evil_script.write_bytes(b"#!/bin/sh\nrm -rf /\n")
    build.build_package(tmp_path / "evil.zip", version=1, run=evil_script)
    v1 = stage.signed_releases(rolled, "version.json")[0].release
    real = stage.sha256_file

    def check_then_swap(path: Path) -> tuple[str, int]:
        digest = real(path)
        (rolled / v1.package.path).write_bytes((tmp_path / "evil.zip").read_bytes())
        return digest

    monkeypatch.setattr(stage, "sha256_file", check_then_swap)
    result = stage.recall(rolled, keys_of(rolled), bad_stage(), now=NOW)
    assert members(rolled / result.release.package.path)["update.sh"] == run_script(1)


def test_a_second_recall_never_brings_back_the_recalled_release(rolled: Path) -> None:
    """Two recalls at once (two operators, a retried command): the lock runs them one
    after the other, and the second sees the first's v3 as current. No box reported a
    failure (the release was recalled for what it does, not for failing): the second
    must not pick v2, the release the first one recalled."""
    first = stage.recall(rolled, keys_of(rolled), [], now=NOW)
    assert (first.source.version, first.release.version) == (1, 3)
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="no earlier release"):
        stage.recall(rolled, keys_of(rolled), [], now=NOW + timedelta(minutes=1))
    assert tree_digest(rolled) == before
    # Named explicitly, an operator still can.
    again = stage.recall(rolled, keys_of(rolled), [], to_version=2,
                         now=NOW + timedelta(minutes=2))
    assert members(rolled / again.release.package.path)["update.sh"] == run_script(2)


def test_boxes_claiming_a_version_never_published_cannot_carry_a_widen(rolled: Path) -> None:
    """Forty boxes (new ids, their own keys: the collector learns keys on first use) report
    an installed version the channel never published. Counted as updated they dilute the
    stage's failure rate under 5 % and widen goes ahead; they must count as unknown."""
    liars = [Rec(f"liar-{n}", NOW, report(f"liar-{n}", "updated", 2**62)) for n in range(40)]
    boxes = bad_stage() + rollout.latest_views(liars)
    before = tree_digest(rolled)
    with pytest.raises(stage.UnhealthyRolloutError, match=r"2 of 5 boxes"):
        stage.widen(rolled, keys_of(rolled), 50, boxes, now=NOW)
    assert tree_digest(rolled) == before
    [row, earlier] = stage.status(rolled, boxes, NOW)
    assert (row.updated, row.failed, earlier.updated) == (3, 2, 10)


def test_a_recall_on_another_channel_takes_a_version_no_channel_has(rolled: Path,
                                                                    tmp_path: Path) -> None:
    """Version numbers are one sequence for all channels (operations.md): a beta recall
    must not publish v3 when version.json has a v3 of other content, or the recalled zip
    could never be promoted to version.json."""
    for version, channel in ((3, "version-beta.json"), (4, "version-beta.json"),
                             (5, "version.json")):
        script = tmp_path / "update.sh"
        script.write_bytes(run_script(version))
        build.build_package(tmp_path / f"q{version}.zip", version=version, run=script)
        repo.publish_release(rolled, keys_of(rolled), tmp_path / f"q{version}.zip",
                             version_file=channel, now=NOW - DAY / 2)
    result = stage.recall(rolled, keys_of(rolled), [], version_file="version-beta.json",
                          now=NOW)
    assert (result.source.version, result.release.version) == (3, 6)
    assert result.release.channel == "version-beta.json"
    assert current(rolled).version == 5  # version.json untouched


def _forged_current(rolled: Path, tmp_path: Path, **changes: Any) -> None:
    """Someone who can write the repository (not sign) replaces version.json with the
    current release pointing at their own package (or other ``changes``), signatures
    copied from the genuine file."""
    evil_script = tmp_path / "evil.sh"
    evil_script.write_bytes(b"#!/bin/sh\nrm -rf /\n")
    build.build_package(tmp_path / "evil.zip", version=2, run=evil_script)
    with repo.store_package(rolled, tmp_path / "evil.zip") as (_, evil):
        pass
    doc = json.loads((rolled / "version.json").read_bytes())
    doc["signed"].update({"package": evil._asdict(), **changes})
    (rolled / "version.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("step", ["halt", "widen", "refresh", "recall"])
def test_no_step_signs_a_version_file_it_cannot_verify(rolled: Path, tmp_path: Path,
                                                       step: str) -> None:
    """halt, widen and refresh re-sign what version.json holds; recall numbers from it.
    An unsigned edit must be refused, never signed for the boxes."""
    _forged_current(rolled, tmp_path)
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="does not verify"):
        if step == "halt":
            stage.halt(rolled, keys_of(rolled), now=NOW)
        elif step == "widen":
            stage.widen(rolled, keys_of(rolled), 50, [], now=NOW)
        elif step == "refresh":
            repo.refresh_release(rolled, keys_of(rolled), now=NOW)
        else:
            stage.recall(rolled, keys_of(rolled), [], now=NOW)
    assert tree_digest(rolled) == before


def test_a_rotation_does_not_re_sign_a_version_file_it_cannot_verify(
        rolled: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``rotate`` re-signs every version file for the new root: an unsigned edit is left
    as it is (boxes refuse it), never signed with the new keys."""
    _forged_current(rolled, tmp_path)
    forged = (rolled / "version.json").read_bytes()
    rotate.rotate_role(rolled, keys_of(rolled), "release", now=NOW)
    assert (rolled / "version.json").read_bytes() == forged
    assert "version.json does not verify" in caplog.text
    with pytest.raises(RepositoryError):
        box_accepts(rolled, current(rolled))


def test_a_history_that_is_no_regular_file_is_not_read(rolled: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO (or a link to /dev/zero) as .history.jsonl, by someone who can write the
    repository: ``rollout status`` and the collector's fleet page read the history; they
    must not block for ever or read without end."""
    path = history.history_path(rolled)
    path.unlink()
    os.mkfifo(path)
    found: list[list[history.Entry]] = []
    reader = threading.Thread(target=lambda: found.append(history.entries(rolled)),
                              daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # unblock it before failing
        os.close(os.open(path, os.O_WRONLY))
        reader.join()
    assert found == [[]] and "not a regular file" in caplog.text
    path.unlink()
    path.symlink_to("/dev/zero")
    assert history.entries(rolled) == []
