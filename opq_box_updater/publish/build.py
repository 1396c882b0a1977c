"""Building update packages (DESIGN 2.4) and checking them before they are published.

:func:`build_package` is deterministic: the same inputs give the same bytes, hence the same
``packages/<sha256>.zip`` name (fixed timestamps and modes, ``manifest.json`` first, the other
members sorted by name). Files are streamed into the zip, so memory does not grow with their
size. :func:`inspect_package` runs the box's own extraction, manifest and deb checks on a zip,
so that a package boxes would refuse is refused here, before anything is signed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError, UnsafePackageError
from ..fsutil import atomic_file
from ..metadata import parse_json
from ..package import (
    APT_ALLOW_REMOVE,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Manifest,
    deb_control,
    extract_package,
    inspect_debs,
    load_manifest,
    package_names,
    read_deb,
)
from .common import CHUNK, PublishError

#: A member name boxes accept: a plain file name (Debian file names use ``+ ~ . _ %``).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~%-]{0,199}")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_DEB_MAGIC = b"!<arch>\n"


def build_package(out: Path, *, version: int, debs: Sequence[Path] = (),
                  run: Path | None = None, healthcheck: Path | None = None,
                  apt_allow_remove: Sequence[str] = ()) -> Manifest:
    """Write a package zip to ``out`` (atomically) and return its manifest.

    Every file is stored under its basename; debs keep the given order in the manifest.
    ``apt_allow_remove`` lists the installed packages apt may remove on boxes with
    ``installer: apt`` (the manifest key is written only when it is not empty: older boxes
    accept exactly DESIGN 2.4's five keys). Refuses (:class:`PublishError`) a version below
    1, a package with neither debs nor a run script, a missing file, a ``.deb`` that is not
    an ar archive, clashing names, and what boxes would refuse in ``apt_allow_remove``.
    """
    if type(version) is not int or version < 1:
        raise PublishError(f"--version must be a positive integer, not {version!r}")
    if not debs and run is None:
        raise PublishError("a package needs at least one --deb or a --run script")
    if apt_allow_remove and not debs:
        raise PublishError("--apt-allow-remove needs at least one --deb: without debs apt "
                           "does not run")
    try:
        allowed = package_names(list(apt_allow_remove), "apt_allow_remove")
    except UnsafePackageError as exc:
        raise PublishError(f"--apt-allow-remove: boxes would refuse it: {exc}") from None
    for deb in debs:
        _check_deb_file(deb)
    files: dict[str, Path] = {}
    for path in (*debs, *(p for p in (run, healthcheck) if p is not None)):
        _check_regular_file(path)
        name = path.name
        if not SAFE_NAME.fullmatch(name) or name == MANIFEST_NAME:
            raise PublishError(f"{path}: {name!r} cannot be a package member name (use "
                               "letters, digits and . _ + ~ - only, not starting with a dot)")
        if name in files:
            raise PublishError(f"two files are named {name!r} ({files[name]} and {path})")
        files[name] = path
    manifest = Manifest(MANIFEST_FORMAT, version, tuple(d.name for d in debs),
                        run.name if run else None, healthcheck.name if healthcheck else None,
                        allowed)
    out = out.absolute()
    if not out.parent.is_dir():
        raise PublishError(f"{out.parent} is not a directory")
    with atomic_file(out) as handle, zipfile.ZipFile(handle, "w") as zf:
        _write_member(zf, MANIFEST_NAME, manifest_bytes(manifest), 0o644)
        for name in sorted(files):
            mode = 0o644 if name.endswith(".deb") else 0o755
            _stream_member(zf, name, files[name], mode)
    return manifest


def rebuild_package(src: Path, out: Path, *, version: int) -> Manifest:
    """Write to ``out`` a package with ``src``'s contents under a new ``version`` (``recall``).

    ``src`` is extracted with the box's own code (:func:`inspect_package`'s checks: a package
    boxes would refuse is refused); every member is kept, manifest fields other than the
    version unchanged, the run and health scripts 0755, other files 0644, deterministic
    like :func:`build_package`.
    """
    if type(version) is not int or version < 1:
        raise PublishError(f"version must be a positive integer, not {version!r}")
    old = inspect_package(src)
    manifest = dataclasses.replace(old, version=version)  # optional keys too
    scripts = {old.run, old.healthcheck}
    with tempfile.TemporaryDirectory(prefix="opq-publish-rebuild-") as tmp:
        workdir = extract_package(src, Path(tmp), max_unpacked_bytes=MAX_UNPACKED_BYTES)
        files = sorted(p for p in workdir.rglob("*") if p.is_file()
                       and p.relative_to(workdir).as_posix() != MANIFEST_NAME)
        with atomic_file(out.absolute()) as handle, zipfile.ZipFile(handle, "w") as zf:
            _write_member(zf, MANIFEST_NAME, manifest_bytes(manifest), 0o644)
            for path in files:
                name = path.relative_to(workdir).as_posix()
                _stream_member(zf, name, path, 0o755 if name in scripts else 0o644)
    return manifest


def manifest_bytes(manifest: Manifest) -> bytes:
    """``manifest.json`` as the builder writes it (sorted keys, one trailing newline)."""
    doc = {"format": manifest.format, "version": manifest.version, "debs": list(manifest.debs),
           "run": manifest.run, "healthcheck": manifest.healthcheck}
    if manifest.apt_allow_remove:
        doc[APT_ALLOW_REMOVE] = list(manifest.apt_allow_remove)
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("utf-8")


def _check_regular_file(path: Path) -> None:
    if not path.is_file():
        raise PublishError(f"{path}: no such file")


def _check_deb_file(path: Path) -> None:
    _check_regular_file(path)
    if path.suffix != ".deb":
        raise PublishError(f"{path}: a Debian package must end in .deb")
    with path.open("rb") as handle:
        if handle.read(len(_DEB_MAGIC)) != _DEB_MAGIC:
            raise PublishError(f"{path}: not a Debian package (no ar archive header)")
    try:
        read_deb(path, path.name)  # the box's reading: what it cannot read, it refuses
    except UnsafePackageError as exc:
        raise PublishError(f"{path}: boxes would refuse it: {exc}") from None


def _zipinfo(name: str, mode: int, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.create_system = 3  # unix, so external_attr carries a regular-file mode
    info.external_attr = (stat.S_IFREG | mode) << 16
    # .deb files are compressed already: deflating them again costs time and gains nothing.
    info.compress_type = zipfile.ZIP_STORED if name.endswith(".deb") else zipfile.ZIP_DEFLATED
    info.file_size = size  # lets zipfile choose zip64 up front for members over 2 GiB
    return info


def _write_member(zf: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    with zf.open(_zipinfo(name, mode, len(data)), "w") as dst:
        dst.write(data)


def _stream_member(zf: zipfile.ZipFile, name: str, path: Path, mode: int) -> None:
    size = path.stat().st_size
    with path.open("rb") as src, zf.open(_zipinfo(name, mode, size), "w") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


# --- checking a package --------------------------------------------------------------------


#: The box's default ``max_unpacked_bytes`` (config.py; the publisher may not import it, a
#: test keeps the two equal): a package larger unpacked is refused by boxes left at the default.
MAX_UNPACKED_BYTES = 2 * 1024 * 1024 * 1024


def inspect_package(path: Path, *, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> Manifest:
    """Check a package with the box's own code and return its manifest (DESIGN 2.4, 3.3).

    One implementation on both sides: the zip is extracted into a temporary directory by
    :func:`~opq_box_updater.package.extract_package`, its manifest read by
    :func:`~opq_box_updater.package.load_manifest` and every listed deb's control read by
    :func:`~opq_box_updater.package.inspect_debs`, exactly as a box does before applying, so a
    package every box would refuse (exit 3, version marked failed fleet-wide) is refused here
    with the box's message. Only the architecture is not checked: the fleet's is not known.
    """
    with tempfile.TemporaryDirectory(prefix="opq-publish-check-") as tmp:
        try:
            workdir = extract_package(path, Path(tmp), max_unpacked_bytes=max_unpacked_bytes)
        except FileNotFoundError:
            raise PublishError(f"{path}: no such file") from None
        except OSError as exc:
            raise UnsafePackageError(f"{path.name}: not a readable zip ({exc})") from None
        manifest = load_manifest(workdir, _declared_version(workdir))
        if manifest.version < 1:
            raise UnsafePackageError(f"{MANIFEST_NAME}: version must be a positive integer")
        inspect_debs(workdir, manifest, None)
    return manifest


def _declared_version(workdir: Path) -> int:
    """The manifest's own version, for :func:`load_manifest` to check everything else against
    (a box compares it with the signed release's; here the release takes it from there)."""
    try:
        raw = parse_json((workdir / MANIFEST_NAME).read_bytes())
    except (OSError, FormatError):
        return 0  # load_manifest says what is wrong with it
    version = raw.get("version") if isinstance(raw, dict) else None
    return version if type(version) is int else 0


# --- dependencies ----------------------------------------------------------------------------

#: A package name as ``dpkg-query -W`` prints it, with an optional ``:arch`` qualifier.
_BASE_NAME = re.compile(r"([a-z0-9][a-z0-9+.-]+)(?::[a-z0-9-]+)?")
_OPS = {"<<": lambda c: c < 0, "<=": lambda c: c <= 0, "=": lambda c: c == 0,
        ">=": lambda c: c >= 0, ">>": lambda c: c > 0}


@dataclass(frozen=True)
class DebRelations:
    """What a deb provides and needs, from its control fields."""

    package: str
    version: str
    provides: str = ""  # the raw Provides field
    depends: str = ""  # Pre-Depends and Depends, joined with ", "
    breaks: str = ""  # the raw Breaks field


def read_relations(path: Path, name: str | None = None) -> DebRelations:
    """The relations of the .deb at ``path`` (``name``, default its file name, in errors)."""
    control = deb_control(path, name or path.name)
    needs = ", ".join(v for v in (control.get("Pre-Depends"), control.get("Depends")) if v)
    return DebRelations(control.get("Package", ""), control.get("Version", ""),
                        control.get("Provides", ""), needs, control.get("Breaks", ""))


def read_base_packages(path: Path) -> dict[str, str | None]:
    """A box image's package set: one package per line, optionally followed by its version
    (what ``dpkg-query -W`` or ``dpkg-query -W -f='${Package}\\n'`` prints on the image);
    blank lines and ``#`` comments are skipped. Returns name -> version (None: unknown)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PublishError(f"cannot read the base package list {path}: {exc}") from None
    base: dict[str, str | None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        match = _BASE_NAME.fullmatch(fields[0])
        if match is None or len(fields) > 2:
            raise PublishError(f"{path}:{number}: expected a package name and optionally its "
                               f"version, not {line.strip()!r}")
        base[match.group(1)] = fields[1] if len(fields) == 2 else None
    return base


def unmet_dependencies(debs: Sequence[DebRelations],
                       base: Mapping[str, str | None] | None = None) -> list[str]:
    """The Pre-Depends/Depends of ``debs`` that neither the debs themselves (their Package
    and Provides) nor ``base`` satisfy, as ``"app 2.0 needs libfoo (>= 1.2)"``, one per
    unmet relation (alternatives ``a | b`` are met by either). A base package listed without
    a version meets any version constraint: it cannot be checked. Pure; no I/O."""
    from debian.deb822 import PkgRelation
    from debian.debian_support import version_compare

    versions: dict[str, list[str | None]] = {}  # real packages, and versioned Provides
    virtual: set[str] = set()  # unversioned Provides: meet only unversioned relations
    for name, version in (base or {}).items():
        versions.setdefault(name, []).append(version)
    for deb in debs:
        versions.setdefault(deb.package, []).append(deb.version)
        for group in _relations(deb.provides):
            for rel in group:
                provided = rel.get("version")
                if provided:
                    versions.setdefault(rel["name"], []).append(provided[1])
                else:
                    virtual.add(rel["name"])

    def met(rel: Mapping[str, Any]) -> bool:
        name, constraint = rel["name"], rel.get("version")
        if constraint is None and name in virtual:
            return True
        for have in versions.get(name, ()):
            if constraint is None or have is None:
                return True
            op, wanted = constraint
            if _OPS[op](version_compare(have, wanted)):
                return True
        return False

    unmet = []
    for deb in debs:
        for group in _relations(deb.depends):
            if not any(met(rel) for rel in group):
                text = PkgRelation.str([group])
                unmet.append(f"{deb.package} {deb.version} needs {text}")
    return unmet


def _relations(field: str) -> list[list[Any]]:
    """python-debian's parse of a relation field (it complains about an empty one)."""
    from debian.deb822 import PkgRelation

    return list(PkgRelation.parse_relations(field)) if field.strip() else []


def order_problems(debs: Sequence[DebRelations]) -> list[str]:
    """Debs listed before a deb of the same release that they ``Breaks``: a box's one
    ``dpkg -i`` unpacks in manifest order without ``--auto-deconfigure``, so dpkg refuses the
    first while it breaks the installed older version of the second (the module package
    ``python3-opq-box-updater`` before ``opq-box-updater`` on a 1.0 box). Pure; no I/O."""
    later = {deb.package: index for index, deb in enumerate(debs)}
    problems = []
    for index, deb in enumerate(debs):
        for group in _relations(deb.breaks):
            for rel in group:
                if later.get(rel["name"], -1) > index:
                    problems.append(f"list {rel['name']} before {deb.package}: "
                                    f"{deb.package} {deb.version} Breaks "
                                    f"{_relation_text(rel)}, and boxes unpack the debs in "
                                    "the order given, so dpkg refuses it while the "
                                    "older version is installed")
    return problems


def _relation_text(rel: Mapping[str, Any]) -> str:
    """One relation as Debian writes it (``name (<< 1.1.0~)``)."""
    constraint = rel.get("version")
    return f"{rel['name']} ({constraint[0]} {constraint[1]})" if constraint else rel["name"]


def dependency_warnings(debs: Sequence[DebRelations], base_file: Path | None) -> list[str]:
    """What ``build`` and ``release`` tell the operator about dependencies boxes may lack,
    and about an order of debs that boxes cannot apply."""
    return order_problems(debs) + _unmet_warnings(debs, base_file)


def _unmet_warnings(debs: Sequence[DebRelations], base_file: Path | None) -> list[str]:
    base = read_base_packages(base_file) if base_file else None
    unmet = unmet_dependencies(debs, base)
    if not unmet:
        return []
    if base_file is None:
        return [f"not satisfied inside the release: {'; '.join(unmet)}. Boxes with "
                "installer: dpkg must have these installed already or the apply fails and "
                "is rolled back (check with --base-packages FILE, a list from "
                "`dpkg-query -W` on the box image); installer: apt resolves them from the "
                "box's apt sources"]
    return [f"{item}: neither the release nor {base_file} has it; boxes with installer: "
            "dpkg will fail to apply this release" for item in unmet]


def files_dependency_warnings(debs: Sequence[Path], base_file: Path | None) -> list[str]:
    """:func:`dependency_warnings` for ``build``'s ``--deb`` files."""
    try:
        relations = [read_relations(deb) for deb in debs]
    except UnsafePackageError as exc:
        return [f"dependencies not checked: {exc}"]
    return dependency_warnings(relations, base_file)


def package_dependency_warnings(package: Path, base_file: Path | None) -> list[str]:
    """:func:`dependency_warnings` for the debs inside a package zip (``release``)."""
    try:
        relations = package_relations(package)
    except UnsafePackageError as exc:
        return [f"dependencies not checked: {exc}"]
    return dependency_warnings(relations, base_file)


def package_relations(package: Path) -> list[DebRelations]:
    """The relations of every deb listed in the package zip ``package`` (each deb is copied
    to a temporary file to be read)."""
    manifest = inspect_package(package)
    relations = []
    with zipfile.ZipFile(package) as zf, tempfile.TemporaryDirectory() as tmp:
        for name in manifest.debs:
            target = Path(tmp) / "member.deb"
            with zf.open(name) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            relations.append(read_relations(target, name))
    return relations
