"""Creating and changing a repository: init, release, refresh and key rotation.

Every function here is what the CLI command of the same name does, callable from tests and
the demo with an injected ``now``. Guarantees shared by all of them:

* Every document is checked with the box's own verifier (:mod:`opq_box_updater.metadata`)
  before it is written: what this module writes, a box accepts.
* Files are replaced atomically (:func:`.common.atomic_write`); a package is in place
  before the version file that names it, and a new root before the version files that name it.
* Nothing secret is written into the repository; KEYDIR may not be inside it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import RepositoryError, UnsafePackageError
from ..fsutil import atomic_write, fsync_dir
from ..metadata import (
    CHANNEL_PATTERN,
    METADATA_MAX_BYTES,
    SPEC_VERSION,
    Floors,
    PackageRef,
    Release,
    Root,
    check_root_fresh,
    format_time,
    make_envelope,
    parse_envelope,
    parse_release,
    verify_next_root,
    verify_release,
    verify_role,
    verify_trust_anchor,
)
from . import history
from .build import inspect_package
from .common import (
    CHUNK,
    DEFAULT_RELEASE_EXPIRES,
    DEFAULT_ROOT_EXPIRES,
    WARN_WITHIN,
    PublishError,
    is_within,
    normalize_now,
    repo_lock,
    sha256_file,
)
from .keys import PASSPHRASE_ENV, KeyStore, key_id, public_hex

logger = logging.getLogger(__name__)

ROOT_DIR = "root"
PACKAGES_DIR = "packages"
#: Staging copies made by :func:`store_package` (``mkstemp`` names).
_STAGING_RE = re.compile(r"\.package\.[A-Za-z0-9_]+\.tmp")
DEFAULT_VERSION_FILE = "version.json"
VERSION_FILE_RE = CHANNEL_PATTERN
_ROOT_FILE_RE = re.compile(r"([1-9][0-9]*)\.root\.json")
_ONE_SECOND = timedelta(seconds=1)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _locked(step: Callable[Concatenate[Path, _P], _T]) -> Callable[Concatenate[Path, _P], _T]:
    """Run a step that reads and replaces version files under :func:`.common.repo_lock`."""
    @functools.wraps(step)
    def locked(repo: Path, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with repo_lock(repo.absolute()):
            return step(repo, *args, **kwargs)
    return locked


# --- reading a repository ------------------------------------------------------------------


def root_file(repo: Path, version: int) -> Path:
    return repo / ROOT_DIR / f"{version}.root.json"


def root_versions(repo: Path) -> list[int]:
    """The versions of the ``root/N.root.json`` files present, ascending."""
    folder = repo / ROOT_DIR
    if not folder.is_dir():
        return []
    found = (_ROOT_FILE_RE.fullmatch(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def version_files(repo: Path) -> list[Path]:
    """The release files (channels) of a repository: ``version*.json`` at its top."""
    return sorted(p for p in repo.glob("version*.json")
                  if VERSION_FILE_RE.fullmatch(p.name) and p.is_file())


def check_version_file_name(name: str) -> str:
    """``name`` when it is a valid channel file name (``version*.json``, no directories)."""
    if not VERSION_FILE_RE.fullmatch(name):
        raise PublishError(f"version file {name!r} must be named like version.json or "
                           "version-beta.json (version-NAME.json, NAME of letters, digits "
                           "and _)")
    return name


def load_chain(repo: Path, anchor: bytes | None = None) -> list[Root]:
    """Verify the root chain as a box does and return it, anchor first.

    ``anchor`` defaults to ``root/1.root.json``. Raises :class:`RepositoryError` naming the
    first root that does not verify, is larger than boxes accept, or is missing from the
    numbering.
    """
    if anchor is None:
        try:
            anchor = root_file(repo, 1).read_bytes()
        except FileNotFoundError:
            raise PublishError(f"{repo} is not a repository (no {ROOT_DIR}/1.root.json); "
                               "create one with opq-box-publish init") from None
    try:
        chain = [verify_trust_anchor(anchor)]
    except RepositoryError as exc:
        raise type(exc)(f"trust anchor: {exc}") from None
    newest = max(root_versions(repo), default=chain[0].version)
    for version in range(chain[0].version + 1, newest + 1):
        path = root_file(repo, version)
        if not path.is_file():
            raise RepositoryError(f"{ROOT_DIR}/{version}.root.json is missing (the chain has a "
                                  f"gap below v{newest})")
        data = path.read_bytes()
        if len(data) > METADATA_MAX_BYTES:
            raise RepositoryError(f"{ROOT_DIR}/{path.name}: {len(data)} bytes, boxes refuse "
                                  f"metadata over {METADATA_MAX_BYTES}")
        try:
            chain.append(verify_next_root(chain[-1], data))
        except RepositoryError as exc:
            raise type(exc)(f"{ROOT_DIR}/{path.name}: {exc}") from None
    return chain


def read_release(repo: Path, version_file: str, root: Root | None = None) -> Release | None:
    """The release currently in ``version_file``; ``None`` when there is none yet. With
    ``root``, only when a threshold of its release keys signed it (expiry aside), else
    :class:`PublishError`: a step that re-signs or numbers from it must not take an edit by
    someone who can write the repository but not sign (it would sign their package)."""
    path = repo / check_version_file_name(version_file)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if root is None:
        return parse_release(parse_envelope(data))
    try:
        envelope = parse_envelope(data)
        release = parse_release(envelope)
        verify_role(envelope, root, "release", version_file)
    except RepositoryError as exc:
        raise PublishError(f"{version_file} does not verify with root v{root.version}'s "
                           f"release keys ({exc}); nothing was signed: restore it, or "
                           "publish a release with --force") from None
    return release


# --- writing documents ---------------------------------------------------------------------


def envelope_bytes(signed: dict[str, Any], keys: Iterable[Ed25519PrivateKey]) -> bytes:
    """A signed envelope as stored in the repository (indented for people; boxes
    re-canonicalise ``signed``)."""
    return (json.dumps(make_envelope(signed, keys), indent=2, sort_keys=True,
                       ensure_ascii=False) + "\n").encode("utf-8")


def root_signed(version: int, expires: datetime, keys: Mapping[str, str],
                roles: Mapping[str, tuple[Sequence[str], int]]) -> dict[str, Any]:
    """The ``signed`` part of a root; ``keys`` maps keyid -> public hex, ``roles`` maps a
    role to (keyids, threshold). Keys no role uses are left out."""
    used = {k for keyids, _ in roles.values() for k in keyids}
    return {
        "type": "root", "spec_version": SPEC_VERSION, "version": version,
        "expires": format_time(expires),
        "keys": {k: {"keytype": "ed25519", "public": keys[k]} for k in sorted(used)},
        "roles": {name: {"keyids": list(keyids), "threshold": threshold}
                  for name, (keyids, threshold) in roles.items()},
    }


def release_signed(*, version: int, root_version: int, channel: str, issued: datetime,
                   expires: datetime, package: PackageRef, rollout: int,
                   notes: str) -> dict[str, Any]:
    """The ``signed`` part of a release (DESIGN 2.3); ``channel`` is the version file it is
    published as."""
    return {
        "type": "release", "spec_version": SPEC_VERSION, "version": version,
        "root_version": root_version, "channel": channel, "issued": format_time(issued),
        "expires": format_time(expires),
        "package": {"path": package.path, "sha256": package.sha256, "length": package.length},
        "rollout_percent": rollout, "notes": notes,
    }


def _sign_release(root: Root, store: KeyStore, signed: dict[str, Any], now: datetime) -> bytes:
    keys = store.signing_keys(root.role("release").keyids, root.role("release").threshold,
                              f"release v{signed['version']} (root v{root.version} release role)")
    data = envelope_bytes(signed, keys)
    _check_size(signed["channel"], data)
    verify_release(root, data, now, Floors())  # what we write, a box accepts
    return data


def _check_size(name: str, data: bytes) -> None:
    """Boxes read at most METADATA_MAX_BYTES of a metadata file and refuse a longer one."""
    if len(data) > METADATA_MAX_BYTES:
        raise PublishError(f"{name} would be {len(data)} bytes, more than the limit of "
                           f"{METADATA_MAX_BYTES} boxes accept (shorten --notes); nothing "
                           "was published")


def _check_keydir(repo: Path, keydir: Path) -> None:
    if is_within(keydir, repo):
        raise PublishError(f"KEYDIR {keydir} is inside the repository {repo}: private keys "
                           "would be published; keep them elsewhere")


def _warn_expiry(root: Root, now: datetime, release_expires: datetime | None = None) -> None:
    if root.expires - now < WARN_WITHIN:
        logger.warning("root v%d expires at %s: run opq-box-publish rotate to renew it",
                       root.version, format_time(root.expires))
    elif release_expires is not None and release_expires > root.expires:
        logger.warning("the release expires after root v%d (%s): boxes stop at the root's "
                       "expiry unless a rotation renews it", root.version,
                       format_time(root.expires))


# --- init ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitResult:
    """What :func:`init_repo` created."""

    trust_anchor: Path
    root: Root
    root_keyids: tuple[str, ...]
    release_keyids: tuple[str, ...]


def init_repo(repo: Path, keydir: Path, *, root_keys: int = 1, root_threshold: int = 1,
              release_keys: int = 1, release_threshold: int = 1,
              expires: timedelta = DEFAULT_ROOT_EXPIRES, passphrase: bytes | None = None,
              now: datetime | None = None) -> InitResult:
    """Create a repository with ``root/1.root.json`` and fresh keys in KEYDIR.

    Refuses an existing repository (a ``root/`` with roots, or version files) and a KEYDIR
    that already holds keys: nothing is ever overwritten. The returned ``trust_anchor`` is
    the file boxes pin as ``trust_root``.
    """
    now = normalize_now(now)
    for count, threshold, name in ((root_keys, root_threshold, "root"),
                                   (release_keys, release_threshold, "release")):
        if count < 1 or not 1 <= threshold <= count:
            raise PublishError(f"{name}: need at least 1 key and a threshold between 1 and "
                               f"the number of keys (got {count} keys, threshold {threshold})")
    repo = repo.absolute()
    _check_keydir(repo, keydir)
    if root_versions(repo) or version_files(repo):
        raise PublishError(f"{repo} already holds a repository; refusing to overwrite it")
    store = KeyStore(keydir, passphrase)
    if store.has_keys():
        raise PublishError(f"{keydir} already holds keys; use an empty KEYDIR for a new "
                           "repository (or rotate keys in the existing one)")
    store.ensure_dir()
    if not passphrase:
        logger.warning("no passphrase: the private keys in %s are written unencrypted, and "
                       "anyone who can read them can sign releases for every box; set %s or "
                       "pass --passphrase-file", keydir, PASSPHRASE_ENV)
    roots = [store.generate("root") for _ in range(root_keys)]
    releases = [store.generate("release") for _ in range(release_keys)]
    public = {key_id(k): public_hex(k) for k in (*roots, *releases)}
    signed = root_signed(1, now + expires, public, {
        "root": ([key_id(k) for k in roots], root_threshold),
        "release": ([key_id(k) for k in releases], release_threshold),
    })
    data = envelope_bytes(signed, roots)
    root = verify_trust_anchor(data)
    (repo / ROOT_DIR).mkdir(parents=True, exist_ok=True)
    (repo / PACKAGES_DIR).mkdir(exist_ok=True)
    anchor = root_file(repo, 1)
    atomic_write(anchor, data)
    return InitResult(anchor, root, tuple(key_id(k) for k in roots),
                      tuple(key_id(k) for k in releases))


# --- release and refresh -------------------------------------------------------------------


@contextlib.contextmanager
def store_package(repo: Path, package_zip: Path) -> Iterator[tuple[Path, PackageRef]]:
    """Stage a package for ``packages/<sha256>.zip``: yield a private copy and its reference.

    The copy is streamed once (hashed on the way, fsynced) into a temporary file of the
    packages folder that only this process made; the caller checks *that* file, so what is
    signed is exactly what was checked, and the source is read only once. Leaving the block
    normally renames the copy into place (an identical package already there is kept, a
    corrupt one with that name replaced); an error removes it.
    """
    try:
        src = package_zip.open("rb")
    except FileNotFoundError:
        raise PublishError(f"{package_zip}: no such file") from None
    folder = repo / PACKAGES_DIR
    folder.mkdir(exist_ok=True)
    # A publish cut between staging and rename leaves a whole package behind; the caller
    # holds the repository lock, so no other step is staging one now.
    for entry in os.scandir(folder):
        if _STAGING_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
    digest = hashlib.sha256()
    length = 0
    try:
        fd, tmp = tempfile.mkstemp(prefix=".package.", suffix=".tmp", dir=folder)
    except BaseException:
        src.close()
        raise
    try:
        with os.fdopen(fd, "wb") as dst, src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                length += len(chunk)
                dst.write(chunk)
            dst.flush()
            os.fchmod(dst.fileno(), 0o644)
            os.fsync(dst.fileno())
        sha = digest.hexdigest()
        yield Path(tmp), PackageRef(f"{PACKAGES_DIR}/{sha}.zip", sha, length)
        final = folder / f"{sha}.zip"
        if final.is_file() and sha256_file(final) == (sha, length):
            os.unlink(tmp)
        else:
            os.replace(tmp, final)
            fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish_release_unlocked(repo: Path, keydir: Path, package_zip: Path, *,
                             expires: timedelta = DEFAULT_RELEASE_EXPIRES, rollout: int = 100,
                             version_file: str = DEFAULT_VERSION_FILE, notes: str = "",
                             force: bool = False, passphrase: bytes | None = None,
                             now: datetime | None = None, action: str = "release") -> Release:
    """Publish ``package_zip`` as the release in ``version_file`` (the caller holds the
    repository lock; :func:`publish_release` takes it).

    The release version is the manifest's. Refuses a package boxes would refuse, and a
    version not above the one already in ``version_file`` unless ``force``. The package is
    stored first, then the version file is replaced atomically: a box never sees a release
    whose package is missing.
    """
    now = normalize_now(now)
    repo = repo.absolute()
    check_version_file_name(version_file)
    _check_keydir(repo, keydir)
    if not 0 <= rollout <= 100:
        raise PublishError(f"rollout must be between 0 and 100, not {rollout}")
    root = load_chain(repo)[-1]
    _check_root_usable(root, now)
    with store_package(repo, package_zip) as (staged, package):
        try:
            manifest = inspect_package(staged)
        except UnsafePackageError as exc:
            raise PublishError(f"refusing to publish {package_zip}: {exc}") from None
        current = _current_release(repo, version_file, force)
        if current is not None and manifest.version <= current.version:
            if not force:
                raise PublishError(
                    f"{version_file} already publishes v{current.version}; v{manifest.version} "
                    "is not newer (boxes would refuse it as a rollback); build a higher --version")
            if manifest.version < current.version:
                logger.warning("boxes that saw v%d will refuse v%d as a rollback until a release "
                               "key rotation resets their floor", current.version, manifest.version)
        store = KeyStore(keydir, passphrase)
        signed = release_signed(version=manifest.version, root_version=root.version,
                                channel=version_file, issued=now, expires=now + expires,
                                package=package, rollout=rollout, notes=notes)
        # Missing keys, or a document boxes would refuse as too large, fail here: before the
        # package is renamed into the repository.
        data = _sign_release(root, store, signed, now)
    _check_unchanged(repo, version_file, current)
    atomic_write(repo / version_file, data)
    history.record(repo, action, version_file, data, now, notes)
    _warn_expiry(root, now, now + expires)
    return parse_release(parse_envelope(data))


publish_release = _locked(publish_release_unlocked)


def refresh_release_unlocked(
        repo: Path, keydir: Path, *, expires: timedelta = DEFAULT_RELEASE_EXPIRES,
        version_file: str = DEFAULT_VERSION_FILE, rollout: int | None = None,
        passphrase: bytes | None = None, now: datetime | None = None,
        action: str = "refresh", force: bool = False) -> Release:
    """Re-sign the current release with a later ``expires`` (DESIGN 2.3), under the lock
    the caller holds (:func:`refresh_release` takes it). Keeps version, package and notes;
    moves ``issued`` forward (strictly, so boxes see a newer copy of the same version);
    names the newest root; ``rollout`` optionally widens or narrows a phased rollout. The
    current release must verify with the newest root's release keys; with ``force``, with
    those of the root it names (a ``rotate`` cut short between writing the root and
    re-signing the version files)."""
    now = normalize_now(now)
    repo = repo.absolute()
    _check_keydir(repo, keydir)
    if rollout is not None and not 0 <= rollout <= 100:
        raise PublishError(f"rollout must be between 0 and 100, not {rollout}")
    root = load_chain(repo)[-1]
    _check_root_usable(root, now)
    try:
        current = read_release(repo, version_file, root)
    except PublishError as exc:
        if not force:
            raise PublishError(f"{exc} (after a rotate cut short: refresh --force)") from None
        named = read_release(repo, version_file)  # structure only: which root signs it
        chain = {r.version: r for r in load_chain(repo)}
        current = read_release(repo, version_file, chain.get(named.root_version, root)
                               if named else root)
    if current is None:
        raise PublishError(f"{repo / version_file} does not exist; publish a release first")
    issued = max(now, current.issued + _ONE_SECOND)
    signed = release_signed(
        version=current.version, root_version=root.version, channel=version_file,
        issued=issued,
        expires=issued + expires, package=current.package,
        rollout=current.rollout_percent if rollout is None else rollout, notes=current.notes)
    data = _sign_release(root, KeyStore(keydir, passphrase), signed, now)
    _check_unchanged(repo, version_file, current)
    atomic_write(repo / version_file, data)
    history.record(repo, action, version_file, data, now)
    _warn_expiry(root, now, issued + expires)
    return parse_release(parse_envelope(data))


refresh_release = _locked(refresh_release_unlocked)


def _current_release(repo: Path, version_file: str, force: bool) -> Release | None:
    try:
        return read_release(repo, version_file)
    except RepositoryError as exc:
        if force:
            logger.warning("%s is unreadable (%s); replacing it", version_file, exc)
            return None
        raise PublishError(f"{version_file} is unreadable ({exc}); use --force to replace it"
                           ) from None


def _check_unchanged(repo: Path, version_file: str, seen: Release | None) -> None:
    """Just before replacing ``version_file``: it still holds the release decided on. The
    lock keeps other publishers out; this also catches a writer that does not take it (an
    older publisher, a copy by hand): never write a release decided against a stale one."""
    try:
        now_there = read_release(repo, version_file)
    except RepositoryError:
        now_there = None
    if now_there != seen:
        what = f"v{now_there.version}" if now_there else "something unreadable or nothing"
        raise PublishError(f"{version_file} changed while this step ran (it now holds {what});"
                           " nothing was written; run the command again")


def _check_root_usable(root: Root, now: datetime) -> None:
    try:
        check_root_fresh(root, now)
    except RepositoryError as exc:
        raise PublishError(f"{exc}; nothing was published") from None
