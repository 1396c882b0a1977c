"""Private keys at rest: scrypt (memory-hard) and AES-256-GCM, in a PEM block.

PKCS#8's ``BestAvailableEncryption`` in python3-cryptography 38 (Debian 12) is PBKDF2 with
2048 iterations, cheap to guess on a GPU, and the OpenSSH format's bcrypt KDF needs the
``bcrypt`` module, which Debian's cryptography does not pull in. So the seal is built from
cryptography's own primitives: scrypt with N=2**17, r=8, p=1 (128 MiB per guess, about
0.3 s on a PC) derives the key; AES-GCM authenticates everything, so a wrong passphrase and
a tampered file are both refused. The cost parameters are stored in the block (and bounded
when read), so they can be raised later without breaking older files.

Block body (base64): ``b"OPQK1"``, log2(N), r, p (one byte each), 16-byte salt, 12-byte
nonce, AES-GCM ciphertext of the 32 raw private bytes with its 16-byte tag; the header bytes
before the ciphertext are the associated data.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SEALED_LABEL = "OPQ SCRYPT ED25519 PRIVATE KEY"
_MAGIC = b"OPQK1"
LOG2_N, R, P = 17, 8, 1
#: What a sealed file may ask for when read: at least 2**14, at most 2**20 x 8 (1 GiB).
_MIN_LOG2_N, _MAX_LOG2_N, _MAX_R, _MAX_P = 14, 20, 8, 4
_SALT, _NONCE, _RAW, _TAG = 16, 12, 32, 16
_BLOCK = re.compile(rf"-----BEGIN {SEALED_LABEL}-----\s+([A-Za-z0-9+/=\s]+?)\s*"
                    rf"-----END {SEALED_LABEL}-----")


def _kdf(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2 ** log2_n, r=r, p=p).derive(passphrase)


def seal(raw_private: bytes, passphrase: bytes, *, log2_n: int = LOG2_N) -> bytes:
    """The PEM text of ``raw_private`` (32 bytes) sealed with ``passphrase``."""
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    header = _MAGIC + bytes((log2_n, R, P)) + salt + nonce
    body = AESGCM(_kdf(passphrase, salt, log2_n, R, P)).encrypt(nonce, raw_private, header)
    text = base64.encodebytes(header + body).decode("ascii")
    return f"-----BEGIN {SEALED_LABEL}-----\n{text}-----END {SEALED_LABEL}-----\n".encode()


def unseal(data: bytes, passphrase: bytes) -> bytes:
    """The 32 raw private bytes; ValueError (saying which) on a wrong passphrase, a damaged
    file, or cost parameters outside the accepted bounds."""
    found = _BLOCK.search(data.decode("ascii", "replace"))
    if found is None:
        raise ValueError(f"not a {SEALED_LABEL} block")
    try:
        blob = base64.b64decode("".join(found.group(1).split()), validate=True)
    except binascii.Error:
        raise ValueError("damaged key file (bad base64)") from None
    head = len(_MAGIC) + 3 + _SALT + _NONCE
    if len(blob) != head + _RAW + _TAG or not blob.startswith(_MAGIC):
        raise ValueError("damaged key file (unexpected length or format)")
    log2_n, r, p = blob[len(_MAGIC):len(_MAGIC) + 3]
    if not (_MIN_LOG2_N <= log2_n <= _MAX_LOG2_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError(f"scrypt parameters 2**{log2_n}, {r}, {p} are out of bounds")
    salt = blob[len(_MAGIC) + 3:len(_MAGIC) + 3 + _SALT]
    nonce = blob[head - _NONCE:head]
    try:
        return AESGCM(_kdf(passphrase, salt, log2_n, r, p)).decrypt(nonce, blob[head:],
                                                                     blob[:head])
    except InvalidTag:
        raise ValueError("wrong passphrase, or the key file was changed") from None
