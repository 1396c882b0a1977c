"""A repository simulator for attack tests (python-tuf ``tests/repository_simulator.py`` style).

``RepoSim`` wraps a real repository directory (created by the real ``init_repo``) and its
KEYDIR, keeps every key it has made in memory, and lets a test build any state in a line or
two: honest releases through the real publishing library, and dishonest ones with arbitrary
fields and arbitrary signers through :mod:`opq_box_updater.metadata`'s signing helpers. The
directory can be served by ``opq-box-publish serve`` (or nginx) unchanged.

Quick reference::

    sim = RepoSim(tmp_path / "repo")              # root v1: 1 root key, 1 release key
    sim.anchor                                     # root/1.root.json: the box's trust_root
    sim.release(1)                                 # honest v1 via build_package + publish_release
    sim.publish(2)                                 # v2 signed by the release keys (run script)
    sim.publish(3, expires=sim.now - DAY)          # freeze: validly signed but expired
    sim.publish(1)                                 # rollback: an older, validly signed release
    sim.publish(4, signers=[sim.stranger()])       # arbitrary package signed by a stranger
    sim.publish(4, signers=[k, k])                 # duplicate signatures from one key
    sim.publish(4, package=sim.make_package(3))    # wrong software: manifest says 3
    sim.publish(4, length=10)                      # signed length shorter than the package
    sim.publish(4, root_version=1)                 # names an old root (mix-and-match)
    sim.publish(4, extra={"rollout_percent": 0})   # any signed field; value None deletes it
    sim.rotate("release")                          # root v2: a new release key, releases re-signed
    sim.rotate("root", signers=sim.root_keys[:1])  # root v3 under-signed (threshold attack)
    sim.rotate("root", version=7)                  # root that skips versions
    sim.lib_rotate("release", threshold=1)         # the real rotate_role (add/remove/threshold)
    sim.write("version.json", b"{...}")            # raw bytes for any path
    sim.flip_byte("packages/<sha>.zip")            # tampering

Attributes and helpers:

* ``path`` (the repository), ``keydir`` (real KEYDIR layout), ``anchor`` / ``anchor_bytes``.
* ``now``: the clock of every default ``issued``/``expires``/root ``expires`` (whole-second
  UTC; settable). Defaults: releases expire ``now + 30 days``, roots ``now + 2 years``.
* ``keys``: keyid -> ``Ed25519PrivateKey`` for every key made (strangers included);
  ``root_keys`` / ``release_keys``: the private keys of the newest root's roles.
* ``root`` (the newest :class:`~opq_box_updater.metadata.Root` on disk), ``root_doc(v)``
  (a deep copy of root v's ``signed`` dict, to modify and :meth:`sign`).
* :meth:`make_package` builds a zip in memory from debs/run/healthcheck bytes, a manifest
  override and raw members (hostile names included); :meth:`add_package` stores bytes under
  ``packages/<sha256>.zip`` and returns the ``package`` dict a release signs.
* :meth:`sign` turns any ``signed`` dict into envelope bytes with any list of keys (repeat a
  key for duplicate signatures) plus raw ``extra_signatures``.
* :meth:`release_doc` is the ``signed`` dict a release would have; :meth:`publish` writes it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import stat
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opq_box_updater.fsutil import utcnow
from opq_box_updater.metadata import (
    SPEC_VERSION,
    Release,
    Root,
    format_time,
    make_envelope,
    parse_envelope,
    parse_release,
    parse_root,
)
from opq_box_updater.package import MANIFEST_FORMAT, MANIFEST_NAME
from opq_box_updater.publish import build, repo, rotate
from opq_box_updater.publish.keys import KeyStore, key_id, public_hex

DAY = timedelta(days=1)
RELEASE_LIFETIME = timedelta(days=30)
ROOT_LIFETIME = timedelta(days=730)
DEFAULT_RUN = b"#!/bin/sh\nexit 0\n"


class RepoSim:
    """A repository plus its keys, in which any honest or hostile state is one call away."""

    def __init__(self, path: Path, *, root_keys: int = 1, root_threshold: int = 1,
                 release_keys: int = 1, release_threshold: int = 1,
                 now: datetime | None = None, keydir: Path | None = None) -> None:
        self.path = path
        self.keydir = keydir if keydir is not None else path.parent / f"{path.name}-keys"
        self.now = now if now is not None else utcnow()
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.store = KeyStore(self.keydir)
        repo.init_repo(path, self.keydir, root_keys=root_keys, root_threshold=root_threshold,
                       release_keys=release_keys, release_threshold=release_threshold,
                       expires=ROOT_LIFETIME, now=self.now)
        self._load_keydir()

    # --- keys and roots ------------------------------------------------------------------

    def _load_keydir(self) -> None:
        for entry in self.store.list_keys():
            if entry.keyid not in self.keys:
                self.keys[entry.keyid] = self.store.private_key(entry.keyid)

    def new_key(self, role: str = "release", store: bool = True) -> Ed25519PrivateKey:
        """A fresh key, remembered in ``keys`` (and written to KEYDIR when ``store``)."""
        key = Ed25519PrivateKey.generate()
        self.keys[key_id(key)] = key
        if store:
            self.store.store(key, role)
        return key

    def stranger(self) -> Ed25519PrivateKey:
        """A key no root lists (an attacker's), not written to KEYDIR."""
        return self.new_key(store=False)

    @property
    def anchor(self) -> Path:
        return repo.root_file(self.path, 1)

    @property
    def anchor_bytes(self) -> bytes:
        return self.anchor.read_bytes()

    @property
    def root(self) -> Root:
        """The newest root on disk (structure checked, signatures not)."""
        return parse_root(repo.root_file(self.path, self.root_version).read_bytes())

    @property
    def root_version(self) -> int:
        return max(repo.root_versions(self.path))

    def root_doc(self, version: int | None = None) -> dict[str, Any]:
        """A deep copy of root ``version``'s signed part (default the newest)."""
        data = repo.root_file(self.path, version or self.root_version).read_bytes()
        return copy.deepcopy(parse_envelope(data).signed)

    def role_keys(self, role: str, version: int | None = None) -> list[Ed25519PrivateKey]:
        """The private keys the simulator holds for ``role`` of root ``version``."""
        keyids = self.root_doc(version)["roles"][role]["keyids"]
        return [self.keys[k] for k in keyids if k in self.keys]

    @property
    def root_keys(self) -> list[Ed25519PrivateKey]:
        return self.role_keys("root")

    @property
    def release_keys(self) -> list[Ed25519PrivateKey]:
        return self.role_keys("release")

    # --- raw files -------------------------------------------------------------------------

    def write(self, relpath: str, data: bytes) -> Path:
        """Write raw bytes at ``relpath`` in the repository (directories created)."""
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def read(self, relpath: str) -> bytes:
        return (self.path / relpath).read_bytes()

    def remove(self, relpath: str) -> None:
        (self.path / relpath).unlink()

    def flip_byte(self, relpath: str, offset: int = -1) -> None:
        """Tamper with one byte of a file (default the last one)."""
        data = bytearray(self.read(relpath))
        data[offset] ^= 0x01
        self.write(relpath, bytes(data))

    # --- signing ---------------------------------------------------------------------------

    @staticmethod
    def sign(signed: Mapping[str, Any], signers: Iterable[Ed25519PrivateKey],
             extra_signatures: Sequence[Mapping[str, str]] = ()) -> bytes:
        """Envelope bytes for ``signed`` with one signature per signer (repeats allowed)
        and ``extra_signatures`` ({"keyid", "sig"} dicts, e.g. garbage) appended."""
        envelope = make_envelope(dict(signed), list(signers))
        envelope["signatures"].extend(dict(s) for s in extra_signatures)
        return (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode()

    # --- packages --------------------------------------------------------------------------

    @staticmethod
    def make_package(version: int, *, debs: Mapping[str, bytes] | None = None,
                     run: bytes | None = DEFAULT_RUN, run_name: str = "update.sh",
                     healthcheck: bytes | None = None,
                     manifest: Mapping[str, Any] | None = None,
                     members: Mapping[str, bytes] | Sequence[tuple[str, bytes]] | None = None,
                     symlinks: Mapping[str, str] | None = None) -> bytes:
        """A package zip in memory (deflated, fixed times, regular-file modes).

        ``manifest`` entries override the computed manifest (None deletes a key, except
        ``run``/``healthcheck`` where it is the JSON null). ``members`` given as a mapping
        adds or replaces members under any name (``{"manifest.json": b"..."}`` for raw
        manifest bytes, ``{"../x": b""}`` for zip-slip); given as (name, bytes) pairs they
        are appended as they are, so a name may repeat. ``symlinks`` adds symlink members
        (name -> target).
        """
        doc: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": version,
                               "debs": list(debs or {}), "run": run_name if run else None,
                               "healthcheck": "healthcheck.sh" if healthcheck else None}
        for key, value in (manifest or {}).items():
            if value is None and key not in ("run", "healthcheck"):
                doc.pop(key, None)
            else:
                doc[key] = value
        files: dict[str, bytes] = {MANIFEST_NAME: json.dumps(doc, sort_keys=True).encode()}
        files.update(debs or {})
        if run:
            files[run_name] = run
        if healthcheck:
            files["healthcheck.sh"] = healthcheck
        appended: list[tuple[str, bytes]] = []
        if isinstance(members, Mapping):
            files.update(members)
        elif members is not None:
            appended = list(members)
        buffer = io.BytesIO()
        with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as zf:
            warnings.simplefilter("ignore")  # "Duplicate name" is the point of some tests
            for name, data in [*files.items(), *appended]:
                zf.writestr(_zipinfo(name, stat.S_IFREG | 0o644), data)
            for name, target in (symlinks or {}).items():
                zf.writestr(_zipinfo(name, stat.S_IFLNK | 0o777), target)
        return buffer.getvalue()

    def add_package(self, data: bytes) -> dict[str, Any]:
        """Store ``data`` as ``packages/<sha256>.zip``; return the release's package dict."""
        sha = hashlib.sha256(data).hexdigest()
        path = f"{repo.PACKAGES_DIR}/{sha}.zip"
        self.write(path, data)
        return {"path": path, "sha256": sha, "length": len(data)}

    # --- releases --------------------------------------------------------------------------

    def current(self, version_file: str = "version.json") -> Release | None:
        """The release in ``version_file`` (unverified), or None."""
        try:
            return parse_release(parse_envelope(self.read(version_file)))
        except FileNotFoundError:
            return None

    def release_doc(self, version: int, package: Mapping[str, Any], *,
                    issued: datetime | None = None, expires: datetime | None = None,
                    root_version: int | None = None, rollout: int = 100,
                    notes: str = "", channel: str = "version.json") -> dict[str, Any]:
        """The ``signed`` dict of a release (defaults: issued now, expires now + 30 days,
        the newest root)."""
        issued = issued or self.now
        return {"type": "release", "spec_version": SPEC_VERSION, "version": version,
                "root_version": root_version or self.root_version, "channel": channel,
                "issued": format_time(issued),
                "expires": format_time(expires or issued + RELEASE_LIFETIME),
                "package": dict(package), "rollout_percent": rollout, "notes": notes}

    def publish(self, version: int | None = None, *, package: bytes | None = None,
                version_file: str = "version.json",
                signers: Iterable[Ed25519PrivateKey] | None = None,
                extra_signatures: Sequence[Mapping[str, str]] = (),
                issued: datetime | None = None, expires: datetime | None = None,
                root_version: int | None = None, rollout: int = 100, notes: str = "",
                length: int | None = None, sha256: str | None = None,
                path: str | None = None, extra: Mapping[str, Any] | None = None,
                store_package: bool = True) -> bytes:
        """Write ``version_file`` with any content and return its bytes.

        ``version`` defaults to the current one + 1; ``package`` to
        :meth:`make_package(version)`; ``signers`` to the newest root's release keys.
        ``length``/``sha256``/``path`` override what is signed (the stored package keeps
        its real name unless ``store_package`` is False, then nothing is stored);
        ``extra`` overrides any signed field (None deletes it).
        """
        if version is None:
            current = self.current(version_file)
            version = current.version + 1 if current else 1
        data = package if package is not None else self.make_package(version)
        if store_package:
            ref = self.add_package(data)
        else:
            sha = hashlib.sha256(data).hexdigest()
            ref = {"path": f"{repo.PACKAGES_DIR}/{sha}.zip", "sha256": sha,
                   "length": len(data)}
        if sha256 is not None:
            ref["sha256"] = sha256
            ref["path"] = f"{repo.PACKAGES_DIR}/{sha256}.zip"
        if length is not None:
            ref["length"] = length
        if path is not None:
            ref["path"] = path
        signed = self.release_doc(version, ref, issued=issued, expires=expires,
                                  root_version=root_version, rollout=rollout, notes=notes,
                                  channel=version_file)
        for key, value in (extra or {}).items():
            if value is None:
                signed.pop(key, None)
            else:
                signed[key] = value
        keys = self.release_keys if signers is None else list(signers)
        envelope = self.sign(signed, keys, extra_signatures)
        self.write(version_file, envelope)
        return envelope

    def release(self, version: int, *, version_file: str = "version.json",
                rollout: int = 100, notes: str = "", run: bytes = DEFAULT_RUN,
                debs: Sequence[Path] = (), expires: timedelta = RELEASE_LIFETIME,
                force: bool = False) -> Release:
        """An honest release through the real library: ``build_package`` then
        ``publish_release`` (same checks and files as ``opq-box-publish release``)."""
        work = self.path.parent / f"{self.path.name}-build"
        work.mkdir(exist_ok=True)
        script = work / "update.sh"
        script.write_bytes(run)
        out = work / f"package-{version}.zip"
        build.build_package(out, version=version, debs=debs, run=script)
        return repo.publish_release(self.path, self.keydir, out, expires=expires,
                                    rollout=rollout, version_file=version_file, notes=notes,
                                    force=force, now=self.now)

    def refresh(self, *, version_file: str = "version.json",
                expires: timedelta = RELEASE_LIFETIME) -> Release:
        """The real ``refresh_release``."""
        return repo.refresh_release(self.path, self.keydir, version_file=version_file,
                                    expires=expires, now=self.now)

    # --- root rotation ---------------------------------------------------------------------

    def rotate(self, role: str = "release", *,
               new_keys: int | Sequence[Ed25519PrivateKey] = 1, keep: bool = False,
               threshold: int | None = None,
               signers: Iterable[Ed25519PrivateKey] | None = None,
               version: int | None = None, expires: datetime | None = None,
               resign: bool = True) -> bytes:
        """Write the next root with ``role``'s keys replaced by ``new_keys`` (a count of
        fresh keys stored in KEYDIR, or given keys); ``keep`` adds them instead.

        ``signers`` default: every held root key of the old and of the new root, which meets
        both thresholds; pass fewer (or strangers) for a threshold attack. ``version``
        overrides N+1; ``expires`` defaults to now + 2 years. With ``resign``, every
        ``version*.json`` is re-signed with the new release keys and ``root_version``, as
        ``opq-box-publish rotate`` does. Returns the root's bytes.
        """
        old = self.root_doc()
        keys = ([self.new_key(role) for _ in range(new_keys)] if isinstance(new_keys, int)
                else list(new_keys))
        for key in keys:
            self.keys.setdefault(key_id(key), key)
        doc = copy.deepcopy(old)
        keyids = list(doc["roles"][role]["keyids"]) if keep else []
        keyids += [key_id(k) for k in keys if key_id(k) not in keyids]
        for key in keys:
            doc["keys"][key_id(key)] = {"keytype": "ed25519", "public": public_hex(key)}
        doc["roles"][role] = {"keyids": keyids,
                              "threshold": threshold or min(old["roles"][role]["threshold"],
                                                            len(keyids))}
        used = {k for r in doc["roles"].values() for k in r["keyids"]}
        doc["keys"] = {k: v for k, v in doc["keys"].items() if k in used}
        doc["version"] = version or old["version"] + 1
        doc["expires"] = format_time(expires or self.now + ROOT_LIFETIME)
        if signers is None:
            ids = [*old["roles"]["root"]["keyids"], *doc["roles"]["root"]["keyids"]]
            signers = [self.keys[k] for k in dict.fromkeys(ids) if k in self.keys]
        data = self.sign(doc, signers)
        self.write(f"{repo.ROOT_DIR}/{doc['version']}.root.json", data)
        if resign:
            for path in repo.version_files(self.path):
                release = parse_envelope(path.read_bytes()).signed
                release["root_version"] = doc["version"]
                self.write(path.name, self.sign(release, self.role_keys("release")))
        return data

    def lib_rotate(self, role: str, *, add: Sequence[str] = (), remove: Sequence[str] = (),
                   threshold: int | None = None) -> Root:
        """The real ``rotate_role`` (keys it generates are loaded into ``keys``)."""
        result = rotate.rotate_role(self.path, self.keydir, role, add=add, remove=remove,
                                  threshold=threshold, now=self.now)
        self._load_keydir()
        return result.root


def _zipinfo(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3  # unix: external_attr carries the file type and mode
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info
