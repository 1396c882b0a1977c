"""Receiving one box report: bounds, the signed envelope, the rate limit, the store.

Shared by the collector (``collector.py``, under gunicorn) and the development server
(``serve``), so both refuse exactly the same things. What a box sends is described in
``opq_box_updater/reporting.py``; the answers:

=====  ==========================================================================
204    accepted (stored), or unsigned and taken by ``serve`` (stored as unsigned)
400    not a report: bad JSON, nested too deep, bad envelope or fields
401    unsigned, and this server takes signed reports only (the collector)
403    bad signature; timestamp too far from the collector's clock; box rejected
409    counter not above the last accepted one (replay), or another key than the
       box id is known by (the report is stored as a *conflict*, never merged)
413    body over :data:`REPORT_MAX_BYTES` (checked by the caller before reading)
429    over the box's rate limit
507    store full (too many boxes, or conflicts of one box)
=====  ==========================================================================

**Timestamps.** Box clocks are often wrong (no RTC; a box that booted in 1970), so the
counter, not the time, is the replay defence. A box signs its *trusted* time (never before
the newest release it accepted; releases expire after 30 days by default), and the
collector refuses only a timestamp more than :data:`CLOCK_TOLERANCE` away from its own
clock either way: such a report is either very old (held back and delivered late) or from
a box whose clock would already make it refuse its releases.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..errors import RepositoryError
from ..metadata import Envelope, keyid_of, parse_envelope, parse_time
from .store import (
    ACCEPTED,
    CONFLICT,
    FULL,
    REJECTED,
    REPLAYED,
    UNSIGNED,
    ReportRecord,
    Store,
    box_id_problem,
)

logger = logging.getLogger(__name__)

REPORT_MAX_BYTES = 16 * 1024
#: Reports nest 2 or 3 deep; deeper is refused before parsing (a 5000-deep body once raised
#: an uncaught RecursionError in serve's request thread).
REPORT_MAX_DEPTH = 32
CLOCK_TOLERANCE = timedelta(days=30)
#: Unsigned reports (``serve`` only) are refused with 507 beyond this many stored reports.
MAX_UNSIGNED_REPORTS = 100_000
#: Per box (and key): a burst of RATE_BURST reports, then one per RATE_SECONDS. A box
#: reports once a day from cron; a few manual runs fit in the burst.
RATE_BURST = 10
RATE_SECONDS = 60.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_SIGNED_FIELDS = {"type", "spec_version", "box_id", "counter", "timestamp", "public_key",
                  "report"}


@dataclass(frozen=True)
class Answer:
    """The HTTP status and one line of text for the box (and the log)."""

    status: int
    message: str


class Refused(Exception):
    """A report refused with an HTTP status (4xx/5xx) and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RateLimiter:
    """Token buckets per key, at most ``max_keys`` remembered (least recently used
    forgotten first), thread-safe. Each gunicorn worker has its own: the limit a box sees
    is per worker; nginx's ``limit_req`` per address bounds the total."""

    def __init__(self, burst: int = RATE_BURST, seconds: float = RATE_SECONDS,
                 max_keys: int = 100_000) -> None:
        self.burst, self.seconds, self.max_keys = burst, seconds, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> bool:
        moment = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), moment))
            tokens = min(float(self.burst), tokens + (moment - last) / self.seconds)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, moment)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return allowed


def json_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest in ``text``, outside strings; linear and iterative, so
    it is safe to run on any body before :func:`json.loads` (which recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _box_id(value: Any) -> str:
    problem = box_id_problem(value)
    if problem is not None:
        raise Refused(400, problem)
    assert isinstance(value, str)
    return value


def parse_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (strict: no floats in signed reports, no duplicate keys;
    unsigned ones are plain JSON, though with no lone surrogates), or :class:`Refused`
    (400)."""
    try:
        text = body.decode("utf-8")
        if json_depth(text) > REPORT_MAX_DEPTH:
            raise Refused(400, f"nested deeper than {REPORT_MAX_DEPTH} levels")
        doc = json.loads(text)
        # A lone surrogate ("\ud800") parses but has no UTF-8: storing it raised in the
        # store, and serve's request died without an answer.
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, ValueError, RecursionError):  # UnicodeEncodeError too
        raise Refused(400, "not a JSON object") from None
    if not isinstance(doc, dict):
        raise Refused(400, "not a JSON object")
    return doc


def verify_signed(body: bytes, received: datetime, remote: str) -> ReportRecord:
    """The signed report in ``body``, checked: strict JSON (no floats, no duplicate keys),
    envelope and fields, one valid signature
    by the key it names, a plausible timestamp. Not yet checked against the box's known key
    and counter (that is :meth:`Store.admit`)."""
    try:
        env: Envelope = parse_envelope(body)
    except RepositoryError as exc:
        raise Refused(400, f"bad report envelope: {exc}") from None
    signed = env.signed
    if set(signed) != _SIGNED_FIELDS or signed["type"] != "report":
        raise Refused(400, "a signed report has exactly the fields "
                      f"{', '.join(sorted(_SIGNED_FIELDS))} and type 'report'")
    box_id = _box_id(signed["box_id"])
    counter, public, report = signed["counter"], signed["public_key"], signed["report"]
    if type(counter) is not int or not 0 < counter < 2**62:
        raise Refused(400, "counter must be a positive integer")
    if not isinstance(public, str) or not _HEX64.fullmatch(public):
        raise Refused(400, "public_key must be 64 lowercase hex digits")
    if not isinstance(report, dict) or report.get("box_id", box_id) != box_id:
        raise Refused(400, "report must be an object about the signing box_id")
    try:
        timestamp = parse_time(signed["timestamp"] if isinstance(signed["timestamp"], str)
                               else "", "timestamp")
    except RepositoryError as exc:
        raise Refused(400, str(exc)) from None
    key_id = keyid_of(bytes.fromhex(public))
    message = env.signed_bytes
    if not any(kid == key_id and _signature_valid(public, sig, message)
               for kid, sig in env.signatures):
        raise Refused(403, "bad signature: no valid signature by the key the report names")
    if abs(timestamp - received) > CLOCK_TOLERANCE:
        raise Refused(403, f"timestamp {signed['timestamp']} is more than "
                      f"{CLOCK_TOLERANCE.days} days from the collector's clock; fix the "
                      "box's clock")
    return ReportRecord(box_id, received, remote, report, ACCEPTED, key_id, counter,
                        timestamp, public)


def _signature_valid(public_hex: str, sig_hex: str, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not _HEX128.fullmatch(sig_hex):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(sig_hex), message)
    except InvalidSignature:
        return False
    return True


_ADMIT_ANSWERS = {
    ACCEPTED: Answer(204, "accepted"),
    CONFLICT: Answer(409, "this box id is known by another key: stored as a conflict for "
                          "the operator (opq-box-publish boxes)"),
    REPLAYED: Answer(409, "counter not above the last accepted report's: replay refused"),
    REJECTED: Answer(403, "this box is rejected by the operator"),
    FULL: Answer(507, "the collector takes no more boxes or conflicts"),
}


def receive(store: Store, body: bytes, remote: str, received: datetime,
            limiter: RateLimiter, *, allow_unsigned: bool = False) -> Answer:
    """Decide and store one report body; never raises for anything the client sent."""
    try:
        if len(body) > REPORT_MAX_BYTES:
            raise Refused(413, f"reports are limited to {REPORT_MAX_BYTES} bytes")
        doc = parse_body(body)
        if "signed" not in doc:
            return _unsigned(store, doc, remote, received, limiter, allow_unsigned)
        record = verify_signed(body, received, remote)
        if not limiter.allow(f"{record.box_id}\0{record.key_id}"):
            raise Refused(429, "too many reports from this box; try later")
        answer = _ADMIT_ANSWERS[store.admit(record)]
        if answer.status != 204:
            logger.warning("report of box %r (key %s, counter %d) from %s: %s",
                           record.box_id, (record.key_id or "")[:16], record.counter or 0,
                           remote, answer.message)
        return answer
    except Refused as exc:
        return Answer(exc.status, str(exc))


def _unsigned(store: Store, doc: dict[str, Any], remote: str, received: datetime,
              limiter: RateLimiter, allow: bool) -> Answer:
    box_id = _box_id(doc.get("box_id"))
    if not allow:
        raise Refused(401, "reports must be signed by the box's report key")
    if not limiter.allow(f"{box_id}\0unsigned"):
        raise Refused(429, "too many reports from this box; try later")
    if store.report_count() >= MAX_UNSIGNED_REPORTS:
        raise Refused(507, "too many reports stored")
    store.add(ReportRecord(box_id, received, remote, doc, UNSIGNED, None))
    return Answer(204, "stored unsigned")
