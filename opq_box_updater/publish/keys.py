"""Ed25519 signing keys on the publishing machine.

KEYDIR layout (mode 0700)::

    KEYDIR/root-<keyid[:12]>.pem       private key, mode 0600; .pub is the public key as 64
    KEYDIR/root-<keyid[:12]>.pub       lowercase hex digits and a newline (mode 0644)
    KEYDIR/release-<keyid[:12]>.pem
    KEYDIR/release-<keyid[:12]>.pub

With a passphrase a private key is sealed with scrypt (memory-hard: 2**17 x 8, 128 MiB per
guess) and AES-256-GCM in an ``OPQ SCRYPT ED25519 PRIVATE KEY`` PEM block (:mod:`.sealed`);
without one it is PKCS#8 PEM in the clear, and ``init`` says so. Keys written by earlier
versions (PKCS#8 with PBKDF2, ``BestAvailableEncryption``) still load.

The ``root-``/``release-`` prefix only records what a key was generated for; which role a key
actually holds is decided by the newest root document. Private key files are created with
``os.open(..., O_CREAT | O_EXCL, 0o600)``: they are never world-readable, not even for an
instant, and an existing key is never overwritten.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ..metadata import keyid_of
from .common import PublishError
from .sealed import SEALED_LABEL, seal, unseal

logger = logging.getLogger(__name__)

PASSPHRASE_ENV = "OPQ_PUBLISH_PASSPHRASE"
_HEX64 = re.compile(r"[0-9a-f]{64}")
KEY_ROLES = ("root", "release")


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a key's public half."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as written in a root: lowercase hex of the raw 32 bytes."""
    return public_bytes(key).hex()


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The keyid of a key (DESIGN 2.1): lowercase hex SHA-256 of its raw public bytes."""
    return keyid_of(public_bytes(key))


def read_passphrase(passphrase_file: Path | None = None) -> bytes | None:
    """The passphrase from ``passphrase_file`` (trailing newline stripped), else from
    ``$OPQ_PUBLISH_PASSPHRASE``; ``None`` (unencrypted keys) when neither is set or empty."""
    if passphrase_file is not None:
        try:
            with passphrase_file.open("rb") as handle:
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
                if mode & 0o077:
                    raise PublishError(
                        f"{passphrase_file} is readable or writable by group or others (mode "
                        f"{mode:o}): chmod 600 {passphrase_file}; the passphrase is not used")
                raw = handle.read()
        except OSError as exc:
            raise PublishError(f"{passphrase_file}: cannot read passphrase ({exc.strerror})"
                               ) from None
        value = raw.rstrip(b"\r\n")
    else:
        value = os.environ.get(PASSPHRASE_ENV, "").encode("utf-8")
    return value or None


@dataclass(frozen=True)
class KeyFile:
    """One key in KEYDIR: its id, public bytes and the private key file."""

    keyid: str
    public: bytes
    path: Path
    label: str  # "root" or "release": what it was generated for


class KeyStore:
    """The private keys in one KEYDIR; keys are decrypted only when a signature needs them."""

    def __init__(self, keydir: Path, passphrase: bytes | None = None) -> None:
        self.keydir = keydir
        self.passphrase = passphrase
        self._loaded: dict[Path, Ed25519PrivateKey] = {}  # one costly unsealing per key

    # --- creating -----------------------------------------------------------------------

    def ensure_dir(self) -> None:
        """Create KEYDIR with mode 0700 (warn when an existing one is open to others)."""
        self.keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.keydir.stat().st_mode)
        if mode & 0o077:
            logger.warning("%s is accessible by other users (mode %o): chmod 700 it",
                           self.keydir, mode)

    def generate(self, label: str) -> Ed25519PrivateKey:
        """Generate a new key and store it as ``<label>-<keyid[:12]>.pem`` (0600) and ``.pub``."""
        if label not in KEY_ROLES:
            raise ValueError(f"label must be one of {KEY_ROLES}")
        self.ensure_dir()
        key = Ed25519PrivateKey.generate()
        self.store(key, label)
        return key

    def store(self, key: Ed25519PrivateKey, label: str) -> Path:
        """Write ``key`` into KEYDIR; never overwrites and never exposes it to other users."""
        keyid = key_id(key)
        path = self.keydir / f"{label}-{keyid[:12]}.pem"
        if self.passphrase:
            pem = seal(key.private_bytes(serialization.Encoding.Raw,
                                         serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption()), self.passphrase)
        else:
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # O_EXCL: an existing key is never replaced; 0o600 from the first instant (the umask
        # can only remove bits), fchmod in case the umask removed the owner's read bit.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise PublishError(f"{path} already exists; refusing to overwrite a key") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        pub = path.with_suffix(".pub")
        pub.write_text(public_hex(key) + "\n", encoding="ascii")
        pub.chmod(0o644)
        return path

    # --- reading ------------------------------------------------------------------------

    def list_keys(self) -> list[KeyFile]:
        """Every key in KEYDIR (from the .pub files; falls back to the .pem when missing)."""
        found: list[KeyFile] = []
        if not self.keydir.is_dir():
            return found
        for pem in sorted(self.keydir.glob("*.pem")):
            label = pem.name.split("-", 1)[0]
            pub = pem.with_suffix(".pub")
            try:
                public = bytes.fromhex(pub.read_text(encoding="ascii").strip())
            except (OSError, ValueError):
                public = public_bytes(self._load(pem))
            found.append(KeyFile(keyid_of(public), public, pem, label))
        return found

    def has_keys(self) -> bool:
        return self.keydir.is_dir() and any(self.keydir.glob("*.pem"))

    def available(self, keyids: Iterable[str]) -> list[str]:
        """Those of ``keyids`` whose private key file is in KEYDIR (nothing is decrypted)."""
        wanted = set(keyids)
        return [k.keyid for k in self.list_keys() if k.keyid in wanted]

    def private_key(self, keyid: str) -> Ed25519PrivateKey:
        """Load the private key for ``keyid``; :class:`PublishError` when it is not here."""
        for pem in sorted(self.keydir.glob(f"*-{keyid[:12]}.pem")):
            key = self._load(pem)
            if key_id(key) == keyid:
                return key
        raise PublishError(f"no private key for keyid {keyid[:12]}... in {self.keydir}")

    def signing_keys(self, keyids: Iterable[str], threshold: int, what: str,
                     extra: Mapping[str, Ed25519PrivateKey] | None = None,
                     ) -> list[Ed25519PrivateKey]:
        """Every available private key among ``keyids``; at least ``threshold`` of them.

        ``extra`` maps keyids to keys held in memory (generated but not stored yet). Signing
        with all available keys (not just ``threshold``) keeps a document valid when one
        signature later turns out bad; the verifier counts distinct keyids anyway.
        """
        keyids = list(keyids)
        extra = extra or {}
        have = set(self.available(keyids)) | (set(extra) & set(keyids))
        if len(have) < threshold:
            missing = ", ".join(k[:12] for k in keyids if k not in have)
            raise PublishError(
                f"{what} needs {threshold} signature(s) but only {len(have)} of its keys are "
                f"in {self.keydir} (missing: {missing}); copy the private keys there")
        return [extra[k] if k in extra else self.private_key(k) for k in keyids if k in have]

    def _load(self, path: Path) -> Ed25519PrivateKey:
        if path in self._loaded:
            return self._loaded[path]
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            logger.warning("%s is readable by other users (mode %o): chmod 600 it", path, mode)
        data = path.read_bytes()
        if SEALED_LABEL.encode() in data:
            if self.passphrase is None:
                raise PublishError(
                    f"{path} is encrypted: set {PASSPHRASE_ENV} or pass --passphrase-file")
            try:
                sealed = Ed25519PrivateKey.from_private_bytes(unseal(data, self.passphrase))
            except ValueError as exc:
                raise PublishError(f"{path}: {exc}") from None
            self._loaded[path] = sealed
            return sealed
        try:
            key = serialization.load_pem_private_key(data, password=self.passphrase)
        except TypeError:
            # cryptography raises TypeError both for "encrypted, no password given" and for
            # "password given, key not encrypted".
            if self.passphrase is None:
                raise PublishError(
                    f"{path} is encrypted: set {PASSPHRASE_ENV} or pass --passphrase-file"
                ) from None
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            raise PublishError(f"{path}: wrong passphrase or not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise PublishError(f"{path} is not an Ed25519 key")
        self._loaded[path] = key
        return key


def parse_public_key(text: str) -> bytes:
    """A public key given on the command line: 64 hex digits, or a path to a ``.pub`` file
    (hex) or a ``.pem`` file (public key, or a private key whose public half is taken)."""
    candidate = text.strip().lower()
    if _HEX64.fullmatch(candidate):
        return bytes.fromhex(candidate)
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PublishError(f"{text!r} is neither 64 hex digits nor a readable key file "
                           f"({exc.strerror})") from None
    stripped = data.strip().decode("ascii", "replace").lower()
    if _HEX64.fullmatch(stripped):
        return bytes.fromhex(stripped)
    if b"PUBLIC KEY" in data:
        try:
            pub = serialization.load_pem_public_key(data)
        except ValueError:
            raise PublishError(f"{path}: not a PEM public key") from None
        if not isinstance(pub, Ed25519PublicKey):
            raise PublishError(f"{path} is not an Ed25519 key")
        return public_bytes(pub)
    if b"PRIVATE KEY" in data:
        key = KeyStore(path.parent, read_passphrase())._load(path)
        return public_bytes(key)
    raise PublishError(f"{path}: expected 64 hex digits or a PEM key")
