"""The exception hierarchy of the updater.

Two roots follow python-tuf: :class:`RepositoryError` means the server served something bad
(signatures, expiry, rollback, hash, length, unsafe package: retrying the same bytes cannot
help), :class:`DownloadError` means the transfer failed (retried next run). The CLI maps each
class to its exit code in one place (``cli.EXIT_CODES``); nothing else decides exit codes.
"""

from __future__ import annotations


class UpdaterError(Exception):
    """Base of every error the updater raises on purpose."""


class ConfigError(UpdaterError):
    """The configuration file, the trust anchor or the command line is wrong (exit 2)."""


class LockError(UpdaterError):
    """Another run holds the lock (exit 6)."""

    def __init__(self, message: str, holder_pid: int | None = None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


class StateError(UpdaterError):
    """Local state cannot be read or written (unexpected: exit 1)."""


# --- the repository served something bad (exit 3) -------------------------------------------


class RepositoryError(UpdaterError):
    """Verification failed: the content the server served is not acceptable."""


class FormatError(RepositoryError):
    """A document is not valid JSON of the expected shape (floats, duplicate keys, types)."""


class UnsignedMetadataError(RepositoryError):
    """Not enough valid signatures from the role's keys."""


class BadVersionError(RepositoryError):
    """A root is not the exact next version, or a release names an unusable root version."""


class RollbackError(RepositoryError):
    """A release is older than one already seen (rollback attack)."""


class WrongChannelError(RepositoryError):
    """A validly signed release of another channel than the box's ``version_file``."""


class ExpiredMetadataError(RepositoryError):
    """A root or release has expired (freeze attack, or the operators forgot to refresh)."""


class LengthOrHashMismatchError(RepositoryError):
    """A download is longer than the signed length, or its sha256 differs."""


class UnsafePackageError(RepositoryError):
    """A verified package is unsafe or inconsistent: zip-slip, symlink, bomb, bad manifest."""


class NotPlainFileError(RepositoryError):
    """A ``--from`` directory has a symlink, FIFO, device or directory where the repository
    has a file: nothing a genuine export writes, so the stick is refused like bad content."""


# --- the transfer failed (exit 4) -----------------------------------------------------------


class DownloadError(UpdaterError):
    """The network or the server failed; the run is retried next time."""


class SlowRetrievalError(DownloadError):
    """The overall deadline (``timeouts.total``) passed."""


class MissingFileError(DownloadError):
    """A ``--from`` directory lacks a file of the repository: what HTTP 404 is over the
    network (exit 4; a root the release names but the source lacks is refused, 3)."""


class DownloadHTTPError(DownloadError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


# --- applying failed (exit 5) ---------------------------------------------------------------


class ApplyError(UpdaterError):
    """Applying the update failed; it was rolled back and the version marked failed."""

    def __init__(self, message: str, unrestored: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.unrestored = unrestored


class PostponedError(UpdaterError):
    """A pre-update.d hook vetoed the update; nothing changed, retried next run (exit 0)."""


class DpkgBusyError(PostponedError):
    """dpkg's lock stayed held (apt or another dpkg is running) past the bound.

    Nothing was started: an update waiting to be applied is postponed (exit 0, not marked
    failed); a recovery or rollback that cannot take the lock stops the run (exit 1) and
    leaves the journal as it is, so the next run does it.
    """


class SubprocessError(UpdaterError):
    """A command run through :func:`opq_box_updater.runner.run` failed or timed out."""

    def __init__(self, message: str, cmd: tuple[str, ...], returncode: int | None,
                 output_tail: str) -> None:
        super().__init__(message)
        self.cmd = cmd
        self.returncode = returncode
        self.output_tail = output_tail
