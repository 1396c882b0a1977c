"""The box's signed status reports (issue 10): its own Ed25519 key and a counter.

Each box has a report key, ``<state_dir>/report_key.pem`` (PKCS#8 PEM, 0600, owned by the
updater's user), made once by the package's postinst (``python3 -m
opq_box_updater.reporting --make-key``) or, when missing, by the first run that reports,
and only in a state directory that is the updater's own (:func:`~.fsutil.unsafe_dir_reason`).
The private key never leaves the box; the collector learns the public key from the box's
first report (trust on first use) and from then on accepts only that key for that box id.

A report is a DESIGN 2.1 envelope signed by that key::

    {"signed": {"type": "report", "spec_version": 1, "box_id": "…", "counter": 42,
                "timestamp": "2031-01-02T03:04:05Z", "public_key": "<hex>",
                "report": {…the run's result…}},
     "signatures": [{"keyid": "<sha256 of the public key>", "sig": "<hex>"}]}

``counter`` grows by one for every report and is persisted (atomically, fsync) *before*
the report is sent, so a report lost on the way or a power cut never reuses a number: the
collector refuses any counter not above the last one it accepted (replay). ``timestamp`` is
the box's trusted time (the system clock, but never before the newest release it accepted),
only a plausibility check for the collector: box clocks are often wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fsutil import atomic_write, fsync_dir, unsafe_dir_reason, unsafe_file_reason
from .metadata import SPEC_VERSION, format_time, keyid_of, make_envelope

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_NAME = "report_key.pem"
COUNTER_NAME = "report_counter"
DEFAULT_STATE_DIR = Path("/var/lib/opq-box-updater")
MAX_COUNTER = 2**62  # far beyond any fleet's life; keeps the number a BIGINT everywhere
#: JSON-encoded bytes of one text field of a report (the message and the error carry a run
#: script's output line, up to 4000 characters): the collector refuses reports over 16 KiB,
#: and a failed run's report, the one the rollout health needs, was the one that grew.
MAX_TEXT_BYTES = 3000


class ReportKeyError(Exception):
    """The report key or counter cannot be used; the report is not sent (the run goes on)."""


def load_or_make_key(state_dir: Path) -> Ed25519PrivateKey:
    """The box's report key, made (0600, atomically, never replacing one another process
    made meanwhile) when missing and ``state_dir`` is the updater's own directory."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = state_dir / KEY_NAME
    if not os.path.lexists(path):
        _make_key(state_dir)
    why = unsafe_file_reason(path, state_dir)
    if why is None and os.lstat(path).st_mode & 0o077:
        why = f"is readable by group or others (mode {os.lstat(path).st_mode & 0o777:04o})"
    if why is not None:
        raise ReportKeyError(f"{path} {why}; not using it")
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ReportKeyError(f"{path}: cannot read the report key ({exc})") from None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(key, Ed25519PrivateKey):
        raise ReportKeyError(f"{path} is not an Ed25519 key")
    return key


def _make_key(state_dir: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    why = unsafe_dir_reason(state_dir)
    if why is not None or not state_dir.is_dir():
        raise ReportKeyError(f"not making a report key in {state_dir}: it "
                             f"{why or 'does not exist'}")
    pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd, tmp = tempfile.mkstemp(prefix=f".{KEY_NAME}.", dir=state_dir)  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process made one first: keep it
            os.link(tmp, state_dir / KEY_NAME)
    finally:
        os.unlink(tmp)
    fsync_dir(state_dir)


def public_hex(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def next_counter(state_dir: Path) -> int:
    """Bump the report counter and persist it durably; returns the new value. A missing
    file starts at 1; an unreadable one is an error (restarting from 1 would only be
    refused as a replay: the operator re-keys the box, see ``opq-box-publish boxes``)."""
    path = state_dir / COUNTER_NAME
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = "0"
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportKeyError(f"{path}: cannot read the report counter ({exc})") from None
    if not text.isdigit() or int(text) >= MAX_COUNTER:
        raise ReportKeyError(f"{path}: not a report counter: {text[:40]!r}")
    value = int(text) + 1
    atomic_write(path, f"{value}\n".encode("ascii"), 0o600)
    return value


def sign_report(report: dict[str, Any], box_id: str, key: Ed25519PrivateKey, counter: int,
                now: datetime) -> dict[str, Any]:
    """The signed envelope of ``report`` (which must hold no floats: DESIGN 2.1)."""
    public = public_hex(key)
    signed = {"type": "report", "spec_version": SPEC_VERSION, "box_id": box_id,
              "counter": counter, "timestamp": format_time(now), "public_key": public,
              "report": report}
    envelope = make_envelope(signed, [key])
    assert envelope["signatures"][0]["keyid"] == keyid_of(bytes.fromhex(public))
    return envelope


def clip_text(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """``text`` cut in the middle (its start and its end kept) to at most ``limit`` bytes
    as JSON with ASCII escapes (how the report is sent: "É" costs 6, an emoji 12), lone
    surrogates replaced (they have no canonical bytes: the report could not be signed)."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(json.dumps(text)) <= limit:
        return text
    budget = limit - 2 - 40  # the quotes and the marker
    head = _fitting(text, budget // 3)
    tail = _fitting(text[::-1], budget - budget // 3)
    cut = len(text) - head - tail
    return f"{text[:head]} [...{cut} characters cut...] {text[len(text) - tail:]}"


def _fitting(chars: str, budget: int) -> int:
    """How many of ``chars``, from the start, fit in ``budget`` bytes of JSON."""
    used = count = 0
    for char in chars:
        used += len(json.dumps(char)) - 2
        if used > budget:
            break
        count += 1
    return count


def signed_report(state_dir: Path, report: dict[str, Any], box_id: str,
                  now: datetime) -> dict[str, Any]:
    """Load (or make) the key, bump the counter, sign: what the box sends, its text fields
    bounded (:func:`clip_text`) so that the collector takes it."""
    key = load_or_make_key(state_dir)
    report = {name: clip_text(value) if isinstance(value, str) else value
              for name, value in report.items()}
    return sign_report(report, box_id, key, next_counter(state_dir), now)


def main(argv: list[str]) -> int:
    """``--make-key [STATE_DIR]`` (postinst): make the report key once; print its key id."""
    if not argv or argv[0] != "--make-key" or len(argv) > 2:
        print("usage: python3 -m opq_box_updater.reporting --make-key [STATE_DIR]",
              file=sys.stderr)
        return 2
    state_dir = Path(argv[1]) if len(argv) == 2 else DEFAULT_STATE_DIR
    try:
        key = load_or_make_key(state_dir)
    except ReportKeyError as exc:
        print(f"opq-box-updater: {exc}", file=sys.stderr)
        return 1
    print(keyid_of(bytes.fromhex(public_hex(key))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
