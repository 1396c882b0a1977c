"""The box's trusted state: every decision about *what to trust*, without I/O.

python-tuf's ``TrustedMetadataSet`` for this protocol. It is built from what the box stored
(the pinned anchor, the newest accepted root, one channel's floors, the time floor) and takes
the bytes the network served plus the system clock; it returns what was verified and what
the caller must persist, or raises a typed :class:`~opq_box_updater.errors.RepositoryError`.
The updater keeps the order of the steps, the fetching and the storing; it decides nothing
about trust. Rules (DESIGN 2.2-2.3, 3.1):

* the chain is walked from the newest trusted root one version at a time, at most
  :data:`~opq_box_updater.metadata.MAX_ROOT_STEPS` steps, only to the root a release names;
* the newest trusted root must not have expired, checked after the walk;
* a release must name exactly the newest trusted root, carry its channel's name, be signed
  by that root's release threshold, be unexpired at trusted time, and not be older than the
  channel's floors;
* when the trusted root's release role is not the one a floor was set under, the channel's
  floor falls back to its installed version and the time floor to the system clock
  (fast-forward recovery). Each floor remembers the release keys it was set under, so the
  fall-back happens whenever the change is first trusted for that floor: also on the run
  after a power cut that stored the new root but not the floors, and on a channel the box
  returns to after the rotation was walked on another.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from .errors import BadVersionError, ExpiredMetadataError, WrongChannelError
from .metadata import (
    MAX_ROOT_STEPS,
    Floors,
    Release,
    Root,
    check_floors,
    check_root_fresh,
    format_time,
    parse_envelope,
    parse_release,
    parse_root,
    release_keys_changed,
    release_keys_id,
    trusted_now,
    verify_next_root,
    verify_release,
    verify_trust_anchor,
)

#: A system clock this far behind the time floor is worth a warning (boxes without an RTC).
CLOCK_SKEW_WARNING = timedelta(days=1)


class StartingRoot(NamedTuple):
    """The root a run starts from, and whether the anchor must be (re)stored first."""

    root: Root
    store_anchor: bool  # the stored chain does not start at this anchor: verify, replace


def starting_root(anchor: bytes, stored_anchor: bytes | None,
                  newest_stored: bytes | None) -> StartingRoot:
    """Pick the root to start from: the newest stored root, never below the anchor.

    ``stored_anchor`` is the stored copy of the anchor's version, ``newest_stored`` the
    newest stored root above it. Roots are stored only after verification, so a stored
    chain that starts at this very anchor needs no signature check (no cryptography on the
    no-op path). A changed or missing copy means a new anchor was installed: it must meet
    its own root threshold, and the roots stored from an older anchor are superseded.
    """
    if stored_anchor != anchor:
        return StartingRoot(verify_trust_anchor(anchor), store_anchor=True)
    if newest_stored is None:
        return StartingRoot(parse_root(anchor), store_anchor=False)
    return StartingRoot(parse_root(newest_stored), store_anchor=False)


class Accepted(NamedTuple):
    """A verified release and everything the caller must persist for it, in this order:
    the new roots, then the channel's floors and the time floor."""

    release: Release
    root: Root  # the newest trusted root after any walk
    new_roots: tuple[tuple[int, bytes], ...]  # (version, bytes as served) to store
    floors: Floors  # the channel's new floors
    time_floor: datetime  # the newest issued ever accepted
    keys_id: str  # the release keys both floors are now set under (release_keys_id)
    floors_reset: bool  # the release keys changed since the floors were set: they fell back


class TrustedSet:
    """Trusted state of one channel for one run; verifies what the fetcher brings."""

    def __init__(self, root: Root, *, channel: str, floors: Floors,
                 time_floor: datetime | None, installed_version: int,
                 floors_keys: str | None = None, time_floor_keys: str | None = None) -> None:
        """``floors_keys``/``time_floor_keys``: the :func:`release_keys_id` each floor was
        set under; ``None`` (a state from before they were recorded) falls back only when
        this run walks to a root that changes the release keys."""
        self._start = root
        self._root = root
        self._new_roots: list[tuple[int, bytes]] = []
        self.channel = channel
        self.floors = floors
        self.floors_keys = floors_keys
        self.time_floor = time_floor
        self.time_floor_keys = time_floor_keys
        self.installed_version = installed_version

    @property
    def root(self) -> Root:
        """The newest trusted root: the starting root, or the last one accepted by a walk."""
        return self._root

    def now(self, clock: datetime) -> datetime:
        """trusted_now: max(system clock, time floor). A box booting in 1970 still refuses
        metadata that expired before the newest release it has seen."""
        return trusted_now(clock, self.time_floor)

    def clock_behind(self, clock: datetime) -> bool:
        """True when the system clock is far behind the time floor (worth a warning)."""
        return self.time_floor is not None and clock < self.time_floor - CLOCK_SKEW_WARNING

    # --- the root chain ----------------------------------------------------------------

    def roots_to_fetch(self, release_data: bytes) -> range:
        """The root versions to fetch, in order, before ``release_data`` can be verified:
        empty unless the release names a root newer than the trusted one."""
        named = parse_release(parse_envelope(release_data)).root_version
        if named - self._root.version > MAX_ROOT_STEPS:
            raise BadVersionError(f"release names root v{named}, more than {MAX_ROOT_STEPS} "
                                  f"steps past v{self._root.version}")
        return range(self._root.version + 1, named + 1)

    def update_root(self, data: bytes) -> Root:
        """Accept root N+1 (its version exactly N+1, signed by a threshold of N's root keys
        and of its own). Intermediate roots may be expired; nothing is stored until the
        release verifies too."""
        if len(self._new_roots) >= MAX_ROOT_STEPS:
            raise BadVersionError(f"more than {MAX_ROOT_STEPS} root steps in one run")
        new = verify_next_root(self._root, data)
        self._new_roots.append((new.version, data))
        self._root = new
        return new

    # --- the release -------------------------------------------------------------------

    def update_release(self, data: bytes, clock: datetime) -> Accepted:
        """Verify the channel's release against the newest trusted root, trusted time and
        the channel's floors; return it with the state to persist."""
        floors, time_floor = self.floors, self.time_floor
        if self._keys_changed(self.floors_keys):
            floors = Floors(self.installed_version, None)
        if self._keys_changed(self.time_floor_keys):
            time_floor = None
        now = trusted_now(clock, time_floor)
        # After the walk: a box whose stored root expired must still reach the new one.
        check_root_fresh(self._root, now)
        release = verify_release(self._root, data, now, Floors())
        # The channel before the floors: another channel's release is named as such, not
        # as a rollback.
        if release.channel != self.channel:
            raise WrongChannelError(
                f"release v{release.version} was published for channel {release.channel!r}, "
                f"but this box follows {self.channel!r} (version_file): another channel's "
                "release served at this path, or a misconfigured server")
        check_floors(release, floors)
        new_time = release.issued if time_floor is None or release.issued > time_floor \
            else time_floor
        return Accepted(release, self._root, tuple(self._new_roots),
                        Floors(release.version, release.issued), new_time,
                        release_keys_id(self._root), floors is not self.floors)

    def _keys_changed(self, keys_id: str | None) -> bool:
        if keys_id is None:
            return bool(self._new_roots) and release_keys_changed(self._start, self._root)
        return keys_id != release_keys_id(self._root)

    def check_cached(self, data: bytes, clock: datetime) -> Release:
        """The stored release the server says is unchanged (304): it was verified when
        stored, but the clock can have made it, or the root, unacceptable since."""
        stale = self._keys_changed(self.time_floor_keys)  # a stolen key's far-future issued
        now = trusted_now(clock, None if stale else self.time_floor)
        check_root_fresh(self._root, now)
        release = parse_release(parse_envelope(data))
        if release.root_version != self._root.version:
            # Verified under another root (a new anchor was installed since): its signers may
            # be revoked keys. Only a fresh, fully verified copy will do.
            raise BadVersionError(f"stored release v{release.version} names root "
                                  f"v{release.root_version}, not the trusted root "
                                  f"v{self._root.version}")
        if release.expires <= now:
            raise ExpiredMetadataError(
                f"release v{release.version} expired at {format_time(release.expires)} and "
                "the server still serves it (304): the operators must run "
                "opq-box-publish refresh")
        if release.channel != self.channel:  # the box was moved to another channel
            raise WrongChannelError(f"stored release is for channel {release.channel!r}, "
                                    f"not {self.channel!r}")
        check_floors(release, self.floors)
        return release
