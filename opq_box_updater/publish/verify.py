"""``opq-box-publish verify``: check a whole repository the way a box would.

A box starting from the trust anchor must be able to walk every root, accept every version
file against the newest root, and download and accept its package. Every problem found is
one line in :attr:`VerifyReport.problems`; anything that expires within 7 days is a warning,
because an expired root or release stops the whole fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from ..errors import RepositoryError
from ..metadata import (
    METADATA_MAX_BYTES,
    Floors,
    Release,
    Root,
    format_time,
    parse_root,
    verify_release,
)
from .build import inspect_package
from .common import WARN_WITHIN, normalize_now, sha256_file
from .repo import ROOT_DIR, load_chain, root_file, version_files


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_repo`; ``ok`` when there is no problem."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    roots: list[Root] = field(default_factory=list)
    releases: dict[str, Release] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_repo(repo: Path, trust_root: Path | None = None, now: datetime | None = None,
                warn_within: timedelta = WARN_WITHIN,
                channels: Sequence[str] | None = None) -> VerifyReport:
    """Verify ``repo`` from ``trust_root`` (default ``root/1.root.json``); never raises for
    a bad repository, it reports. Each problem is one line saying what is wrong.
    ``channels`` limits the release files checked to these (each must exist); default all."""
    now = normalize_now(now)
    report = VerifyReport()
    _verify_chain(repo, trust_root, report)
    if not report.roots or report.problems:
        return report
    newest = report.roots[-1]
    if newest.expires <= now:
        report.problems.append(f"root v{newest.version} expired at "
                               f"{format_time(newest.expires)}: run opq-box-publish rotate")
    elif newest.expires - now < warn_within:
        report.warnings.append(f"root v{newest.version} expires at "
                               f"{format_time(newest.expires)}: run opq-box-publish rotate")
    files = version_files(repo) if channels is None else [repo / name for name in channels]
    if not files:
        report.warnings.append("no version*.json: boxes have no release to fetch")
    for path in files:
        _verify_release_file(repo, path, newest, now, warn_within, report)
    return report


def _read_capped(path: Path, report: VerifyReport) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        report.problems.append(f"{path}: cannot read ({exc.strerror})")
        return None
    if len(data) > METADATA_MAX_BYTES:
        report.problems.append(f"{path.name}: {len(data)} bytes, boxes refuse metadata over "
                               f"{METADATA_MAX_BYTES}")
        return None
    return data


def _verify_chain(repo: Path, trust_root: Path | None, report: VerifyReport) -> None:
    anchor_path = trust_root if trust_root is not None else root_file(repo, 1)
    anchor_data = _read_capped(anchor_path, report)
    if anchor_data is None:
        return
    if trust_root is not None:
        _check_anchor_copy(repo, trust_root, anchor_data, report)
    try:
        report.roots.extend(load_chain(repo, anchor_data))
    except RepositoryError as exc:
        report.problems.append(str(exc))


def _check_anchor_copy(repo: Path, trust_root: Path, anchor_data: bytes,
                       report: VerifyReport) -> None:
    """A box's anchor must be the repository's root of the same version."""
    try:
        anchor = parse_root(anchor_data)
    except RepositoryError:
        return  # load_chain reports it
    copy = root_file(repo, anchor.version)
    try:
        same = parse_root(copy.read_bytes()).envelope.signed == anchor.envelope.signed
    except (OSError, RepositoryError):
        same = False
    if not same:
        report.problems.append(f"{ROOT_DIR}/{copy.name} is missing or differs from the "
                               f"trust anchor {trust_root}")


def _verify_release_file(repo: Path, path: Path, root: Root, now: datetime,
                         warn_within: timedelta, report: VerifyReport) -> None:
    data = _read_capped(path, report)
    if data is None:
        return
    try:
        release = verify_release(root, data, now, Floors())
    except RepositoryError as exc:
        report.problems.append(f"{path.name}: {exc}")
        return
    if release.channel != path.name:  # a box following this file would refuse it (exit 3)
        report.problems.append(f"{path.name}: release v{release.version} names channel "
                               f"{release.channel!r}; boxes following {path.name} refuse it")
        return
    if release.expires - now < warn_within:
        report.warnings.append(f"{path.name}: release v{release.version} expires at "
                               f"{format_time(release.expires)}: run opq-box-publish refresh")
    package = repo / release.package.path
    if not package.is_file():
        report.problems.append(f"{path.name}: package {release.package.path} is missing")
        return
    sha, length = sha256_file(package)
    if (sha, length) != (release.package.sha256, release.package.length):
        report.problems.append(
            f"{path.name}: {release.package.path} has sha256 {sha[:12]}... and {length} "
            f"bytes, the release signs {release.package.sha256[:12]}... and "
            f"{release.package.length} bytes")
        return
    try:
        manifest = inspect_package(package)
    except RepositoryError as exc:
        report.problems.append(f"{path.name}: {release.package.path}: {exc}")
        return
    if manifest.version != release.version:
        report.problems.append(f"{path.name}: release v{release.version} names a package whose "
                               f"manifest says v{manifest.version}")
        return
    report.releases[path.name] = release
