"""The fuzz targets: one function per parser, bytes in, checked properties out.

Each target feeds one input to code that reads hostile bytes and raises
:class:`~fuzz.sandbox.HarnessFailure` when a property breaks: an exception that is not the
project's own typed error, a file written outside the directory the code was given, or a
result that breaks the format's own rules (a time that does not round-trip, a manifest
naming a missing file). Nothing here imports atheris, so tests/test_fuzz_corpus.py runs every
seed and every regression input through the same properties in the normal test run.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opq_box_updater import metadata, package
from opq_box_updater.errors import FormatError, RepositoryError, UnsafePackageError

from .sandbox import HarnessFailure, listing, sandbox, typed_only

#: Small caps keep one input cheap; the checks are the same as with the defaults.
MAX_UNPACKED = 1024 * 1024
MANIFEST_VERSION = 3
#: The files a manifest may name in the manifest target's tree (and what they are).
MANIFEST_TREE = {"a_1.0_all.deb": "file", "b_2.0_all.deb": "file", "update.sh": "file",
                 "health.sh": "file", "data.txt": "file", "sub": "dir", "link.sh": "symlink"}


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise HarnessFailure(what)


def target_json(data: bytes) -> None:
    """Strict JSON: a result re-canonicalises to bytes that parse back to the same value."""
    try:
        doc = metadata.parse_json(data)
    except FormatError:
        return
    except Exception as exc:  # the harness judges every exception
        typed_only(exc)
        return
    try:
        again = metadata.parse_json(metadata.canonical_bytes(doc))
    except Exception as exc:
        raise HarnessFailure(f"parsed document does not re-canonicalise: {exc!r}") from exc
    _check(again == doc, "canonical form parses to another value")


def _time_round_trips(text: Any, parsed: Any, where: str) -> None:
    _check(metadata.format_time(parsed) == text,
           f"{where} {text!r} parsed to {parsed}, which formats differently")


def target_root(data: bytes) -> None:
    """Roots: parse_root's result keeps the format's rules; the anchor check raises only
    typed errors (it parses, then verifies the root's own signatures)."""
    try:
        root = metadata.parse_root(data)
    except RepositoryError:
        root = None
    except Exception as exc:
        typed_only(exc)
        return
    if root is not None:
        signed = root.envelope.signed
        _time_round_trips(signed["expires"], root.expires, "root expires")
        _check(root.version >= 1, "root version below 1")
        for keyid, public in root.keys.items():
            _check(len(public) == 32 and metadata.keyid_of(public) == keyid, "bad key")
        for role in root.roles.values():
            _check(1 <= role.threshold <= len(role.keyids), "threshold out of range")
            _check(all(k in root.keys for k in role.keyids), "role keyid without key")
    try:
        metadata.verify_trust_anchor(data)
    except RepositoryError:
        pass
    except Exception as exc:
        typed_only(exc)


def target_release(data: bytes) -> None:
    """Releases: parse_envelope then parse_release; a result keeps the format's rules."""
    try:
        release = metadata.parse_release(metadata.parse_envelope(data))
    except RepositoryError:
        return
    except Exception as exc:
        typed_only(exc)
        return
    signed = metadata.parse_envelope(data).signed
    _time_round_trips(signed["issued"], release.issued, "release issued")
    _time_round_trips(signed["expires"], release.expires, "release expires")
    _check(release.version >= 1 and release.root_version >= 1, "version below 1")
    _check(release.package.length >= 1, "package length below 1")
    _check(0 <= release.rollout_percent <= 100, "rollout_percent out of range")
    _check(release.package.path == f"packages/{release.package.sha256}.zip", "package path")
    _check(metadata.CHANNEL_PATTERN.fullmatch(release.channel) is not None, "channel")


def _make_manifest_tree(box: Path) -> None:
    for name, kind in MANIFEST_TREE.items():
        if kind == "file":
            (box / name).write_bytes(b"x")
        elif kind == "dir":
            (box / name).mkdir()
        else:
            (box / name).symlink_to("update.sh")


def target_manifest(data: bytes) -> None:
    """load_manifest over a fixed tree: a result names only regular top-level files of the
    package, for the expected version; the tree is left as it was."""
    with sandbox() as box:
        _make_manifest_tree(box)
        (box / package.MANIFEST_NAME).write_bytes(data)
        before = listing(box)
        try:
            manifest = package.load_manifest(box, MANIFEST_VERSION)
        except UnsafePackageError:
            manifest = None
        except Exception as exc:
            typed_only(exc)
            return
        _check(listing(box) == before, "load_manifest changed the directory")
        if manifest is None:
            return
        _check(manifest.version == MANIFEST_VERSION, "manifest of another version accepted")
        named = [*manifest.debs, *(n for n in (manifest.run, manifest.healthcheck) if n)]
        _check(bool(manifest.debs) or manifest.run is not None, "nothing to apply accepted")
        _check(len(set(named)) == len(named), "a file named twice")
        for name in named:
            _check(MANIFEST_TREE.get(name) == "file", f"manifest names {name!r}")
        _check(all(d.endswith(".deb") for d in manifest.debs), "a deb without .deb")


def target_zip(data: bytes) -> None:
    """extract_package: a result is a fresh directory under the parent holding only regular
    files (0600) and directories (0700); a refusal leaves the parent empty; nothing is
    written anywhere else."""
    with sandbox() as box:
        zip_path = box / "pkg.zip"
        zip_path.write_bytes(data)
        parent = box / "parent"
        parent.mkdir()
        try:
            dest = package.extract_package(zip_path, parent, max_unpacked_bytes=MAX_UNPACKED)
        except UnsafePackageError:
            _check(listing(box) == {"pkg.zip": stat.S_IFREG, "parent": stat.S_IFDIR},
                   "a refused extraction left something behind")
            return
        except Exception as exc:
            typed_only(exc)
            return
        _check(dest.parent == parent and dest.name.startswith("extract-"), "unexpected dest")
        _check(os.listdir(parent) == [dest.name], "more than one directory under the parent")
        outside = set(listing(box)) - {"pkg.zip", "parent"}
        inside_prefix = f"parent/{dest.name}"
        _check(all(p == inside_prefix or p.startswith(inside_prefix + "/") for p in outside),
               "written outside the extraction directory")
        total = 0
        for rel, kind in listing(dest).items():
            st = os.lstat(dest / rel)
            if kind == stat.S_IFREG:
                _check(stat.S_IMODE(st.st_mode) == 0o600, f"{rel} mode {st.st_mode:o}")
                total += st.st_size
            else:
                _check(kind == stat.S_IFDIR and stat.S_IMODE(st.st_mode) == 0o700,
                       f"{rel} is not a 0700 directory")
        _check(total <= MAX_UNPACKED, "more than max_unpacked_bytes written")


def target_deb(data: bytes) -> None:
    """read_deb (python-debian within bounds): a result has fields that match Debian's
    patterns; the sandbox holds only the input afterwards."""
    with sandbox() as box:
        path = box / "x_1_all.deb"
        path.write_bytes(data)
        try:
            info = package.read_deb(path, path.name)
        except UnsafePackageError:
            info = None
        except Exception as exc:
            typed_only(exc)
            return
        _check(listing(box) == {path.name: stat.S_IFREG}, "read_deb wrote into the sandbox")
        if info is not None:
            _check(package._PACKAGE_RE.fullmatch(info.package) is not None, "package name")
            _check(package._VERSION_RE.fullmatch(info.version) is not None, "version")
            _check(package._ARCH_RE.fullmatch(info.architecture) is not None, "architecture")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "json": target_json, "root": target_root, "release": target_release,
    "manifest": target_manifest, "zip": target_zip, "deb": target_deb,
}
