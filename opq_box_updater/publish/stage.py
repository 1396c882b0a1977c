"""Moving a rollout between stages: ``rollout status``, ``widen``, ``halt`` and ``recall``.

Each step holds the repository lock that ``release``/``refresh``/``rotate`` hold, signs with
the release keys through :mod:`.repo` (what it writes, a box accepts), and is recorded in the
release history (:mod:`.history`). The fleet's reports are passed in (read from the
collector's store by the CLI); the numbers come from :mod:`.rollout`.

**Recall** publishes, as a new version above every version the channel has published, the
package content of the *last good* release: the newest earlier release of the channel, with
other content than the current one, that no box lists in its ``failed_versions`` and no
earlier recall recalled (its signed notes, :data:`RECALL_NOTES`, say which), or the one
``to_version`` names. It is found in the history, and used only when its signed
envelope verifies with the release keys of the repository's newest root (a key a rotation
removed signs nothing recall re-publishes) and its package file still has the signed
sha256 and length: the history file is not trusted.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from ..errors import RepositoryError
from ..fsutil import open_regular
from ..metadata import Release, parse_envelope, parse_release, verify_role
from . import history
from .build import rebuild_package
from .common import DEFAULT_RELEASE_EXPIRES, PublishError, normalize_now, repo_lock, sha256_file
from .repo import (
    DEFAULT_VERSION_FILE,
    load_chain,
    publish_release_unlocked,
    read_release,
    refresh_release_unlocked,
    version_files,
)
from .rollout import (
    DEFAULT_MAX_FAILURE_RATE,
    BoxView,
    Health,
    ReleaseRef,
    health,
    widen_refusal,
)

logger = logging.getLogger(__name__)

#: Earlier releases ``rollout status`` shows per channel besides the current one.
EARLIER_SHOWN = 3
#: The notes of a release ``recall`` publishes (signed: how a later recall knows what
#: this one recalled and whose content it carries).
RECALL_NOTES = "recall of v{recalled}: the content of v{source}"
_RECALL_NOTES_RE = re.compile(r"recall of v(\d+): the content of v(\d+)")


class UnhealthyRolloutError(PublishError):
    """``widen`` refused: the current stage fails too often (exit 4; ``--force`` overrides)."""


@dataclass(frozen=True)
class Signed:
    """A release of the history whose envelope verified; ``since`` = first published."""

    release: Release
    since: datetime
    rollout: int  # its percentage in the newest entry


def signed_releases(repo: Path, channel: str, *, current_keys: bool = False) -> list[Signed]:
    """The channel's releases in the history whose signatures verify, one per version
    (newest entry wins), oldest version first. Entries that do not verify are skipped.

    An entry verifies with the release keys of the root it names; with ``current_keys``
    (what ``recall`` signs from), with those of the newest root: a release key removed by
    a rotation (stolen, say) must not get its package re-signed, as boxes refuse what it
    signs (mix-and-match, DESIGN 2.3)."""
    roots = load_chain(repo)
    chain = {root.version: root for root in roots}
    found: dict[int, Signed] = {}
    for entry in history.entries(repo, channel):
        try:
            data = json.dumps(entry.envelope).encode("utf-8")
            envelope = parse_envelope(data)
            release = parse_release(envelope)
            root = chain.get(release.root_version)
            if root is None or release.channel != channel or release.version != entry.version:
                continue
            verify_role(envelope, roots[-1] if current_keys else root, "release", channel)
        except RepositoryError:
            continue
        first = found.get(release.version)
        found[release.version] = Signed(release, first.since if first else entry.time,
                                        release.rollout_percent)
    return [found[v] for v in sorted(found)]


def release_ref(release: Release, known: Sequence[Signed]) -> ReleaseRef:
    since = next((s.since for s in known if s.release.version == release.version),
                 release.issued)
    return ReleaseRef(release.channel, release.version, release.rollout_percent, since)


def status(repo: Path, boxes: Sequence[BoxView], now: datetime | None = None) -> list[Health]:
    """Every channel's current release and up to :data:`EARLIER_SHOWN` earlier ones."""
    now = normalize_now(now)
    rows: list[Health] = []
    for path in version_files(repo):
        try:
            current = read_release(repo, path.name)
        except RepositoryError as exc:  # one broken channel file must not hide the others
            logger.warning("%s is not shown: %s", path.name, exc)
            continue
        if current is None:  # removed since it was listed
            continue
        known = signed_releases(repo, path.name)
        newest = max([current.version, *(s.release.version for s in known)])
        rows.append(health(release_ref(current, known), boxes, now, newest))
        earlier = [s for s in known if s.release.version < current.version][-EARLIER_SHOWN:]
        for item in reversed(earlier):
            ref = ReleaseRef(path.name, item.release.version, item.rollout, item.since)
            rows.append(health(ref, boxes, now, newest))
    return rows


def _current(repo: Path, version_file: str) -> Release:
    """The channel's current release, verified: widen, halt and recall sign from it."""
    current = read_release(repo, version_file, load_chain(repo)[-1])
    if current is None:
        raise PublishError(f"{repo / version_file} does not exist; publish a release first")
    return current


def widen(repo: Path, keydir: Path, to: int, boxes: Sequence[BoxView], *,
          version_file: str = DEFAULT_VERSION_FILE,
          max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE, force: bool = False,
          expires: timedelta = DEFAULT_RELEASE_EXPIRES, passphrase: bytes | None = None,
          now: datetime | None = None) -> tuple[Release, Health]:
    """Raise the current release's percentage to ``to``, unless the stage's failure rate
    is above ``max_failure_rate`` percent (:class:`UnhealthyRolloutError`; ``force``
    overrides). Returns the re-signed release and the health it was decided on."""
    now = normalize_now(now)
    repo = repo.absolute()
    with repo_lock(repo):
        current = _current(repo, version_file)
        if to <= current.rollout_percent:
            raise PublishError(f"{version_file} v{current.version} is already at "
                               f"{current.rollout_percent}%; widen goes up (to stop it: "
                               "opq-box-publish rollout halt)")
        known = signed_releases(repo, version_file)
        newest = max([current.version, *(s.release.version for s in known)])
        seen = health(release_ref(current, known), boxes, now, newest)
        why = widen_refusal(seen, max_failure_rate)
        if why is not None and not force:
            raise UnhealthyRolloutError(f"not widened: {why}; halt it (opq-box-publish "
                                        "rollout halt) or recall it, or widen with --force")
        release = refresh_release_unlocked(
            repo, keydir, expires=expires, version_file=version_file, rollout=to,
            passphrase=passphrase, now=now, action="widen")
    return release, seen


def halt(repo: Path, keydir: Path, *, version_file: str = DEFAULT_VERSION_FILE,
         expires: timedelta = DEFAULT_RELEASE_EXPIRES, passphrase: bytes | None = None,
         now: datetime | None = None) -> Release:
    """Re-sign the current release at 0 % with a later ``issued``, so every box that polls
    accepts it at once and no further box takes it (boxes that have it keep it)."""
    now = normalize_now(now)
    repo = repo.absolute()
    with repo_lock(repo):
        _current(repo, version_file)
        return refresh_release_unlocked(repo, keydir, expires=expires,
                                        version_file=version_file, rollout=0,
                                        passphrase=passphrase, now=now, action="halt")


def last_good(current: Release, known: Sequence[Signed], boxes: Sequence[BoxView],
              to_version: int | None = None) -> Signed:
    """The release whose content ``recall`` re-publishes (module docstring)."""
    earlier = [s for s in known if s.release.version < current.version]
    if to_version is not None:
        for item in earlier:
            if item.release.version == to_version:
                return item
        versions = ", ".join(f"v{s.release.version}" for s in earlier) or "none"
        raise PublishError(f"--to-version {to_version}: no signed release of "
                           f"{current.channel} below v{current.version} with that version in "
                           f"the history (known: {versions})")
    failed = {v for b in boxes if b.channel == current.channel for v in b.failed_versions}
    # A recall recalled every release between its source and itself: those are not good,
    # whatever the boxes say (a second recall must not bring back what the first removed),
    # and a release with the current content is no way back either.
    releases = {s.release.version: s.release for s in known} | {current.version: current}
    recalled = {v for r in releases.values() if (src := recall_source(r)) is not None
                for v in range(src + 1, r.version)}
    for item in reversed(earlier):
        if (item.release.package.sha256 != current.package.sha256
                and _content(item.release, releases) != _content(current, releases)
                and item.release.version not in failed | recalled):
            return item
    raise PublishError(f"no earlier release of {current.channel} without failures and with "
                       f"other content than v{current.version} in the history "
                       f"({history.HISTORY_FILE}); name one with --to-version, or build and "
                       "release the known-good content yourself")


def recall_source(release: Release) -> int | None:
    """The version whose content ``release`` carries when it is a recall (its signed notes,
    :data:`RECALL_NOTES`), else None."""
    match = _RECALL_NOTES_RE.fullmatch(release.notes)
    source = int(match.group(2)) if match else None
    return source if source is not None and source < release.version else None


def _content(release: Release, releases: dict[int, Release]) -> int:
    """The version that first published ``release``'s content (through recalls)."""
    while (source := recall_source(release)) is not None and source in releases:
        release = releases[source]  # versions only go down: this ends
    return recall_source(release) or release.version


def _copy_package(src: Path, dest: Path, length: int) -> None:
    """Copy at most ``length`` + 1 bytes of the regular file ``src`` (not through a symlink:
    a link to /dev/zero would copy without end; a FIFO would block)."""
    with open_regular(src) as fin, dest.open("wb") as fout:
        left = length + 1  # one byte past the signed length: a longer file fails the check
        while left and (chunk := fin.read(min(left, 1 << 20))):
            fout.write(chunk)
            left -= len(chunk)


def _above_every_channel(repo: Path, versions: list[int]) -> int:
    """One above ``versions`` and every signed version of every channel: version numbers
    are one sequence for all channels (a recalled zip can be promoted like any other)."""
    root = load_chain(repo)[-1]
    for path in version_files(repo):
        try:
            release = read_release(repo, path.name, root)
        except PublishError as exc:  # an unsigned edit: its number counts for nothing
            logger.warning("%s", exc)
            release = None
        versions += [release.version] if release else []
        versions += [s.release.version for s in signed_releases(repo, path.name)]
    return max(versions) + 1


@dataclass(frozen=True)
class Recall:
    """What :func:`recall` published."""

    release: Release
    recalled: Release  # the bad release it replaces
    source: Release  # the last good release whose content it carries


def recall(repo: Path, keydir: Path, boxes: Sequence[BoxView], *,
           version_file: str = DEFAULT_VERSION_FILE, to_version: int | None = None,
           rollout: int = 100, expires: timedelta = DEFAULT_RELEASE_EXPIRES,
           passphrase: bytes | None = None, now: datetime | None = None) -> Recall:
    """Publish the last good release's content as a new version above every version the
    channel has published, at ``rollout`` percent (default everyone)."""
    now = normalize_now(now)
    repo = repo.absolute()
    with repo_lock(repo):
        current = _current(repo, version_file)
        known = signed_releases(repo, version_file)
        usable = signed_releases(repo, version_file, current_keys=True)
        source = last_good(current, usable, boxes, to_version).release
        version = _above_every_channel(repo, [current.version,
                                              *(s.release.version for s in known)])
        with tempfile.TemporaryDirectory(prefix="opq-publish-recall-") as tmp:
            # Checked and rebuilt from one private copy: a file in the repository could be
            # swapped between the check and the rebuild.
            package = Path(tmp) / "source.zip"
            try:
                _copy_package(repo / source.package.path, package, source.package.length)
                intact = sha256_file(package) == (source.package.sha256,
                                                  source.package.length)
            except OSError:
                intact = False
            if not intact:
                raise PublishError(f"the package of v{source.version} "
                                   f"({source.package.path}) is missing or no longer matches "
                                   "its signed sha256; nothing was published")
            rebuilt = Path(tmp) / f"recall-{version}.zip"
            rebuild_package(package, rebuilt, version=version)
            release = publish_release_unlocked(
                repo, keydir, rebuilt, expires=expires, rollout=rollout,
                version_file=version_file, passphrase=passphrase, now=now, action="recall",
                notes=RECALL_NOTES.format(recalled=current.version, source=source.version))
    return Recall(release, current, source)
