"""Publishing steps on one repository never interleave (issue 12, item 5): two releases at
once, or a release and the weekly refresh, moved version.json from v3 back to v2. Each step
holds an exclusive flock on the repository and re-checks the current release just before
writing."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from debs import make_deb

from opq_box_updater.publish import build, common, history, repo, rotate, stage
from opq_box_updater.publish.common import PublishError

NOW = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    repo.init_repo(tmp_path / "repo", tmp_path / "keys", now=NOW)
    deb = make_deb(tmp_path / "debs", "opq-hello", "1.0")
    for version in (1, 2, 3):
        build.build_package(tmp_path / f"v{version}.zip", version=version, debs=[deb])
    repo.publish_release(tmp_path / "repo", tmp_path / "keys", tmp_path / "v1.zip", now=NOW)
    return tmp_path


def current(work: Path) -> int:
    release = repo.read_release(work / "repo", "version.json")
    assert release is not None
    return release.version


def pause_in(monkeypatch: pytest.MonkeyPatch, name: str, meanwhile: Any) -> dict[str, Any]:
    """The first call of ``repo.<name>`` starts ``meanwhile`` on a thread and waits (bounded)
    for it: the window, after the current release was read, where another step slipped in."""
    real = getattr(repo, name)
    seen: dict[str, Any] = {"thread": None, "error": None}

    def slow(*args: Any, **kwargs: Any) -> Any:
        if seen["thread"] is None:
            def other() -> None:
                try:
                    meanwhile()
                except Exception as exc:  # reported to the test
                    seen["error"] = exc
            thread = threading.Thread(target=other)
            seen["thread"] = thread
            thread.start()
            thread.join(timeout=3)  # with the lock it cannot finish: go on
        return real(*args, **kwargs)

    monkeypatch.setattr(repo, name, slow)
    return seen


def test_two_concurrent_releases_never_go_back(work: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def release_v3() -> None:
        repo.publish_release(work / "repo", work / "keys", work / "v3.zip", now=NOW)

    seen = pause_in(monkeypatch, "store_package", release_v3)
    repo.publish_release(work / "repo", work / "keys", work / "v2.zip", now=NOW)
    seen["thread"].join(timeout=60)
    assert not seen["thread"].is_alive()
    assert seen["error"] is None, seen["error"]
    assert current(work) == 3, "v3 must never go back to v2"


def test_a_release_during_a_refresh_is_never_undone(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weekly refresh read v1; a release of v2 meanwhile must survive its write."""
    seen = pause_in(monkeypatch, "_sign_release", lambda: repo.publish_release(
        work / "repo", work / "keys", work / "v2.zip", now=NOW))
    repo.refresh_release(work / "repo", work / "keys", now=NOW)
    seen["thread"].join(timeout=60)
    assert not seen["thread"].is_alive()
    assert seen["error"] is None, seen["error"]
    assert current(work) == 2, "the refresh re-signed v1 over v2"


def test_a_release_during_a_recall_is_never_undone(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``recall`` (issue 10) holds the same lock: a recall started while a release of v3
    is between reading v2 and writing waits, then recalls v3 as v4 (with v2's content); it
    never publishes its own v3 over the release's, nor recalls a release it did not see."""
    repo.publish_release(work / "repo", work / "keys", work / "v2.zip", now=NOW)
    seen = pause_in(monkeypatch, "store_package", lambda: stage.recall(
        work / "repo", work / "keys", [], now=NOW))
    repo.publish_release(work / "repo", work / "keys", work / "v3.zip", now=NOW)
    seen["thread"].join(timeout=60)
    assert not seen["thread"].is_alive()
    assert seen["error"] is None, seen["error"]
    assert current(work) == 4, "the recall must come after the release it recalls"
    actions = [(e.action, e.version) for e in history.entries(work / "repo")]
    assert actions[-2:] == [("release", 3), ("recall", 4)]


def test_a_writer_without_the_lock_is_noticed_before_writing(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy by hand (or an older publisher) between the check and the write: refused."""
    before_v3 = (work / "repo/version.json").read_bytes()
    repo.publish_release(work / "repo", work / "keys", work / "v3.zip", now=NOW)
    v3 = (work / "repo/version.json").read_bytes()
    (work / "repo/version.json").write_bytes(before_v3)
    real = repo._sign_release

    def sign_then_someone_writes(*args: Any) -> bytes:
        data = real(*args)
        if args[2]["package"]["sha256"] != "0" * 64:  # the real signing, not the size probe
            (work / "repo/version.json").write_bytes(v3)
        return data

    monkeypatch.setattr(repo, "_sign_release", sign_then_someone_writes)
    with pytest.raises(PublishError, match=r"changed while this step ran \(it now holds v3\)"):
        repo.publish_release(work / "repo", work / "keys", work / "v2.zip", now=NOW)
    assert (work / "repo/version.json").read_bytes() == v3


def test_another_process_holding_the_lock_stops_a_release_after_the_wait(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(work / "repo")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        monkeypatch.setattr(common, "LOCK_WAIT", 0.3)
        before = sorted(os.listdir(work / "repo/packages"))
        version_json = (work / "repo/version.json").read_bytes()
        for step in (lambda: repo.publish_release(work / "repo", work / "keys",
                                                  work / "v2.zip", now=NOW),
                     lambda: repo.refresh_release(work / "repo", work / "keys", now=NOW),
                     lambda: rotate.rotate_role(work / "repo", work / "keys", "release",
                                              now=NOW),
                     lambda: stage.recall(work / "repo", work / "keys", [], now=NOW)):
            with pytest.raises(PublishError, match="another opq-box-publish is still working"):
                step()
        assert sorted(os.listdir(work / "repo/packages")) == before
        assert (work / "repo/version.json").read_bytes() == version_json
        assert sorted(os.listdir(work / "repo/root")) == ["1.root.json"]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    fd = os.open(work / "repo", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the steps, too
    finally:
        os.close(fd)


def test_what_is_signed_is_the_copy_that_was_checked(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source zip is swapped (another version, a hostile file) while the publisher checks
    it: the release must name exactly the bytes that were checked, read once."""
    original = (work / "v2.zip").read_bytes()
    real = repo.inspect_package

    def swap_source_then_inspect(path: Path) -> Any:
        (work / "v2.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty, different zip
        return real(path)

    monkeypatch.setattr(repo, "inspect_package", swap_source_then_inspect)
    release = repo.publish_release(work / "repo", work / "keys", work / "v2.zip", now=NOW)
    stored = (work / "repo" / release.package.path).read_bytes()
    assert stored == original
    assert release.package.sha256 == hashlib.sha256(original).hexdigest()


def test_a_refused_package_leaves_nothing_in_the_repository(work: Path) -> None:
    before = sorted(p.name for p in (work / "repo/packages").iterdir())
    version_json = (work / "repo/version.json").read_bytes()
    with pytest.raises(PublishError, match="not newer"):
        repo.publish_release(work / "repo", work / "keys", work / "v1.zip", now=NOW)
    (work / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(PublishError, match="refusing to publish"):
        repo.publish_release(work / "repo", work / "keys", work / "bad.zip", now=NOW)
    with pytest.raises(PublishError, match="no such file"):
        repo.publish_release(work / "repo", work / "keys", work / "gone.zip", now=NOW)
    assert sorted(p.name for p in (work / "repo/packages").iterdir()) == before
    assert (work / "repo/version.json").read_bytes() == version_json


def test_a_staging_copy_left_by_a_cut_publish_is_removed_by_the_next(work: Path) -> None:
    """A power cut between staging and rename leaves packages/.package.*.tmp (a whole package
    each, never served: a dot file). The next publish, holding the lock so that no other step
    is staging, removes such leftovers instead of letting them fill the disk."""
    packages = work / "repo" / "packages"
    leftover = packages / ".package.k3x9_q.tmp"
    leftover.write_bytes(b"PK\x03\x04 half a package")
    kept = packages / ".package.notes"  # not a staging name: never touched
    kept.write_bytes(b"operator's")
    before = {p.name for p in packages.iterdir()} - {leftover.name}
    release = repo.publish_release(work / "repo", work / "keys", work / "v2.zip", now=NOW)
    after = {p.name for p in packages.iterdir()}
    assert after == before | {Path(release.package.path).name}
    assert kept.read_bytes() == b"operator's"
