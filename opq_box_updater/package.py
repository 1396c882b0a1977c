"""Update packages: safe extraction, the manifest, and inspection of the .deb files inside.

Nothing here trusts the zip: member names, types, counts and sizes are checked before and
while writing (pip's ``utils/unpacking.py``), and every refusal is an
:class:`UnsafePackageError` (exit 3; the version is marked failed, since the same bytes will
never become safe).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from . import runner
from .errors import FormatError, SubprocessError, UnsafePackageError
from .metadata import parse_json

if TYPE_CHECKING:
    import tarfile

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
#: Files the updater itself writes into an extraction directory: the run-script guard's status
#: and apt's sandbox config. A package may not carry them (a planted status file could vouch
#: for a run script that never ran), and they are not the package's "unlisted entries".
RUN_STATUS_FILE = ".opq-run-script.json"
APT_CONFIG_FILE = ".opq-apt.conf"
NO_SOURCES_LIST = ".opq-no-sources.list"  # run --from with installer: apt (applyplan)
NO_SOURCES_DIR = ".opq-no-sources.d"
UPDATER_FILES = frozenset({RUN_STATUS_FILE, APT_CONFIG_FILE, NO_SOURCES_LIST, NO_SOURCES_DIR})
MAX_MEMBERS = 1000

#: Bytes read and written per step while extracting: memory stays flat whatever the sizes.
CHUNK_SIZE = 64 * 1024
#: Longest member path and path component accepted (PATH_MAX is far above, NAME_MAX is 255).
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
#: zipfile reads the whole central directory into memory before we can count its entries, so
#: its size is bounded first: per member, the fixed 46-byte record, a name, and room for
#: extra fields and a comment.
MAX_CENTRAL_DIR_BYTES_PER_MEMBER = 46 + MAX_NAME_BYTES + 1024
MAX_MANIFEST_BYTES = 64 * 1024
#: A real control file is a few KiB; this bounds what a hostile .deb can make us read.
MAX_CONTROL_BYTES = 1024 * 1024
MAX_CONTROL_MEMBERS = 100

#: Stored and deflated are what ``opq-box-publish build`` writes, and the only methods whose
#: stdlib decompressors bound their output per read; bzip2 and lzma members could expand a
#: few KiB of input into unbounded memory in one step, so they are refused.
_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_ENCRYPTED_FLAG = 0x1

#: What zipfile raises on hostile or corrupt input (UnicodeDecodeError for bad UTF-8 names,
#: RuntimeError for encryption, NotImplementedError for unknown features). OSError is left
#: out on purpose: a failing disk is not the package's fault and must not mark it failed.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, ValueError,
               RuntimeError, NotImplementedError)

_FILE_TYPES = {stat.S_IFLNK: "a symlink", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket"}

_MANIFEST_KEYS = frozenset({"format", "version", "debs", "run", "healthcheck"})
#: Optional keys beyond DESIGN 2.4's five (written only when used, so that a package without
#: them is still accepted by older boxes, which want exactly the five).
APT_ALLOW_REMOVE = "apt_allow_remove"
_OPTIONAL_MANIFEST_KEYS = frozenset({APT_ALLOW_REMOVE})
# Debian policy 5.6.1 / 5.6.12; anything else could confuse the dpkg-query guard and logs.
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_VERSION_RE = re.compile(r"(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*")
_ARCH_RE = re.compile(r"[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a package (DESIGN 2.4)."""

    format: int
    version: int
    debs: tuple[str, ...]
    run: str | None
    healthcheck: str | None
    #: Installed packages apt may remove while applying (``installer: apt``; as apt names
    #: them, ``name`` or ``name:arch``); apt wanting to remove anything else postpones.
    apt_allow_remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class DebInfo:
    """What python-debian read from one ``.deb`` of the package, in manifest order."""

    filename: str  # as listed in the manifest, relative to the extraction directory
    package: str
    version: str
    architecture: str
    multi_arch: str = ""  # "same" for a Multi-Arch: same package, else empty


def _refuse(why: str) -> NoReturn:
    raise UnsafePackageError(f"unsafe package: {why}")


# --- extraction --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """A checked zip member: its normalised path components and kind."""

    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool

    @property
    def name(self) -> str:
        return self.info.orig_filename


def extract_package(zip_path: Path, parent_dir: Path, *, max_unpacked_bytes: int,
                    max_members: int = MAX_MEMBERS) -> Path:
    """Extract ``zip_path`` into a fresh 0700 directory under ``parent_dir`` and return it.

    Every member is checked before anything is written; files are created 0600 and
    directories 0700 whatever the zip says. On any refusal (:class:`UnsafePackageError`) or
    other error the fresh directory is removed, so nothing of the package remains anywhere.
    An :class:`OSError` about ``zip_path`` or ``parent_dir`` themselves propagates unchanged.
    """
    with open(zip_path, "rb") as fp:
        _check_central_directory(fp, max_members)
        try:
            archive = zipfile.ZipFile(fp)
        except _ZIP_ERRORS as exc:
            _refuse(f"{zip_path.name} is not a valid zip file ({exc})")
        with archive:
            size = os.fstat(fp.fileno()).st_size
            members = _check_members(archive.infolist(), size, max_members, max_unpacked_bytes)
            dest = Path(tempfile.mkdtemp(prefix="extract-", dir=parent_dir))
            try:
                written = _write_members(archive, members, dest, max_unpacked_bytes)
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                if dest.exists():
                    logger.warning("could not remove refused extraction %s", dest)
                raise
    logger.info("extracted %d members (%d bytes) into %s", len(members), written, dest)
    return dest


def _check_central_directory(fp: IO[bytes], max_members: int) -> None:
    """Refuse archives whose central directory is too large to parse with flat memory.

    Uses zipfile's own end-of-central-directory reader so that we judge exactly the numbers
    zipfile will act on; if a future Python drops it, the count check after parsing remains.
    """
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return
    try:
        endrec = end_record(fp)
    except (OSError, *_ZIP_ERRORS):
        return  # let ZipFile() report the corruption
    if not endrec:
        return
    entries, size = endrec[4], endrec[5]  # _ECD_ENTRIES_TOTAL, _ECD_SIZE
    if entries > max_members:
        _refuse(f"{entries} members, more than the limit of {max_members}")
    if size > max_members * MAX_CENTRAL_DIR_BYTES_PER_MEMBER:
        _refuse(f"a central directory of {size} bytes is too large for {max_members} members")


def _check_members(infos: Sequence[zipfile.ZipInfo], archive_size: int, max_members: int,
                   max_unpacked_bytes: int) -> list[_Member]:
    """Check every name, type and the declared total; refuse before anything is written."""
    if len(infos) > max_members:
        _refuse(f"{len(infos)} members, more than the limit of {max_members}")
    members = [_check_member(info, archive_size) for info in infos]
    seen: dict[tuple[str, ...], str] = {}
    files: set[tuple[str, ...]] = set()
    parents: set[tuple[str, ...]] = set()
    for member in members:
        if member.parts in seen:
            _refuse(f"member {member.name!r} repeats {seen[member.parts]!r}")
        seen[member.parts] = member.name
        if not member.is_dir:
            files.add(member.parts)
        parents.update(member.parts[:i] for i in range(1, len(member.parts)))
    reserved = sorted(seen[(name,)] for name in UPDATER_FILES if (name,) in seen)
    if reserved:
        _refuse(f"member {reserved[0]!r} is a name reserved for the updater's own files")
    clashes = files & parents
    if clashes:
        _refuse(f"member {seen[min(clashes)]!r} is a file but other members are inside it")
    # Sizes are declared by the zip and not trusted; this only refuses an honestly huge
    # package before writing gigabytes. The real cap is counted while writing.
    declared = sum(m.info.file_size for m in members)
    if declared > max_unpacked_bytes:
        _refuse(f"members declare {declared} bytes, more than max_unpacked_bytes "
                f"({max_unpacked_bytes})")
    return members


def _check_member(info: zipfile.ZipInfo, archive_size: int) -> _Member:
    name = info.orig_filename  # before zipfile cuts it at a NUL
    problem = _name_problem(name)
    if problem:
        _refuse(f"member {name!r} {problem}")
    # zipfile would seek there and fail with a bare OSError(EINVAL) on a negative offset.
    if not 0 <= info.header_offset < archive_size:
        _refuse(f"member {name!r} points outside the archive")
    if info.flag_bits & _ENCRYPTED_FLAG:
        _refuse(f"member {name!r} is encrypted")
    if info.compress_type not in _COMPRESSION:
        _refuse(f"member {name!r} uses compression method {info.compress_type} "
                "(only stored and deflated are accepted)")
    is_dir = name.endswith("/")
    # The high 16 bits are a Unix st_mode when the zip was made on Unix; zero elsewhere.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type in _FILE_TYPES:
        _refuse(f"member {name!r} is {_FILE_TYPES[file_type]}")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        _refuse(f"member {name!r} has unknown file type {file_type:#o}")
    if (file_type == stat.S_IFDIR) != is_dir and file_type != 0:
        _refuse(f"member {name!r}: its file type and its name disagree")
    if is_dir and info.file_size:
        _refuse(f"member {name!r} is a directory with data")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    return _Member(info, parts, is_dir)


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be extracted safely, or None. ``a/./b``, ``a//b`` and ``a/`` are
    accepted and normalised (then caught as duplicates if they collide)."""
    if not name:
        return "has an empty name"
    if "\0" in name:
        return "has a NUL in its name"
    if "\\" in name:
        return "has a backslash in its name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "has a control character in its name"
    if name.startswith("/"):
        return "is an absolute path"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"has a name longer than {MAX_NAME_BYTES} bytes"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "has a '..' component"
    if not parts:
        return "names the extraction directory itself"
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES for p in parts):
        return f"has a path component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def _write_members(archive: zipfile.ZipFile, members: Sequence[_Member], dest: Path,
                   max_unpacked_bytes: int) -> int:
    """Write the checked members under ``dest``; return the bytes written."""
    written = 0
    for member in members:
        if member.is_dir:
            _make_dirs(dest, member.parts)
            continue
        _make_dirs(dest, member.parts[:-1])
        written += _extract_file(archive, member, dest.joinpath(*member.parts),
                                 max_unpacked_bytes - written)
    return written


def _make_dirs(dest: Path, parts: tuple[str, ...]) -> None:
    for i in range(1, len(parts) + 1):
        path = dest.joinpath(*parts[:i])
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made for an earlier member: checked names cannot meet a file here
        os.chmod(path, 0o700)  # exact, whatever the umask


def _extract_file(archive: zipfile.ZipFile, member: _Member, target: Path, budget: int) -> int:
    # zipfile silently stops at the declared size (or fails its CRC check there); with this
    # slack, larger than one read plus zipfile's read-ahead, copy_bounded sees the overrun
    # itself and names it.
    probe = copy.copy(member.info)
    probe.file_size = member.info.file_size + CHUNK_SIZE + 1
    try:
        src = archive.open(probe)
    except _ZIP_ERRORS as exc:
        _refuse(f"member {member.name!r} cannot be read ({exc})")
    # O_EXCL and O_NOFOLLOW: a bug in the checks above must fail here, not write elsewhere.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with src, open(fd, "wb") as dst:
        os.fchmod(dst.fileno(), 0o600)
        written = copy_bounded(src, dst, name=member.name, declared=member.info.file_size,
                               budget=budget)
    if written != member.info.file_size:
        _refuse(f"member {member.name!r} holds {written} bytes, fewer than the "
                f"{member.info.file_size} it declares")
    return written


def copy_bounded(src: IO[bytes], dst: IO[bytes], *, name: str, declared: int,
                 budget: int) -> int:
    """Copy ``src`` to ``dst`` in :data:`CHUNK_SIZE` steps; return the bytes copied.

    Refuses, before writing the chunk that would cross it, more than ``declared`` bytes (the
    member lies about its size) or more than ``budget`` bytes (what is left of
    ``max_unpacked_bytes``): at most ``budget`` bytes ever reach ``dst``.
    """
    written = 0
    while True:
        try:
            chunk = src.read(CHUNK_SIZE)
        except _ZIP_ERRORS as exc:
            _refuse(f"member {name!r} is corrupt ({exc})")
        if not chunk:
            return written
        written += len(chunk)
        if written > declared:
            _refuse(f"member {name!r} holds more than the {declared} bytes it declares")
        if written > budget:
            _refuse(f"member {name!r} goes over max_unpacked_bytes (zip bomb?)")
        dst.write(chunk)


# --- manifest ----------------------------------------------------------------------------


def load_manifest(extract_dir: Path, expected_version: int) -> Manifest:
    """Read and check ``manifest.json`` of an extracted package (DESIGN 2.4).

    Refuses (:class:`UnsafePackageError`) anything but the five keys of DESIGN 2.4 (plus the
    optional ``apt_allow_remove``: a list of distinct package names) with the right JSON
    types, ``format`` 1, a ``version`` other than ``expected_version`` (a correctly signed
    package of another release), and names that are not plain files of the package.
    Other files in the package are allowed and logged: the run script runs in the
    extraction directory and may use data files shipped next to it (the seed's behaviour);
    but a ``.deb`` anywhere in the package that the manifest does not list is refused
    (DESIGN 3.2: every deb's name is listed), so what is applied is exactly what is signed
    and shown by ``run --dry-run``.
    """
    data = _read_regular_file(extract_dir / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    try:
        raw = parse_json(data)
    except FormatError as exc:
        _refuse(f"{MANIFEST_NAME} {exc}")
    if not isinstance(raw, dict):
        _refuse(f"{MANIFEST_NAME} is not a JSON object")
    if not _MANIFEST_KEYS <= raw.keys() <= _MANIFEST_KEYS | _OPTIONAL_MANIFEST_KEYS:
        missing = sorted(_MANIFEST_KEYS - raw.keys())
        extra = sorted(raw.keys() - _MANIFEST_KEYS - _OPTIONAL_MANIFEST_KEYS)
        _refuse(f"{MANIFEST_NAME} must have exactly the keys {sorted(_MANIFEST_KEYS)} "
                f"and optionally {sorted(_OPTIONAL_MANIFEST_KEYS)} "
                f"(missing {missing}, unknown {extra})")
    fmt, version = raw["format"], raw["version"]
    if type(fmt) is not int or fmt != MANIFEST_FORMAT:
        _refuse(f"{MANIFEST_NAME}: format {fmt!r} is not {MANIFEST_FORMAT}")
    if type(version) is not int:
        _refuse(f"{MANIFEST_NAME}: version {version!r} is not an integer")
    if version != expected_version:
        _refuse(f"package is for release {version}, not {expected_version}")
    debs = raw["debs"]
    if not isinstance(debs, list):
        _refuse(f"{MANIFEST_NAME}: debs must be a list of file names")
    manifest = Manifest(
        format=fmt, version=version,
        debs=tuple(_named_file(extract_dir, "debs", name, ".deb") for name in debs),
        run=_optional_file(extract_dir, "run", raw["run"]),
        healthcheck=_optional_file(extract_dir, "healthcheck", raw["healthcheck"]),
        apt_allow_remove=package_names(raw.get(APT_ALLOW_REMOVE, []), APT_ALLOW_REMOVE))
    named = [*manifest.debs, *(n for n in (manifest.run, manifest.healthcheck) if n)]
    if len(set(named)) != len(named):
        _refuse(f"{MANIFEST_NAME} names a file twice: {named}")
    if not manifest.debs and manifest.run is None:
        _refuse(f"{MANIFEST_NAME} has neither debs nor a run script: nothing to apply")
    unlisted_debs = sorted(
        str(path.relative_to(extract_dir)) for path in extract_dir.rglob("*")
        if path.name.lower().endswith(".deb") and not path.is_dir()
        and str(path.relative_to(extract_dir)) not in manifest.debs)
    if unlisted_debs:
        _refuse(f"{', '.join(unlisted_debs[:10])}{' ...' if len(unlisted_debs) > 10 else ''}: "
                f"a .deb that {MANIFEST_NAME} does not list")
    others = sorted(p.name for p in extract_dir.iterdir()
                    if p.name not in {MANIFEST_NAME, *named, *UPDATER_FILES})
    if others:
        logger.info("package also contains %d unlisted entries: %s%s", len(others),
                    ", ".join(others[:10]), " ..." if len(others) > 10 else "")
    return manifest


def package_names(names: Any, key: str) -> tuple[str, ...]:
    """A list of distinct Debian package names, each optionally ``:arch``-qualified, as the
    manifest's ``key`` (the publisher's ``build`` checks its options with it too)."""
    if not isinstance(names, list):
        _refuse(f"{MANIFEST_NAME}: {key} must be a list of package names")
    for name in names:
        if not isinstance(name, str):
            _refuse(f"{MANIFEST_NAME}: {key} entry {name!r} is not a package name")
        base, colon, arch = name.partition(":")
        if not _PACKAGE_RE.fullmatch(base) or (colon and not _ARCH_RE.fullmatch(arch)):
            _refuse(f"{MANIFEST_NAME}: {key} entry {name!r} is not a package name")
    if len(set(names)) != len(names):
        _refuse(f"{MANIFEST_NAME}: {key} names a package twice")
    return tuple(names)


def _read_regular_file(path: Path, limit: int) -> bytes:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _refuse(f"{path.name} is missing")
    if not stat.S_ISREG(st.st_mode):
        _refuse(f"{path.name} is not a regular file")
    if st.st_size > limit:
        _refuse(f"{path.name} is larger than {limit} bytes")
    return path.read_bytes()


def _named_file(extract_dir: Path, key: str, name: Any, suffix: str = "") -> str:
    """Check a file name from the manifest: plain, top level, present as a regular file."""
    if not _is_plain_name(name) or not name.endswith(suffix):
        _refuse(f"{MANIFEST_NAME}: {key} entry {name!r} is not a plain file name"
                + (f" ending in {suffix}" if suffix else ""))
    try:
        st = os.lstat(extract_dir / name)
    except FileNotFoundError:
        _refuse(f"{MANIFEST_NAME}: {key} names {name!r}, which is not in the package")
    if not stat.S_ISREG(st.st_mode):
        _refuse(f"{MANIFEST_NAME}: {key} names {name!r}, which is not a regular file")
    return name


def _is_plain_name(name: Any) -> bool:
    """A top-level file name that cannot be read as an option (``-``), is not hidden (so
    ``.deb`` alone is not a deb) and has no surrounding blanks."""
    return (isinstance(name, str) and bool(name) and name == name.strip() and "/" not in name
            and name[0] not in ".-" and name != MANIFEST_NAME and _name_problem(name) is None)


def _optional_file(extract_dir: Path, key: str, name: Any) -> str | None:
    return None if name is None else _named_file(extract_dir, key, name)


# --- .deb inspection ---------------------------------------------------------------------


def inspect_debs(extract_dir: Path, manifest: Manifest,
                 architectures: Collection[str] | None) -> tuple[DebInfo, ...]:
    """Read Package, Version and Architecture of every .deb with python-debian, in manifest
    order; refuse one that does not parse, has an architecture outside ``architectures``
    (see :func:`dpkg_architectures`; None, for the publisher, accepts any), or repeats a
    package name (a ``Multi-Arch: same`` package may come once per architecture)."""
    infos: list[DebInfo] = []
    seen: dict[tuple[str, str], str] = {}
    for filename in manifest.debs:
        info = read_deb(extract_dir / filename, filename)
        if architectures is not None and info.architecture not in architectures:
            _refuse(f"{filename}: architecture {info.architecture!r} does not fit this box "
                    f"({', '.join(sorted(architectures))})")
        instance = info.architecture if info.multi_arch == "same" else ""
        others = {key: name for key, name in seen.items() if key[0] == info.package
                  and not (instance and key[1] and key[1] != instance)}
        if others:
            _refuse(f"{filename}: package {info.package!r} is also in "
                    f"{next(iter(others.values()))}")
        seen[(info.package, instance)] = filename
        infos.append(info)
    return tuple(infos)


def read_deb(path: Path, filename: str) -> DebInfo:
    """Package, Version and Architecture of one .deb, checked (the publisher's ``build`` uses
    it too)."""
    control = deb_control(path, filename)
    fields = {}
    for field, pattern in (("Package", _PACKAGE_RE), ("Version", _VERSION_RE),
                           ("Architecture", _ARCH_RE)):
        value = control.get(field)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            _refuse(f"{filename}: control field {field} is missing or invalid ({value!r})")
        fields[field] = value
    multi_arch = control.get("Multi-Arch")
    return DebInfo(filename=filename, package=fields["Package"], version=fields["Version"],
                   architecture=fields["Architecture"],
                   multi_arch="same" if multi_arch == "same" else "")


def deb_control(path: Path, filename: str) -> Mapping[str, str]:
    """The control fields of the .deb at ``path``, read with python-debian within bounds;
    :class:`UnsafePackageError` naming ``filename`` when it is not a valid .deb."""
    # Imported here: python-debian is only needed when there is something to apply.
    from debian.deb822 import Deb822
    from debian.debfile import DebFile

    try:
        with DebFile(filename=str(path)) as deb:
            if any(n.startswith("control.tar.zst") for n in deb.getnames()):
                # python-debian would pipe the whole member through unzstd, outside our
                # subprocess wrapper and unbounded in memory; Debian's dpkg-deb writes xz.
                _refuse(f"{filename}: zstd-compressed control archives are not supported")
            control = Deb822(_control_bytes(deb.control.tgz(), filename))
    except UnsafePackageError:
        raise
    except Exception as exc:  # python-debian raises many undocumented types; any is a refusal
        _refuse(f"{filename} is not a valid .deb ({type(exc).__name__}: {exc})")
    return control


def _control_bytes(tar: tarfile.TarFile, filename: str) -> bytes:
    """The ``control`` file of a control.tar, bounded in members and size."""
    for count, member in enumerate(tar, start=1):
        if count > MAX_CONTROL_MEMBERS:
            break
        if member.name.removeprefix("./") != "control":
            continue
        if not member.isfile() or member.size > MAX_CONTROL_BYTES:
            _refuse(f"{filename}: its control file is not a regular file of sane size")
        stream = tar.extractfile(member)
        if stream is None:
            break
        return stream.read(MAX_CONTROL_BYTES)
    _refuse(f"{filename} has no control file")


# --- dpkg's architectures ----------------------------------------------------------------


def dpkg_architectures(dpkg_root: Path) -> frozenset[str]:
    """``all``, dpkg's native architecture and the foreign ones added with
    ``dpkg --add-architecture`` for the dpkg database under ``dpkg_root``."""
    root_args = [] if os.path.normpath(dpkg_root) == "/" else [f"--root={dpkg_root}"]
    native = runner.run(["dpkg", *root_args, "--print-architecture"])
    foreign = runner.run(["dpkg", *root_args, "--print-foreign-architectures"])
    try:
        return parse_architectures(native.output, foreign.output)
    except ValueError as exc:
        raise SubprocessError(f"dpkg printed an unexpected architecture: {exc}", native.cmd,
                              native.returncode, native.output + foreign.output) from None


def parse_architectures(native_output: str, foreign_output: str) -> frozenset[str]:
    """Parse ``dpkg --print-architecture`` and ``--print-foreign-architectures`` output."""
    native = native_output.split()
    if len(native) != 1:
        raise ValueError(f"native architecture output {native_output!r}")
    archs = {"all", *native, *foreign_output.split()}
    bad = sorted(a for a in archs if not _ARCH_RE.fullmatch(a))
    if bad:
        raise ValueError(f"{bad}")
    return frozenset(archs)


# --- scripts and dry run -----------------------------------------------------------------


def prepare_scripts(extract_dir: Path, manifest: Manifest) -> None:
    """Make the run and health-check scripts executable (0700) for us only; modes stored in
    the zip are never used, so every other extracted file stays 0600."""
    for name in (manifest.run, manifest.healthcheck):
        if name is None:
            continue
        path = extract_dir / name
        if not stat.S_ISREG(os.lstat(path).st_mode):
            _refuse(f"{name} is not a regular file")
        os.chmod(path, 0o700)


def describe(manifest: Manifest, debs: Sequence[DebInfo]) -> list[str]:
    """Human-readable lines saying what applying the package would do (``run --dry-run``)."""
    lines = [f"package for release {manifest.version}:"]
    if debs:
        lines.append(f"  would install {len(debs)} Debian package(s), in this order:")
        lines.extend(f"    {d.package} {d.version} ({d.architecture}) from {d.filename}"
                     for d in debs)
    else:
        lines.append("  no Debian packages")
    if manifest.run is None:
        lines.append("  no run script")
    elif debs:
        lines.append(f"  run script {manifest.run}: run once every package is installed")
    else:
        lines.append(f"  run script {manifest.run}: run directly")
    lines.append(f"  health check {manifest.healthcheck}" if manifest.healthcheck
                 else "  no health check in the package")
    if manifest.apt_allow_remove:
        lines.append("  with installer: apt, apt may remove "
                     f"{', '.join(manifest.apt_allow_remove)}")
    return lines

