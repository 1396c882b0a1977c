"""The verification core: canonical JSON, Ed25519 signatures, roots, releases, floors.

Bytes and a time go in; a verified object or a typed :class:`RepositoryError` comes out.
Nothing here touches the disk or the network (python-tuf's ``trusted_metadata_set``), which
is what lets the attack table be tested in microseconds. ``cryptography`` is imported only
where a signature is made or checked, so a no-op run answered 304 never loads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .errors import (
    BadVersionError,
    ExpiredMetadataError,
    FormatError,
    RollbackError,
    UnsignedMetadataError,
)

SPEC_VERSION = 1
MAX_ROOT_STEPS = 32
METADATA_MAX_BYTES = 64 * 1024
#: Times before this year are refused: no box or repository ever made one (a year like 0999
#: is a forgery or a bug, and would not survive a round trip through strftime).
MIN_YEAR = 1970
ROLES = ("root", "release")

#: A channel is the file name a release is published as (DESIGN 2.3): ``version.json`` or
#: ``version-NAME.json``. The config's ``version_file``, the publisher and the shipped nginx
#: site all use this one pattern.
CHANNEL_PATTERN = re.compile(r"version(-[A-Za-z0-9_]+)?\.json")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
#: ASCII digits only: ``\d`` would also match Arabic-Indic or fullwidth digits, which int()
#: reads, so ``٢٠٢٦-01-31T12:00:00Z`` parsed as 2026 (docs/reliability.md, "Fuzzing").
_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")


# --- canonical JSON ------------------------------------------------------------------------


def _no_floats(value: str) -> Any:
    raise FormatError(f"has a non-integer number {value} (floats are not allowed)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise FormatError(f"has the key {key!r} twice")
        result[key] = value
    return result


def parse_json(data: bytes) -> Any:
    """Parse JSON strictly: UTF-8, no floats (``1.0``, ``1e3``, NaN), no duplicate keys.
    Used for every signed document and for a package's manifest."""
    try:
        text = data.decode("utf-8")
        doc = json.loads(text, parse_float=_no_floats, parse_constant=_no_floats,
                         object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # also int() past Python's digit limit
        raise FormatError(f"not valid JSON: {exc}") from None
    _check_shape(doc, surrogates=bool(_LONE_SURROGATE.search(text)))
    return doc


_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
#: No document of the protocol nests deeper than 4; this bound keeps every recursive walk
#: (canonical form, float check) far from Python's recursion limit.
MAX_DEPTH = 32


def _check_shape(doc: Any, *, surrogates: bool) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and, when the text has ``\\ud8..``
    escapes, lone surrogates (they parse, but no UTF-8 encodes them: no canonical bytes).
    Iterative, so a hostile document cannot exhaust the stack here either."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise FormatError(f"not valid JSON: nested deeper than {MAX_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif surrogates and isinstance(value, str) and \
                any("\ud800" <= c <= "\udfff" for c in value):
            raise FormatError("not valid JSON: a string has a lone surrogate "
                              "(\\ud800-\\udfff)")


def canonical_bytes(signed: Any) -> bytes:
    """The exact bytes that are signed (DESIGN 2.1); refuses floats anywhere."""
    _reject_floats(signed)
    return json.dumps(signed, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _reject_floats(value: Any) -> None:
    if isinstance(value, float):
        raise FormatError("floats are not allowed in signed documents")
    if isinstance(value, dict):
        for item in value.values():
            _reject_floats(item)
    elif isinstance(value, list):
        for item in value:
            _reject_floats(item)


# --- typed field access --------------------------------------------------------------------


def _get(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise FormatError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is a subclass of int: `true` where an integer belongs is a wrong type.
    if type(value) is not kind:
        raise FormatError(f"{where}: field {key!r} must be {kind.__name__}")
    return value


def _exact_keys(obj: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    expected = set(keys)
    missing = expected - obj.keys()
    extra = obj.keys() - expected
    if missing:
        raise FormatError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    if extra:
        raise FormatError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")


def parse_time(value: str, where: str = "time") -> datetime:
    """Parse a ``YYYY-MM-DDTHH:MM:SSZ`` UTC time."""
    match = _TIME.fullmatch(value)
    if not match:
        raise FormatError(f"{where}: {value!r} is not a UTC time like 2026-01-31T12:00:00Z")
    year, month, day, hour, minute, second = map(int, match.groups())
    if year < MIN_YEAR:
        raise FormatError(f"{where}: {value!r} is before {MIN_YEAR} (implausible)")
    try:
        # Not strptime: it costs milliseconds of imports on the no-op path (DESIGN 7).
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise FormatError(f"{where}: {value!r} is not a valid time") from None


def format_time(moment: datetime) -> str:
    """Format an aware datetime as the repository's UTC time string (always four year
    digits: strftime's %Y writes year 999 as ``999``, which no parser reads back)."""
    t = moment.astimezone(UTC)
    return (f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:"
            f"{t.second:02d}Z")


# --- envelopes and signatures --------------------------------------------------------------


class Envelope(NamedTuple):
    """A parsed ``{"signed": ..., "signatures": [...]}`` document."""

    signed: dict[str, Any]
    signatures: tuple[tuple[str, str], ...]  # (keyid, sig hex), as served

    @property
    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.signed)


def parse_envelope(data: bytes) -> Envelope:
    """Parse a signed document's envelope (not yet verified)."""
    doc = parse_json(data)
    if not isinstance(doc, dict):
        raise FormatError("document must be a JSON object")
    _exact_keys(doc, ("signed", "signatures"), "envelope")
    signed = doc["signed"]
    if not isinstance(signed, dict):
        raise FormatError("envelope: 'signed' must be an object")
    sigs = doc["signatures"]
    if not isinstance(sigs, list):
        raise FormatError("envelope: 'signatures' must be a list")
    parsed: list[tuple[str, str]] = []
    for entry in sigs:
        if not isinstance(entry, dict):
            raise FormatError("envelope: each signature must be an object")
        _exact_keys(entry, ("keyid", "sig"), "signature")
        parsed.append((_get(entry, "keyid", str, "signature"),
                       _get(entry, "sig", str, "signature")))
    if _get(signed, "spec_version", int, "signed") != SPEC_VERSION:
        raise FormatError(f"unknown spec_version {signed['spec_version']} (this box knows "
                          f"{SPEC_VERSION}); upgrade the updater")
    return Envelope(signed, tuple(parsed))


def keyid_of(public: bytes) -> str:
    """A key's id: the lowercase hex SHA-256 of its 32 raw public bytes."""
    return hashlib.sha256(public).hexdigest()


def _signature_valid(public: bytes, sig_hex: str, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not _HEX128.fullmatch(sig_hex):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(sig_hex), message)
    except InvalidSignature:
        return False
    return True


def sign_bytes(private_pem_or_key: Any, message: bytes) -> str:
    """Sign with an ``Ed25519PrivateKey``; return the signature as lowercase hex."""
    return str(private_pem_or_key.sign(message).hex())


def make_envelope(signed: dict[str, Any], private_keys: Iterable[Any]) -> dict[str, Any]:
    """Build a signed envelope with one signature per ``Ed25519PrivateKey``."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    message = canonical_bytes(signed)
    signatures = []
    for key in private_keys:
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        signatures.append({"keyid": keyid_of(public), "sig": sign_bytes(key, message)})
    return {"signed": signed, "signatures": signatures}


# --- root ----------------------------------------------------------------------------------


class Role(NamedTuple):
    keyids: tuple[str, ...]
    threshold: int


class Root(NamedTuple):
    """A root document whose structure is valid (signatures are checked separately)."""

    version: int
    expires: datetime
    keys: Mapping[str, bytes]  # keyid -> raw public key
    roles: Mapping[str, Role]
    envelope: Envelope

    def role(self, name: str) -> Role:
        return self.roles[name]


def _check_type(signed: Mapping[str, Any], expected: str) -> None:
    kind = _get(signed, "type", str, "signed")
    if kind != expected:
        raise FormatError(f"expected a {expected} document, got {kind!r}")


def parse_root(data: bytes) -> Root:
    """Parse and validate a root's structure (DESIGN 2.1, 2.2); signatures not checked."""
    env = parse_envelope(data)
    s = env.signed
    _check_type(s, "root")
    _exact_keys(s, ("type", "spec_version", "version", "expires", "keys", "roles"), "root")
    version = _get(s, "version", int, "root")
    if version < 1:
        raise FormatError("root: version must be at least 1")
    expires = parse_time(_get(s, "expires", str, "root"), "root expires")
    keys: dict[str, bytes] = {}
    for keyid, entry in _get(s, "keys", dict, "root").items():
        if not isinstance(entry, dict):
            raise FormatError(f"root: key {keyid} must be an object")
        _exact_keys(entry, ("keytype", "public"), f"root key {keyid}")
        if _get(entry, "keytype", str, "root key") != "ed25519":
            raise FormatError(f"root: key {keyid} has keytype {entry['keytype']!r}, not ed25519")
        public_hex = _get(entry, "public", str, "root key")
        if not _HEX64.fullmatch(public_hex):
            raise FormatError(f"root: key {keyid} is not 32 bytes of lowercase hex")
        public = bytes.fromhex(public_hex)
        if keyid_of(public) != keyid:
            raise FormatError(f"root: keyid {keyid} is not the SHA-256 of its public key")
        keys[keyid] = public
    roles_raw = _get(s, "roles", dict, "root")
    _exact_keys(roles_raw, ROLES, "root roles")
    roles: dict[str, Role] = {}
    for name in ROLES:
        entry = roles_raw[name]
        if not isinstance(entry, dict):
            raise FormatError(f"root: role {name} must be an object")
        _exact_keys(entry, ("keyids", "threshold"), f"root role {name}")
        keyids = _get(entry, "keyids", list, f"role {name}")
        if not all(isinstance(k, str) for k in keyids) or len(set(keyids)) != len(keyids):
            raise FormatError(f"root: role {name} keyids must be distinct strings")
        for keyid in keyids:
            if keyid not in keys:
                raise FormatError(f"root: role {name} names keyid {keyid} missing from keys")
        threshold = _get(entry, "threshold", int, f"role {name}")
        if not 1 <= threshold <= len(keyids):
            raise FormatError(f"root: role {name} threshold {threshold} is not between 1 and "
                              f"its {len(keyids)} keyids")
        roles[name] = Role(tuple(keyids), threshold)
    return Root(version, expires, keys, roles, env)


def verify_role(env: Envelope, root: Root, role: str, what: str) -> None:
    """Raise :class:`UnsignedMetadataError` unless ``role``'s threshold of ``root`` signed.

    Unknown keyids and invalid signatures are ignored; a repeated keyid counts once.
    """
    wanted = root.role(role)
    message = env.signed_bytes
    good: set[str] = set()
    for keyid, sig in env.signatures:
        if keyid in good or keyid not in wanted.keyids:
            continue
        if _signature_valid(root.keys[keyid], sig, message):
            good.add(keyid)
    if len(good) < wanted.threshold:
        raise UnsignedMetadataError(
            f"{what}: {len(good)} valid signature(s) from root v{root.version}'s {role} keys, "
            f"{wanted.threshold} required")


def verify_trust_anchor(data: bytes) -> Root:
    """The root shipped on the box: valid and signed by its own root threshold."""
    root = parse_root(data)
    verify_role(root.envelope, root, "root", f"trust anchor (root v{root.version})")
    return root


def verify_next_root(trusted: Root, data: bytes) -> Root:
    """Root N+1: exact version, signed by a threshold of N's and of its own root keys."""
    new = parse_root(data)
    if new.version != trusted.version + 1:
        raise BadVersionError(f"root: expected version {trusted.version + 1}, got {new.version}")
    verify_role(new.envelope, trusted, "root", f"root v{new.version} (by v{trusted.version} keys)")
    verify_role(new.envelope, new, "root", f"root v{new.version} (by its own keys)")
    return new


def check_root_fresh(root: Root, now: datetime) -> None:
    """The newest trusted root must not have expired (an expired root stops the fleet)."""
    if root.expires <= now:
        raise ExpiredMetadataError(
            f"trusted root v{root.version} expired at {format_time(root.expires)}: the "
            "operators must publish a new root (opq-box-publish rotate)")


def release_keys_id(root: Root) -> str:
    """A fingerprint of ``root``'s release role (its keyids and threshold): floors remember
    the release keys they were set under, so a change is seen whenever it is trusted."""
    role = root.role("release")
    return hashlib.sha256(f"{role.threshold}:{','.join(sorted(role.keyids))}".encode()
                          ).hexdigest()[:16]


def release_keys_changed(old: Root, new: Root) -> bool:
    """True when ``new`` changed the release role (floors fall back: TUF fast-forward recovery)."""
    a, b = old.role("release"), new.role("release")
    return set(a.keyids) != set(b.keyids) or a.threshold != b.threshold


# --- release -------------------------------------------------------------------------------


class PackageRef(NamedTuple):
    path: str
    sha256: str
    length: int


class Release(NamedTuple):
    version: int
    root_version: int
    channel: str
    issued: datetime
    expires: datetime
    package: PackageRef
    rollout_percent: int
    notes: str

    @property
    def issued_str(self) -> str:
        return format_time(self.issued)


_RELEASE_FIELDS = ("type", "spec_version", "version", "root_version", "channel", "issued",
                   "expires", "package", "rollout_percent", "notes")


def parse_release(env: Envelope) -> Release:
    """Validate a release's structure (DESIGN 2.3); signatures not checked."""
    s = env.signed
    _check_type(s, "release")
    _exact_keys(s, _RELEASE_FIELDS, "release")
    version = _get(s, "version", int, "release")
    root_version = _get(s, "root_version", int, "release")
    if version < 1 or root_version < 1:
        raise FormatError("release: version and root_version must be at least 1")
    pkg = _get(s, "package", dict, "release")
    _exact_keys(pkg, ("path", "sha256", "length"), "release package")
    sha = _get(pkg, "sha256", str, "release package")
    path = _get(pkg, "path", str, "release package")
    length = _get(pkg, "length", int, "release package")
    if not _HEX64.fullmatch(sha):
        raise FormatError("release: package sha256 must be 64 lowercase hex digits")
    if path != f"packages/{sha}.zip":
        raise FormatError(f"release: package path {path!r} is not packages/<sha256>.zip")
    if length < 1:
        raise FormatError("release: package length must be positive")
    channel = _get(s, "channel", str, "release")
    if not CHANNEL_PATTERN.fullmatch(channel):
        raise FormatError(f"release: channel {channel[:80]!r} is not a version file name like "
                          "version.json or version-beta.json")
    rollout = _get(s, "rollout_percent", int, "release")
    if not 0 <= rollout <= 100:
        raise FormatError("release: rollout_percent must be between 0 and 100")
    return Release(
        version=version,
        root_version=root_version,
        channel=channel,
        issued=parse_time(_get(s, "issued", str, "release"), "release issued"),
        expires=parse_time(_get(s, "expires", str, "release"), "release expires"),
        package=PackageRef(path, sha, length),
        rollout_percent=rollout,
        notes=_get(s, "notes", str, "release"),
    )


class Floors(NamedTuple):
    """What the box has seen: releases older than this are a rollback attack."""

    version: int = 0
    issued: datetime | None = None


def verify_release(root: Root, data: bytes, now: datetime, floors: Floors) -> Release:
    """Verify ``version.json`` against the newest trusted root, the clock and the floors.

    ``now`` is :func:`trusted_now`. Raises :class:`BadVersionError` when the release names a
    root older than ``root`` (mix-and-match) or newer (the caller walks the chain first).
    """
    env = parse_envelope(data)
    release = parse_release(env)
    if release.root_version < root.version:
        raise BadVersionError(
            f"release v{release.version} names root v{release.root_version}, older than the "
            f"trusted root v{root.version} (mix-and-match)")
    if release.root_version > root.version:
        raise BadVersionError(
            f"release v{release.version} names root v{release.root_version}, but the newest "
            f"root the box could verify is v{root.version}")
    verify_role(env, root, "release", f"release v{release.version}")
    if release.expires <= now:
        raise ExpiredMetadataError(
            f"release v{release.version} expired at {format_time(release.expires)} "
            f"(trusted time {format_time(now)}): the server may be frozen, or the operators "
            "must run opq-box-publish refresh")
    check_floors(release, floors)
    return release


def check_floors(release: Release, floors: Floors) -> None:
    """Refuse a release older than the floor (version, then issued time for equal versions)."""
    if release.version < floors.version:
        raise RollbackError(
            f"release v{release.version} is older than v{floors.version} already seen "
            "(rollback attack or a misconfigured server)")
    if (release.version == floors.version and floors.issued is not None
            and release.issued < floors.issued):
        raise RollbackError(
            f"release v{release.version} issued {release.issued_str} is older than the copy "
            f"already seen, issued {format_time(floors.issued)}")


def trusted_now(system_clock: datetime, newest_issued: datetime | None) -> datetime:
    """max(system clock, newest ``issued`` ever accepted): a box booting in 1970 still
    refuses metadata that expired before the newest release it has seen."""
    if newest_issued is not None and newest_issued > system_clock:
        return newest_issued
    return system_clock


def rollout_bucket(box_id: str, version: int) -> int:
    """The box's bucket 0-99 for a release (DESIGN 2.3)."""
    return int(hashlib.sha256(f"{box_id}:{version}".encode()).hexdigest(), 16) % 100


def in_rollout(box_id: str, version: int, rollout_percent: int) -> bool:
    return rollout_bucket(box_id, version) < rollout_percent
