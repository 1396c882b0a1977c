"""Files in the repository that are not what they seem, as ``recall`` reads them.

Someone who can write the repository but not sign may replace an old release's package with
a link to an endless device: ``recall`` must refuse it, not copy without end. Run through
the CLI in a child process whose file size limit stands in for a full disk.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_digest
from test_rollout import DAY, NOW, box_accepts, keys_of, rolled  # noqa: F401

from opq_box_updater.metadata import parse_envelope, parse_release
from opq_box_updater.publish import cli, repo, rotate, stage
from opq_box_updater.publish.common import PublishError

LIMIT = 64 << 20  # bytes any file of the child may reach: far above a test package
#: The CLI with SIGXFSZ's default action (Python ignores it): a file written past LIMIT
#: kills the child, as a disk filled to the brim would end the run.
CHILD = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
         "from opq_box_updater.publish.cli import main; sys.exit(main(sys.argv[1:]))")


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_recall_refuses_a_package_linked_to_an_endless_device(rolled: Path) -> None:  # noqa: F811
    v1 = stage.signed_releases(rolled, "version.json")[0].release
    package = rolled / v1.package.path
    package.unlink()
    package.symlink_to("/dev/zero")
    before = tree_digest(rolled, exclude=(rolled / ".reports",))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "recall", str(rolled), "--keys", str(keys_of(rolled))],
        capture_output=True, text=True, timeout=120, preexec_fn=_limited, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert "missing or no longer matches" in done.stderr
    assert tree_digest(rolled, exclude=(rolled / ".reports",)) == before


def test_refresh_force_recovers_a_rotation_cut_short(rolled: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """Power cut in ``rotate`` after root v2 was written, before version.json was re-signed:
    it is still signed by the old release keys under root v1, which boxes that walk to v2
    refuse. ``refresh`` will not re-sign what the newest root's keys did not sign, and
    says so; ``--force`` re-signs it when the root it names, in the chain, signed it. An
    unsigned edit stays refused even then."""
    cut = (rolled / "version.json").read_bytes()
    rotate.rotate_role(rolled, keys_of(rolled), "release", now=NOW - DAY / 2)
    (rolled / "version.json").write_bytes(cut)
    before = tree_digest(rolled)
    done = cli.main(["refresh", str(rolled), "--keys", str(keys_of(rolled))])
    assert done == 2 and tree_digest(rolled) == before
    assert cli.main(["refresh", str(rolled), "--keys", str(keys_of(rolled)), "--force"]) == 0
    seen = parse_release(parse_envelope(cut))
    assert box_accepts(rolled, seen).root_version == 2
    doc = json.loads(cut)
    doc["signed"]["notes"] = "edited"
    (rolled / "version.json").write_text(json.dumps(doc))
    before = tree_digest(rolled)
    with pytest.raises(PublishError, match="does not verify"):
        repo.refresh_release(rolled, keys_of(rolled), force=True)
    assert tree_digest(rolled) == before


def test_history_entries_that_do_not_fit_their_line_are_ignored(rolled: Path) -> None:  # noqa: F811
    """A genuine signed release copied into a history line that claims another version or
    channel, or names a root the chain does not have, is no release of that channel."""
    known = stage.signed_releases(rolled, "version.json")
    lines = (rolled / ".history.jsonl").read_text().splitlines()
    genuine = json.loads(lines[0])
    forged = []
    for field, value in (("version", 7), ("channel", "version-beta.json")):
        forged.append({**genuine, field: value})
    renamed = json.loads(json.dumps(genuine))
    renamed["envelope"]["signed"]["root_version"] = 9  # signature broken too: still ignored
    forged.append(renamed)
    with (rolled / ".history.jsonl").open("a") as out:
        for entry in forged:
            out.write(json.dumps(entry) + "\n")
    assert stage.signed_releases(rolled, "version.json") == known
    assert stage.signed_releases(rolled, "version-beta.json") == []


def test_status_shows_the_other_channels_when_one_file_is_broken(
        rolled: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    (rolled / "version-beta.json").write_bytes(b"")  # a copy cut short, an editor's accident
    rows = stage.status(rolled, [], NOW)
    assert {row.release.channel for row in rows} == {"version.json"}
    assert "version-beta.json is not shown: not valid JSON" in caplog.text


def test_recall_refuses_a_package_that_is_no_regular_file(rolled: Path) -> None:  # noqa: F811
    v1 = stage.signed_releases(rolled, "version.json")[0].release
    package = rolled / v1.package.path
    package.unlink()
    package.mkdir()
    before = tree_digest(rolled, exclude=(rolled / ".reports",))
    assert cli.main(["recall", str(rolled), "--keys", str(keys_of(rolled))]) == 2
    assert tree_digest(rolled, exclude=(rolled / ".reports",)) == before


def test_an_unsigned_edit_of_another_channel_gives_recall_no_number(
        rolled: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """A beta file someone wrote by hand claims v50: the recall's number ignores it."""
    doc = json.loads((rolled / "version.json").read_text())
    doc["signed"].update(version=50, channel="version-beta.json")
    (rolled / "version-beta.json").write_text(json.dumps(doc))
    assert cli.main(["recall", str(rolled), "--keys", str(keys_of(rolled))]) == 0
    recalled = parse_release(parse_envelope((rolled / "version.json").read_bytes()))
    assert recalled.version == 3
    assert "version-beta.json does not verify" in capsys.readouterr().err
