"""What the updater reads a repository through: a :class:`Source`.

Two implement it: :class:`~opq_box_updater.fetcher.Fetcher` (HTTP, ``server_url``) and
:class:`~opq_box_updater.localsource.LocalSource` (a directory such as a USB stick,
``--from DIR``). Both only *deliver bytes* within limits; every trust decision is taken on
those bytes by the same code (``trust``, ``metadata``, the updater), so the two paths cannot
drift apart in what they accept.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol


class MetadataResponse(NamedTuple):
    """The answer to a (conditional) metadata request.

    ``status`` is 200 (``body`` holds at most ``max_bytes`` bytes) or 304 (``body`` is None).
    ``etag`` and ``last_modified`` are the validators to send next time; on a 304 they are the
    server's if it repeated them, else the ones the request carried. A local source always
    answers 200 without validators.
    """

    status: int
    body: bytes | None
    etag: str | None
    last_modified: str | None


class Source(Protocol):
    """Delivers a repository's files (DESIGN 2 layout) under size limits; verifies nothing
    but the package's signed length and SHA-256, which it must check while copying."""

    def fetch_metadata(self, relpath: str, max_bytes: int = 65536, *, etag: str | None = None,
                       last_modified: str | None = None) -> MetadataResponse:
        """``relpath`` capped at ``max_bytes`` (more: LengthOrHashMismatchError, exit 3)."""

    def fetch_package(self, relpath: str, dest_dir: Path, sha256: str, length: int) -> Path:
        """``relpath`` as ``dest_dir/<sha256>.zip``, which exists only when it matches."""

    def close(self) -> None:
        """Release what the source holds (connections, directory handles)."""
