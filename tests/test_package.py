"""Safe extraction, manifest and .deb inspection (DESIGN 2.4, 3.2, 3.3).

Hostile archives are built inside each test (pip's ``tests/unit/test_utils_unpacking.py``);
every refusal also checks that nothing was left anywhere under the test's directory.
"""

from __future__ import annotations

import io
import json
import logging
import random
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import debs
import pytest
from debs import dpkg_command, dpkg_query, init_dpkg_root, make_deb, require_tool

from opq_box_updater import package, runner
from opq_box_updater.errors import SubprocessError, UnsafePackageError
from opq_box_updater.package import (
    CHUNK_SIZE,
    DebInfo,
    Manifest,
    copy_bounded,
    describe,
    dpkg_architectures,
    extract_package,
    inspect_debs,
    load_manifest,
    parse_architectures,
    prepare_scripts,
)

MiB = 1024 * 1024
Members = Iterable[tuple[str | zipfile.ZipInfo, bytes | str]]


# --- helpers -------------------------------------------------------------------------------


def make_zip(path: Path, members: Members, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Write ``members`` as given, duplicates and all (zipfile only warns about those)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w", compression) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def unix_info(name: str, mode: int = stat.S_IFREG | 0o644,
              compression: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    """A member made "on Unix", so that ``mode`` (type bits included) is read back."""
    info = zipfile.ZipInfo(name)
    info.filename = name  # ZipInfo() cuts at a NUL; we want the NUL in the archive
    info.create_system = 3
    info.external_attr = mode << 16
    info.compress_type = compression
    return info


def patch_member(path: Path, name: str, *, file_size: int | None = None,
                 crc: int | None = None, flag_bits: int | None = None,
                 header_offset: int | None = None) -> None:
    """Rewrite the header fields of member ``name`` in both the local header and the central
    directory: the lies a hostile zip tells."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    encoded = name.encode()
    central = [pos for pos in _find_all(data, b"PK\x01\x02")
               if data[pos + 46:pos + 46 + struct.unpack_from("<H", data, pos + 28)[0]]
               == encoded]
    assert len(central) == 1
    for offset, base in ((local, 0), (central[0], 2)):  # central records have 2 more bytes
        if flag_bits is not None:
            struct.pack_into("<H", data, offset + base + 6, flag_bits)
        if crc is not None:
            struct.pack_into("<L", data, offset + base + 14, crc)
        if file_size is not None:
            struct.pack_into("<L", data, offset + base + 22, file_size)
    if header_offset is not None:
        struct.pack_into("<L", data, central[0] + 42, header_offset)
    path.write_bytes(bytes(data))


def _find_all(data: bytes | bytearray, needle: bytes) -> list[int]:
    found, pos = [], data.find(needle)
    while pos >= 0:
        found.append(pos)
        pos = data.find(needle, pos + 1)
    return found


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


def assert_refused(zip_path: Path, parent: Path, match: str, **kwargs: int) -> None:
    """Extraction refuses with ``match`` and leaves nothing behind, inside or outside."""
    before = tree(zip_path.parent)
    kwargs.setdefault("max_unpacked_bytes", 10 * MiB)
    with pytest.raises(UnsafePackageError, match=match) as excinfo:
        extract_package(zip_path, parent, **kwargs)
    assert "\n" not in str(excinfo.value)
    assert tree(zip_path.parent) == before
    assert not list(parent.iterdir())


# --- extraction: what is accepted ----------------------------------------------------------


def test_extracts_into_fresh_private_directory(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [
        ("manifest.json", "{}"),
        (unix_info("update.sh", stat.S_IFREG | 0o4777), "#!/bin/sh\n"),
        ("data/", b""),
        ("data/./sub//file.bin", bytes(range(256)) * 1000),
        ("deep/implied/dirs.txt", "x"),
    ])
    first = extract_package(zip_path, parent, max_unpacked_bytes=MiB)
    second = extract_package(zip_path, parent, max_unpacked_bytes=MiB)
    assert first != second and first.parent == parent == second.parent
    assert first.name.startswith("extract-")
    assert tree(first) == {"manifest.json", "update.sh", "data", "data/sub",
                           "data/sub/file.bin", "deep", "deep/implied", "deep/implied/dirs.txt"}
    assert (first / "data/sub/file.bin").read_bytes() == bytes(range(256)) * 1000
    for path in [first, *first.rglob("*")]:  # zip modes (here setuid 0777) are never used
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.lstat().st_mode) == expected, path


def test_exactly_max_members_is_accepted(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [(f"f{i}", "x") for i in range(3)])
    assert len(tree(extract_package(zip_path, parent, max_unpacked_bytes=3,
                                    max_members=3))) == 3


# --- extraction: names and types -----------------------------------------------------------


@pytest.mark.parametrize(("name", "match"), [
    ("/etc/passwd", "absolute"),
    ("//server/share", "absolute"),
    ("../evil", r"'\.\.'"),
    ("a/../../evil", r"'\.\.'"),
    ("a/..", r"'\.\.'"),
    ("..", r"'\.\.'"),
    ("..\\evil", "backslash"),
    ("a\\b", "backslash"),
    ("a\0b", "NUL"),
    ("ok\0/../../evil", "NUL"),
    ("a\nb", "control character"),
    ("", "empty name"),
    (".", "extraction directory itself"),
    ("./", "extraction directory itself"),
    ("x" * 256, "component longer"),
    ("a/" * 600, "longer than"),
])
def test_refuses_unsafe_names(tmp_path: Path, parent: Path, name: str, match: str) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("good.txt", "x"), (unix_info(name), "evil")])
    assert_refused(zip_path, parent, match)


@pytest.mark.parametrize(("mode", "match"), [
    (stat.S_IFLNK | 0o777, "symlink"),
    (stat.S_IFCHR | 0o666, "character device"),
    (stat.S_IFBLK | 0o660, "block device"),
    (stat.S_IFIFO | 0o644, "fifo"),
    (stat.S_IFSOCK | 0o755, "socket"),
    (0o070000 | 0o644, "unknown file type"),
    (stat.S_IFDIR | 0o755, "disagree"),
])
def test_refuses_anything_but_files_and_dirs(tmp_path: Path, parent: Path, mode: int,
                                             match: str) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [(unix_info("member", mode), "/etc/passwd")])
    assert_refused(zip_path, parent, f"'member'.*{match}")


def test_refuses_symlink_then_write_through_it(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [
        (unix_info("link", stat.S_IFLNK | 0o777), str(tmp_path)),
        ("link/escaped", "evil"),
    ])
    assert_refused(zip_path, parent, "symlink")


def test_refuses_directory_named_like_a_file(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [(unix_info("d/", stat.S_IFREG | 0o644), "")])
    assert_refused(zip_path, parent, "disagree")


def test_refuses_directory_with_data(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [(unix_info("d/", 0), "data")])
    assert_refused(zip_path, parent, "directory with data")


@pytest.mark.parametrize(("first", "second"), [
    ("a", "a"),
    ("a/./b", "a/b"),
    ("a//b", "a/b"),
    ("./x", "x"),
    ("d/", "d"),
    ("d/", "d/"),
])
def test_refuses_repeated_names(tmp_path: Path, parent: Path, first: str,
                                second: str) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [(first, ""), (second, "")])
    assert_refused(zip_path, parent, "repeats")


def test_refuses_file_that_is_also_a_directory(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("a", "x"), ("a/b", "y")])
    assert_refused(zip_path, parent, "'a' is a file but other members are inside it")


def test_refuses_too_many_members(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [(f"f{i}", "x") for i in range(4)])
    assert_refused(zip_path, parent, "4 members, more than the limit of 3", max_members=3)


def test_refuses_oversized_central_directory_before_parsing(tmp_path: Path,
                                                            parent: Path) -> None:
    infos = [unix_info(f"f{i}") for i in range(2)]
    for info in infos:  # a valid but huge extra field in every entry
        info.extra = struct.pack("<HH", 0xCAFE, 60000) + bytes(60000)
    zip_path = make_zip(tmp_path / "p.zip", [(info, "x") for info in infos])
    assert_refused(zip_path, parent, "central directory", max_members=2)


def test_refuses_encrypted_member(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("secret", "x" * 100)])
    patch_member(zip_path, "secret", flag_bits=0x1)
    assert_refused(zip_path, parent, "'secret' is encrypted")


def test_refuses_member_pointing_outside_the_archive(tmp_path: Path,
                                                     parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("a.txt", "x")])
    patch_member(zip_path, "a.txt", header_offset=0xFFFFFF00)
    assert_refused(zip_path, parent, "'a.txt' points outside the archive")


def test_refuses_other_compression_methods(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("a.txt", "x" * 100)], zipfile.ZIP_BZIP2)
    assert_refused(zip_path, parent, "compression method 12")


# --- extraction: sizes (zip bombs) ---------------------------------------------------------


def test_refuses_honest_bomb_without_writing(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("zeros", bytes(2 * MiB))])
    assert zip_path.stat().st_size < 10_000
    assert_refused(zip_path, parent, "declare .* more than max_unpacked_bytes",
                   max_unpacked_bytes=MiB)


@pytest.mark.parametrize("fix_crc", [False, True])
def test_refuses_member_holding_more_than_declared(tmp_path: Path, parent: Path,
                                                   fix_crc: bool) -> None:
    """The declared sizes pass every check; only counting what is written catches it. With
    the CRC fixed to match the declared prefix, zipfile alone would truncate silently."""
    bomb = bytes(5 * MiB)
    zip_path = make_zip(tmp_path / "p.zip", [("small", "ok"), ("bomb", bomb)])
    patch_member(zip_path, "bomb", file_size=1000,
                 crc=zlib.crc32(bomb[:1000]) if fix_crc else None)
    assert_refused(zip_path, parent, "'bomb' holds more than the 1000 bytes it declares")


def test_refuses_member_holding_less_than_declared(tmp_path: Path, parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("short", "x" * 100)], zipfile.ZIP_STORED)
    patch_member(zip_path, "short", file_size=200)
    assert_refused(zip_path, parent, "'short' holds 100 bytes, fewer than the 200")


def test_copy_bounded_never_writes_past_budget() -> None:
    src, dst = io.BytesIO(bytes(5 * CHUNK_SIZE)), io.BytesIO()
    with pytest.raises(UnsafePackageError, match="'m' goes over max_unpacked_bytes"):
        copy_bounded(src, dst, name="m", declared=10 * CHUNK_SIZE, budget=2 * CHUNK_SIZE + 1)
    assert len(dst.getvalue()) == 2 * CHUNK_SIZE


def test_copy_bounded_never_writes_past_declared_size() -> None:
    src, dst = io.BytesIO(bytes(3 * CHUNK_SIZE)), io.BytesIO()
    with pytest.raises(UnsafePackageError, match="more than the 10 bytes"):
        copy_bounded(src, dst, name="m", declared=10, budget=10 * CHUNK_SIZE)
    assert dst.getvalue() == b""


# --- extraction: corrupt archives ----------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x05\x06" + bytes(10)])
def test_refuses_non_zip(tmp_path: Path, parent: Path, content: bytes) -> None:
    zip_path = tmp_path / "p.zip"
    zip_path.write_bytes(content)
    assert_refused(zip_path, parent, "not a valid zip file")


def test_corrupt_member_removes_what_was_already_written(tmp_path: Path,
                                                         parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [("first", "A" * 1000), ("second", "B" * 1000)],
                        zipfile.ZIP_STORED)
    data = bytearray(zip_path.read_bytes())
    data[data.find(b"B" * 1000) + 500] ^= 0x01  # one flipped bit: CRC error in "second"
    zip_path.write_bytes(bytes(data))
    assert_refused(zip_path, parent, "'second' is corrupt .*CRC")


def test_random_corruption_only_ever_refuses(tmp_path: Path, parent: Path) -> None:
    """Flipped bytes and truncations anywhere give UnsafePackageError or a clean result,
    never another exception and never leftovers."""
    good = make_zip(tmp_path / "good.zip", [
        ("manifest.json", '{"a": 1}'), ("d/", ""), ("d/x.bin", bytes(range(256)) * 40),
        (unix_info("update.sh", compression=zipfile.ZIP_STORED), "#!/bin/sh\necho hi\n"),
    ]).read_bytes()
    rng = random.Random(20240601)
    zip_path = tmp_path / "p.zip"
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        zip_path.write_bytes(bytes(data[:rng.randrange(len(data))] if rng.random() < 0.1
                                   else data))
        try:
            extracted = extract_package(zip_path, parent, max_unpacked_bytes=MiB)
        except UnsafePackageError:
            assert not list(parent.iterdir())
        else:
            assert tree(extracted) <= {"manifest.json", "d", "d/x.bin", "update.sh"}
            for path in sorted(extracted.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            extracted.rmdir()


# --- manifest ------------------------------------------------------------------------------


def write_package(root: Path, manifest: object, files: Iterable[str] = (
        "a_1.0_all.deb", "b_2.0_all.deb", "update.sh", "healthcheck.sh")) -> Path:
    root.mkdir(exist_ok=True)
    for name in files:
        (root / name).write_text("x")
    raw = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (root / "manifest.json").write_text(raw)
    return root


GOOD = {"format": 1, "version": 3, "debs": ["a_1.0_all.deb", "b_2.0_all.deb"],
        "run": "update.sh", "healthcheck": "healthcheck.sh"}


def test_load_manifest(tmp_path: Path) -> None:
    root = write_package(tmp_path / "x", GOOD)
    assert load_manifest(root, 3) == Manifest(1, 3, ("a_1.0_all.deb", "b_2.0_all.deb"),
                                              "update.sh", "healthcheck.sh")


@pytest.mark.parametrize("changes", [
    {"debs": [], "healthcheck": None},  # the seed's case: just a run script
    {"run": None},
    {"run": None, "healthcheck": None, "debs": ["a_1.0_all.deb"]},
])
def test_load_manifest_optional_parts(tmp_path: Path, changes: dict[str, object]) -> None:
    doc: dict[str, object] = {**GOOD, **changes}
    debs = doc["debs"]
    assert isinstance(debs, list)
    # only the files it names: an unlisted deb is refused (test_unlisted.py)
    files = [*debs, *(n for n in (doc["run"], doc["healthcheck"]) if isinstance(n, str))]
    manifest = load_manifest(write_package(tmp_path / "x", doc, files), 3)
    assert (manifest.debs, manifest.run) != ((), None)


def test_wrong_release_is_refused(tmp_path: Path) -> None:
    root = write_package(tmp_path / "x", {**GOOD, "version": 4})
    with pytest.raises(UnsafePackageError, match=r"package is for release 4, not 3$"):
        load_manifest(root, 3)


def test_unlisted_files_are_allowed_and_logged(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    root = write_package(tmp_path / "x", GOOD, ["a_1.0_all.deb", "b_2.0_all.deb", "update.sh",
                                                "healthcheck.sh", "README", "data.csv"])
    with caplog.at_level(logging.INFO, logger="opq_box_updater.package"):
        load_manifest(root, 3)
    assert "unlisted entries: README, data.csv" in caplog.text


@pytest.mark.parametrize(("manifest", "match"), [
    ('{"format": 1, "format": 1, "version": 3, "debs": [], "run": "update.sh", '
     '"healthcheck": null}', "key 'format' twice"),
    ({**GOOD, "version": 3.0}, "non-integer number 3.0"),
    ('{"format": 1, "version": NaN}', "non-integer number NaN"),
    ({**GOOD, "version": True}, "version True is not an integer"),
    ({**GOOD, "version": "3"}, "version '3' is not an integer"),
    ({**GOOD, "format": 2}, "format 2 is not 1"),
    ({**GOOD, "format": True}, "format True is not 1"),
    ({k: v for k, v in GOOD.items() if k != "healthcheck"}, r"missing \['healthcheck'\]"),
    ({**GOOD, "extra": 1}, r"unknown \['extra'\]"),
    ("[1, 2]", "not a JSON object"),
    ("{", "not valid JSON"),
    ("\ufeff{}", "not valid JSON"),
    ({**GOOD, "debs": "a_1.0_all.deb"}, "debs must be a list"),
    ({**GOOD, "debs": [1]}, "entry 1 is not a plain file name"),
    ({**GOOD, "debs": ["sub/a_1.0_all.deb"]}, "not a plain file name"),
    ({**GOOD, "debs": ["../a_1.0_all.deb"]}, "not a plain file name"),
    ({**GOOD, "debs": ["-a_1.0_all.deb"]}, "not a plain file name"),
    ({**GOOD, "debs": [".deb"]}, "not a plain file name"),
    ({**GOOD, "debs": ["update.sh"]}, "ending in .deb"),
    ({**GOOD, "debs": ["c_1.0_all.deb"]}, "'c_1.0_all.deb', which is not in the package"),
    ({**GOOD, "debs": ["a_1.0_all.deb", "a_1.0_all.deb"]}, "names a file twice"),
    ({**GOOD, "run": "a_1.0_all.deb"}, "names a file twice"),
    ({**GOOD, "run": "missing.sh"}, "'missing.sh', which is not in the package"),
    ({**GOOD, "run": "manifest.json"}, "not a plain file name"),
    ({**GOOD, "run": 7}, "not a plain file name"),
    ({**GOOD, "healthcheck": "/bin/true"}, "not a plain file name"),
    ({**GOOD, "debs": [], "run": None}, "neither debs nor a run script"),
])
def test_invalid_manifests_are_refused(tmp_path: Path, manifest: object, match: str) -> None:
    with pytest.raises(UnsafePackageError, match=match):
        load_manifest(write_package(tmp_path / "x", manifest), 3)


def test_manifest_must_be_a_small_regular_file(tmp_path: Path) -> None:
    root = tmp_path / "x"
    root.mkdir()
    with pytest.raises(UnsafePackageError, match=r"manifest\.json is missing"):
        load_manifest(root, 3)
    (root / "manifest.json").mkdir()
    with pytest.raises(UnsafePackageError, match="not a regular file"):
        load_manifest(root, 3)
    (root / "manifest.json").rmdir()
    (root / "manifest.json").write_text(" " * (64 * 1024 + 1))
    with pytest.raises(UnsafePackageError, match="larger than"):
        load_manifest(root, 3)


def test_named_file_must_be_regular(tmp_path: Path) -> None:
    root = write_package(tmp_path / "x", GOOD, ["a_1.0_all.deb", "b_2.0_all.deb",
                                                "healthcheck.sh"])
    (root / "update.sh").mkdir()
    with pytest.raises(UnsafePackageError, match=r"'update\.sh', which is not a regular file"):
        load_manifest(root, 3)


# --- scripts and dry run -------------------------------------------------------------------


def test_prepare_scripts_makes_only_the_scripts_executable(tmp_path: Path,
                                                           parent: Path) -> None:
    zip_path = make_zip(tmp_path / "p.zip", [
        ("manifest.json", json.dumps({**GOOD, "debs": []})),
        (unix_info("update.sh", stat.S_IFREG | 0o755), "#!/bin/sh\n"),
        (unix_info("healthcheck.sh", stat.S_IFREG | 0o755), "#!/bin/sh\n"),
        (unix_info("helper.sh", stat.S_IFREG | 0o755), "#!/bin/sh\n"),
    ])
    root = extract_package(zip_path, parent, max_unpacked_bytes=MiB)
    prepare_scripts(root, load_manifest(root, 3))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.iterdir()}
    assert modes == {"manifest.json": 0o600, "update.sh": 0o700, "healthcheck.sh": 0o700,
                     "helper.sh": 0o600}


def test_describe() -> None:
    manifest = Manifest(1, 7, ("a_1.0_all.deb",), "update.sh", None)
    lines = describe(manifest, [DebInfo("a_1.0_all.deb", "a", "1.0", "all")])
    assert lines[0] == "package for release 7:"
    assert "    a 1.0 (all) from a_1.0_all.deb" in lines
    assert "  run script update.sh: run once every package is installed" in lines
    assert lines[-1] == "  no health check in the package"
    alone = describe(Manifest(1, 7, (), "update.sh", "h.sh"), [])
    assert "  run script update.sh: run directly" in alone and "  health check h.sh" in alone


# --- .deb inspection -----------------------------------------------------------------------


def deb_manifest(*debs: str) -> Manifest:
    return Manifest(1, 3, debs, None, None)


def test_inspect_debs_reads_real_debs_in_manifest_order(tmp_path: Path) -> None:
    b = make_deb(tmp_path, "opq-b", "1:2.0-1", arch="armhf", compression="gzip")
    a = make_deb(tmp_path, "opq-a", "1.0", depends="opq-b")
    infos = inspect_debs(tmp_path, deb_manifest(b.name, a.name), {"all", "amd64", "armhf"})
    assert infos == (DebInfo(b.name, "opq-b", "1:2.0-1", "armhf"),
                     DebInfo(a.name, "opq-a", "1.0", "all"))


def test_inspect_debs_refuses_other_architectures(tmp_path: Path) -> None:
    deb = make_deb(tmp_path, "opq-a", "1.0", arch="s390x")
    with pytest.raises(UnsafePackageError, match=f"{deb.name}: architecture 's390x'"):
        inspect_debs(tmp_path, deb_manifest(deb.name), {"all", "amd64"})


def test_inspect_debs_refuses_repeated_package(tmp_path: Path) -> None:
    one = make_deb(tmp_path, "opq-a", "1.0")
    two = make_deb(tmp_path, "opq-a", "2.0")
    with pytest.raises(UnsafePackageError, match="package 'opq-a' is also in"):
        inspect_debs(tmp_path, deb_manifest(one.name, two.name), {"all"})


def handmade_deb(path: Path, control: bytes | None, *, symlink: bool = False,
                 control_name: str = "control.tar.gz") -> Path:
    """A .deb assembled by hand (ar + tar), to say things dpkg-deb refuses to build."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tar:
        if control is not None:
            info = tarfile.TarInfo("./control")
            if symlink:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(control)
            tar.addfile(info, io.BytesIO(control))
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w:gz"):
        pass
    out = bytearray(b"!<arch>\n")
    for name, data in (("debian-binary", b"2.0\n"), (control_name, tar_bytes.getvalue()),
                       ("data.tar.gz", empty.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


GOOD_CONTROL = b"Package: opq-a\nVersion: 1.0\nArchitecture: all\nDescription: x\n"


@pytest.mark.parametrize(("control", "match"), [
    (GOOD_CONTROL.replace(b"opq-a", b"Opq_A"), "field Package .* invalid"),
    (GOOD_CONTROL.replace(b"Version: 1.0", b"Version: 1.0;reboot"), "field Version"),
    (GOOD_CONTROL.replace(b"Architecture: all\n", b""), "field Architecture .* missing"),
    (None, "has no control file"),
])
def test_inspect_debs_refuses_bad_control(tmp_path: Path, control: bytes | None,
                                          match: str) -> None:
    handmade_deb(tmp_path / "x.deb", control)
    with pytest.raises(UnsafePackageError, match=f"x.deb.*{match}"):
        inspect_debs(tmp_path, deb_manifest("x.deb"), {"all"})


def test_handmade_deb_is_read_when_valid(tmp_path: Path) -> None:
    handmade_deb(tmp_path / "x.deb", GOOD_CONTROL)
    assert inspect_debs(tmp_path, deb_manifest("x.deb"), {"all"})[0].package == "opq-a"


def test_inspect_debs_refuses_control_symlink(tmp_path: Path) -> None:
    handmade_deb(tmp_path / "x.deb", GOOD_CONTROL, symlink=True)
    with pytest.raises(UnsafePackageError, match="not a regular file"):
        inspect_debs(tmp_path, deb_manifest("x.deb"), {"all"})


def test_inspect_debs_refuses_zstd_control(tmp_path: Path) -> None:
    handmade_deb(tmp_path / "x.deb", GOOD_CONTROL, control_name="control.tar.zst")
    with pytest.raises(UnsafePackageError, match="zstd"):
        inspect_debs(tmp_path, deb_manifest("x.deb"), {"all"})


@pytest.mark.parametrize("content", [b"", b"garbage", b"!<arch>\n"])
def test_inspect_debs_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.deb").write_bytes(content)
    with pytest.raises(UnsafePackageError, match=r"x\.deb is not a valid \.deb"):
        inspect_debs(tmp_path, deb_manifest("x.deb"), {"all"})


# --- dpkg's architectures ------------------------------------------------------------------


def test_dpkg_architectures_of_a_test_root(tmp_path: Path) -> None:
    require_tool("dpkg")
    root = init_dpkg_root(tmp_path / "root")
    (root / "var/lib/dpkg/arch").write_text("amd64\narmhf\ni386\n")
    native = runner.run(["dpkg", "--print-architecture"]).output.strip()
    assert dpkg_architectures(root) == {"all", native, "armhf", "i386", "amd64"}


def test_dpkg_architectures_passes_root_only_when_not_slash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_run(cmd: list[str], **_: object) -> runner.Result:
        calls.append(tuple(cmd))
        return runner.Result(tuple(cmd), 0, "arm64\n" if cmd[-1] == "--print-architecture"
                             else "")

    monkeypatch.setattr(package.runner, "run", fake_run)
    assert dpkg_architectures(Path("/")) == {"all", "arm64"}
    dpkg_architectures(Path("/srv/box"))
    assert calls == [("dpkg", "--print-architecture"), ("dpkg", "--print-foreign-architectures"),
                     ("dpkg", "--root=/srv/box", "--print-architecture"),
                     ("dpkg", "--root=/srv/box", "--print-foreign-architectures")]


def test_parse_architectures() -> None:
    assert parse_architectures("amd64\n", "i386\narmhf\n") == {"all", "amd64", "i386", "armhf"}
    for native, foreign in (("", ""), ("amd64 i386", ""), ("amd64", "../x")):
        with pytest.raises(ValueError):
            parse_architectures(native, foreign)


def test_unexpected_dpkg_output_is_a_subprocess_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(package.runner, "run",
                        lambda cmd, **_: runner.Result(tuple(cmd), 0, "Not An Arch\n"))
    with pytest.raises(SubprocessError, match="unexpected architecture"):
        dpkg_architectures(Path("/"))


# --- the test helpers themselves -----------------------------------------------------------


def test_make_deb_installs_into_a_throwaway_dpkg_root(tmp_path: Path) -> None:
    """make_deb + init_dpkg_root give what the installer tests need; the host's dpkg
    database is never touched."""
    root = init_dpkg_root(tmp_path / "root")
    deb = make_deb(tmp_path / "debs", "opq-helper-test", "1:1.0-1",
                   files={"usr/share/opq-helper-test/data": b"\x00\x01",
                          "etc/opq-helper-test.conf": "a=1\n"},
                   scripts={"postinst": 'echo "$1" > "$DPKG_ROOT/postinst-ran"\n'},
                   control_files={"conffiles": "/etc/opq-helper-test.conf\n"})
    assert deb.name == "opq-helper-test_1.0-1_all.deb"
    runner.run(dpkg_command(root, "-i", str(deb)))
    assert dpkg_query(root) == {"opq-helper-test": "1:1.0-1"}
    assert (root / "usr/share/opq-helper-test/data").read_bytes() == b"\x00\x01"
    assert (root / "postinst-ran").read_text() == "configure\n"
    assert "install opq-helper-test" in (root / "var/log/dpkg.log").read_text()
    host_status = Path("/var/lib/dpkg/status")
    assert not host_status.exists() or "opq-helper-test" not in host_status.read_text()


@pytest.mark.parametrize(("ci", "outcome"), [("1", pytest.fail.Exception),
                                             ("", pytest.skip.Exception)])
def test_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch, ci: str,
                                     outcome: type[BaseException]) -> None:
    monkeypatch.setattr(debs.shutil, "which", lambda *_, **__: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="dpkg-deb is not installed"):
        require_tool("dpkg-deb")
