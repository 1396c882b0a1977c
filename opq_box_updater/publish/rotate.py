"""Key rotation (DESIGN 2.2): root N+1 with a role's keys changed, signed by a threshold of
root N's root keys and of its own, and every version file re-signed for it, so that boxes
walking to N+1 never refuse the releases as mix-and-match. Split from :mod:`.repo`, whose
reading, signing and locking helpers it uses."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import FormatError
from ..fsutil import atomic_write
from ..metadata import (
    ROLES,
    Root,
    format_time,
    keyid_of,
    parse_envelope,
    parse_root,
    verify_next_root,
    verify_role,
)
from . import history
from .common import DEFAULT_ROOT_EXPIRES, PublishError, normalize_now
from .keys import KeyStore, key_id, parse_public_key, public_hex
from .repo import (
    _check_keydir,
    _check_size,
    _locked,
    _warn_expiry,
    envelope_bytes,
    load_chain,
    read_release,
    release_signed,
    root_file,
    root_signed,
    version_files,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotateResult:
    """What :func:`rotate_role` wrote."""

    root: Root
    generated: tuple[str, ...] = ()  # keyids of new keys stored in KEYDIR
    resigned: tuple[str, ...] = ()  # version files re-signed


@_locked
def rotate_role(repo: Path, keydir: Path, role: str, *, add: Sequence[str] = (),
                remove: Sequence[str] = (), threshold: int | None = None,
                expires: timedelta = DEFAULT_ROOT_EXPIRES, passphrase: bytes | None = None,
                now: datetime | None = None) -> RotateResult:
    """Write root N+1 with ``role``'s keys changed, then re-sign every version file for it.

    ``add`` takes hex public keys or key file paths; ``remove`` keyids (or unique prefixes of
    at least 8 digits). With neither nor ``threshold``, every key of the role is replaced by a
    new one. When the role would be left with fewer keys than its threshold, new keys are
    generated into KEYDIR. Root N+1 is signed by a threshold of N's root keys and of its own;
    version files are re-signed with N+1's release keys and ``root_version`` N+1, so boxes
    that walk to N+1 do not refuse them as mix-and-match. Everything is checked before the
    first file is written; on a missing private key nothing changes.
    """
    if role not in ROLES:
        raise PublishError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if threshold is not None and threshold < 1:
        raise PublishError("threshold must be at least 1")
    now = normalize_now(now)
    repo = repo.absolute()
    _check_keydir(repo, keydir)
    current = load_chain(repo)[-1]
    store = KeyStore(keydir, passphrase)
    public = {k: v.hex() for k, v in current.keys.items()}
    old_keyids = current.role(role).keyids
    keyids = list(old_keyids)
    plain = not add and not remove and threshold is None
    for prefix in (old_keyids if plain else remove):  # plain: replace every key of the role
        keyids.remove(_resolve_keyid(prefix, keyids, role))
    for text in add:
        raw = parse_public_key(text)
        keyid = keyid_of(raw)
        if keyid in keyids:
            raise PublishError(f"key {keyid[:12]} already holds the {role} role")
        public[keyid] = raw.hex()
        keyids.append(keyid)
    new_threshold = threshold if threshold is not None else current.role(role).threshold
    wanted = len(old_keyids) if plain else new_threshold
    if len(keyids) < wanted and add:
        raise PublishError(f"the {role} role would have {len(keyids)} key(s) for a threshold "
                           f"of {new_threshold}: --add more keys or lower --threshold")
    generated: dict[str, Ed25519PrivateKey] = {}
    while len(keyids) < wanted:  # without --add, a role short of keys gets new ones
        key = Ed25519PrivateKey.generate()
        generated[key_id(key)] = key
        public[key_id(key)] = public_hex(key)
        keyids.append(key_id(key))
    roles = {name: (list(current.role(name).keyids), current.role(name).threshold)
             for name in ROLES}
    roles[role] = (keyids, new_threshold)
    signed = root_signed(current.version + 1, now + expires, public, roles)
    try:
        new = parse_root(json.dumps({"signed": signed, "signatures": []}).encode())
    except FormatError as exc:
        raise PublishError(f"the new root would be invalid: {exc}") from None
    signers = _root_signers(store, current, new, generated)
    data = envelope_bytes(signed, signers)
    new = verify_next_root(current, data)  # what we write, a box accepts
    releases = _resign_plan(repo, current, new, store, generated, now)
    for keyid, key in generated.items():
        store.store(key, role)
        logger.info("generated %s key %s in %s", role, keyid, keydir)
    atomic_write(root_file(repo, new.version), data)
    for path, release_data in releases:
        atomic_write(path, release_data)
        history.record(repo, "rotate", path.name, release_data, now)
    _warn_expiry(new, now)
    return RotateResult(new, tuple(generated), tuple(p.name for p, _ in releases))


def _resolve_keyid(prefix: str, keyids: Sequence[str], role: str) -> str:
    prefix = prefix.strip().lower()
    matches = [k for k in keyids if k.startswith(prefix)] if len(prefix) >= 8 else []
    if len(matches) != 1:
        raise PublishError(f"{prefix!r} does not name exactly one {role} key (give the keyid "
                           f"or a unique prefix of at least 8 digits; current: "
                           f"{', '.join(k[:12] for k in keyids)})")
    return matches[0]


def _root_signers(store: KeyStore, old: Root, new: Root,
                  generated: dict[str, Ed25519PrivateKey]) -> list[Ed25519PrivateKey]:
    by_old = store.signing_keys(old.role("root").keyids, old.role("root").threshold,
                                f"root v{new.version} (signed by root v{old.version}'s keys)")
    by_new = store.signing_keys(new.role("root").keyids, new.role("root").threshold,
                                f"root v{new.version} (signed by its own root keys)", generated)
    unique = {key_id(k): k for k in (*by_old, *by_new)}
    return list(unique.values())


def _resign_plan(repo: Path, trusted: Root, root: Root, store: KeyStore,
                 generated: dict[str, Ed25519PrivateKey],
                 now: datetime) -> list[tuple[Path, bytes]]:
    """The re-signed bytes of every version file ``trusted``'s release keys signed, for
    ``root`` (nothing written yet); one they did not sign is left as it is."""
    plan: list[tuple[Path, bytes]] = []
    for path in version_files(repo):
        try:
            old = read_release(repo, path.name, trusted)
        except (PublishError, OSError) as exc:
            logger.warning("%s is unreadable or unsigned (%s); not re-signed", path.name, exc)
            continue
        if old is None:
            continue
        signed = release_signed(
            version=old.version, root_version=root.version, channel=path.name,
            # Not forced past the old issued: a later issued pushes boxes' trusted time
            # ahead of the clock, and an equal one is accepted (equal version, issued >=).
            issued=max(now, old.issued), expires=old.expires,
            package=old.package, rollout=old.rollout_percent, notes=old.notes)
        role = root.role("release")
        keys = store.signing_keys(role.keyids, role.threshold,
                                  f"{path.name} (root v{root.version} release role)", generated)
        data = envelope_bytes(signed, keys)
        _check_size(path.name, data)
        try:
            verify_role(parse_envelope(data), root, "release", path.name)
        except FormatError as exc:  # pragma: no cover - we built the document ourselves
            raise PublishError(f"{path.name}: {exc}") from None
        if old.expires <= now:
            logger.warning("%s expired at %s: run opq-box-publish refresh", path.name,
                           format_time(old.expires))
        plan.append((path, data))
    return plan
