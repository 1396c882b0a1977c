"""Limits of package.py that mutation testing (make mutate) showed untested: each test here
failed against at least one surviving mutant (a bound moved by one, a check weakened)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import test_package
from debs import make_deb
from test_package import assert_refused, make_zip, tree

from opq_box_updater import package
from opq_box_updater.errors import UnsafePackageError
from opq_box_updater.package import extract_package

parent = test_package.parent  # the download directory fixture

MiB = 1024 * 1024


# --- member names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a b", " lead", "trail ", "x~y", "é"])
def test_blanks_and_printable_names_are_extracted(tmp_path: Path, parent: Path,
                                                  name: str) -> None:
    dest = extract_package(make_zip(tmp_path / "p.zip", [(name, "x")]), parent,
                           max_unpacked_bytes=MiB)
    assert (dest / name).read_bytes() == b"x"


@pytest.mark.parametrize("char", ["\x7f", "\x1f", "\x01", "\n"])
def test_control_characters_and_del_are_refused(tmp_path: Path, parent: Path,
                                                char: str) -> None:
    assert_refused(make_zip(tmp_path / "p.zip", [(f"a{char}b", "x")]), parent,
                   "control character")


def test_name_and_component_lengths_are_exact(tmp_path: Path, parent: Path) -> None:
    """255-byte components and 1024-byte names are extracted; one byte more is refused."""
    longest = "/".join(["c" * 255] * 3 + ["d" * 254, "e"])  # 1020 + 4 slashes
    assert len(longest) == package.MAX_NAME_BYTES
    dest = extract_package(make_zip(tmp_path / "ok.zip", [(longest, "x")]), parent,
                           max_unpacked_bytes=MiB)
    assert (dest / longest).is_file()
    parent = tmp_path / "refused"
    parent.mkdir()
    assert_refused(make_zip(tmp_path / "name.zip", [(longest + "d", "x")]), parent,
                   "longer than 1024")
    assert_refused(make_zip(tmp_path / "part.zip", [("c" * 256, "x")]), parent,
                   "component longer than 255")


def test_central_directory_cap_is_on_its_size_not_its_offset(tmp_path: Path,
                                                             parent: Path) -> None:
    """A few members far into a large archive: the cap counts central directory bytes only."""
    data = bytes(range(256)) * (12 * 1024)  # 3 MiB, stored: the directory starts past it
    zip_path = make_zip(tmp_path / "big.zip", [("big.bin", data)], zipfile.ZIP_STORED)
    dest = extract_package(zip_path, parent, max_unpacked_bytes=8 * MiB, max_members=1)
    assert (dest / "big.bin").stat().st_size == len(data)


# --- .deb control archives -----------------------------------------------------------------


def _tar_gz(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += (f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n").encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return out


CONTROL = b"Package: hello\nVersion: 1.0\nArchitecture: all\n"


def _deb(path: Path, control_members: list[tuple[str, bytes]]) -> Path:
    """A .deb made by hand: dpkg-deb would not write the hostile control archives."""
    path.write_bytes(_ar([("debian-binary", b"2.0\n"),
                          ("control.tar.gz", _tar_gz(control_members)),
                          ("data.tar.gz", _tar_gz([]))]))
    return path


def test_control_member_cap_is_exact(tmp_path: Path) -> None:
    """The control file as the 100th member is read; as the 101st it is not looked for."""
    fillers = [(f"./f{i}", b"") for i in range(package.MAX_CONTROL_MEMBERS - 1)]
    ok = _deb(tmp_path / "ok.deb", [*fillers, ("./control", CONTROL)])
    assert package.read_deb(ok, "ok.deb").package == "hello"
    late = _deb(tmp_path / "late.deb", [*fillers, ("./g", b""), ("./control", CONTROL)])
    with pytest.raises(UnsafePackageError, match="has no control file"):
        package.read_deb(late, "late.deb")


def test_control_file_size_cap_is_exact(tmp_path: Path) -> None:
    """A control file of exactly MAX_CONTROL_BYTES is read; one byte more is refused."""
    pad = package.MAX_CONTROL_BYTES - len(CONTROL) - len(b"Description: x\n")
    body = CONTROL + b"Description: x\n" + b" " + b"y" * (pad - 2) + b"\n"
    assert len(body) == package.MAX_CONTROL_BYTES
    ok = _deb(tmp_path / "ok.deb", [("./control", body)])
    assert package.read_deb(ok, "ok.deb").version == "1.0"
    big = _deb(tmp_path / "big.deb", [("./control", body + b"z")])
    with pytest.raises(UnsafePackageError, match="regular file of sane size"):
        package.read_deb(big, "big.deb")


@pytest.mark.parametrize("arch", ["amd64 ", "AMD64", "amd_64", "-amd64", "amd64/x"])
def test_architecture_must_match_whole(tmp_path: Path, arch: str) -> None:
    body = CONTROL.replace(b"Architecture: all", f"Architecture: {arch}".encode())
    deb = _deb(tmp_path / "a.deb", [("./control", body)])
    if arch.strip() != arch:  # deb822 strips the value: trailing blanks are harmless
        assert package.read_deb(deb, "a.deb").architecture == arch.strip()
        return
    with pytest.raises(UnsafePackageError, match="Architecture"):
        package.read_deb(deb, "a.deb")


def test_nothing_left_beside_a_refused_deb(tmp_path: Path) -> None:
    deb = _deb(tmp_path / "x.deb", [("./g", b"")])
    before = tree(tmp_path)
    with pytest.raises(UnsafePackageError):
        package.read_deb(deb, "x.deb")
    assert tree(tmp_path) == before


# --- what the package holds ----------------------------------------------------------------


@pytest.mark.parametrize("name", [package.RUN_STATUS_FILE, package.APT_CONFIG_FILE])
def test_updater_file_names_are_reserved(tmp_path: Path, parent: Path, name: str) -> None:
    assert_refused(make_zip(tmp_path / "p.zip", [(name, "{}"), ("a", "x")]), parent,
                   "reserved")


def test_unlisted_deb_is_found_whatever_its_case_but_not_as_a_directory(
        tmp_path: Path) -> None:
    good = {"format": 1, "version": 3, "debs": ["a_1.0_all.deb"], "run": None,
            "healthcheck": None}
    root = test_package.write_package(tmp_path / "x", good, ["a_1.0_all.deb"])
    (root / "dir.deb").mkdir()
    assert package.load_manifest(root, 3).debs == ("a_1.0_all.deb",)
    (root / "sub").mkdir()
    (root / "sub" / "EXTRA.DEB").write_text("x")
    with pytest.raises(UnsafePackageError, match=r"EXTRA\.DEB"):
        package.load_manifest(root, 3)


def test_health_check_made_executable_without_a_run_script(tmp_path: Path) -> None:
    root = test_package.write_package(tmp_path / "x", {}, ["check.sh", "other"])
    manifest = package.Manifest(1, 3, (), None, "check.sh")
    package.prepare_scripts(root, manifest)
    assert (root / "check.sh").stat().st_mode & 0o777 == 0o700


# --- the manifest's optional apt_allow_remove (issue 12) ------------------------------------

BASE = {"format": 1, "version": 3, "debs": ["a_1.0_all.deb"], "run": None,
        "healthcheck": None}


def _manifest_dir(tmp_path: Path, doc: object) -> Path:
    root = tmp_path / "x"
    root.mkdir()
    (root / "a_1.0_all.deb").write_text("x")
    (root / "manifest.json").write_text(json.dumps(doc))
    return root


def test_a_manifest_without_the_key_allows_no_removal(tmp_path: Path) -> None:
    manifest = package.load_manifest(_manifest_dir(tmp_path, BASE), 3)
    assert manifest.apt_allow_remove == ()
    assert not any("apt may remove" in line for line in package.describe(manifest, []))


def test_the_key_lists_package_names(tmp_path: Path) -> None:
    doc = {**BASE, "apt_allow_remove": ["old", "libfoo:i386", "g++-12"]}
    manifest = package.load_manifest(_manifest_dir(tmp_path, doc), 3)
    assert manifest.apt_allow_remove == ("old", "libfoo:i386", "g++-12")
    assert package.describe(manifest, [])[-1] == \
        "  with installer: apt, apt may remove old, libfoo:i386, g++-12"


@pytest.mark.parametrize(("value", "match"), [
    ("old", "apt_allow_remove must be a list"),
    ({"old": 1}, "apt_allow_remove must be a list"),
    (None, "apt_allow_remove must be a list"),
    ([1], "apt_allow_remove entry 1 is not a package name"),
    ([None], "entry None is not a package name"),
    (["Old"], "entry 'Old' is not a package name"),
    (["-old"], "is not a package name"),
    (["old pkg"], "is not a package name"),
    (["a"], "entry 'a' is not a package name"),  # Debian names have two characters at least
    (["old:"], "is not a package name"),
    (["old:I386"], "is not a package name"),
    (["old:i386:x"], "is not a package name"),
    (["old", "old"], "apt_allow_remove names a package twice"),
])
def test_bad_apt_allow_remove_values_are_refused(tmp_path: Path, value: object,
                                                 match: str) -> None:
    with pytest.raises(UnsafePackageError, match=match):
        package.load_manifest(_manifest_dir(tmp_path, {**BASE, "apt_allow_remove": value}), 3)


def test_other_unknown_keys_are_still_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafePackageError, match=(
            r"must have exactly the keys \['debs', 'format', 'healthcheck', 'run', 'version'\] "
            r"and optionally \['apt_allow_remove'\] \(missing \[\], unknown \['apt_remove'\]\)")):
        package.load_manifest(_manifest_dir(tmp_path, {**BASE, "apt_remove": []}), 3)


# --- Multi-Arch: same packages, once per architecture (issue 12) ---------------------------

SAME = {"Multi-Arch": "same"}


@pytest.fixture(scope="module")
def arch_debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Built once: ``libfoo`` Multi-Arch: same for two architectures, ``tool`` not."""
    out = tmp_path_factory.mktemp("arch-debs")
    debs = {}
    for name, arch, control in (("libfoo", "amd64", SAME), ("libfoo", "i386", SAME),
                                ("libfoo", "i386", {}), ("tool", "amd64", {}),
                                ("tool", "i386", {})):
        deb = make_deb(out / f"{name}{arch}{len(control)}", name, "1.0", arch=arch,
                       extra_control=control)
        debs[f"{name}:{arch}{'+same' if control else ''}"] = deb.read_bytes()
    return debs


@pytest.mark.parametrize(("debs", "refused"), [
    (["libfoo:amd64+same", "libfoo:i386+same"], False),
    (["libfoo:amd64+same", "libfoo:amd64+same"], True),
    (["tool:amd64", "tool:i386"], True),
    (["libfoo:amd64+same", "libfoo:i386"], True),
    (["libfoo:i386", "libfoo:amd64+same"], True),
])
def test_a_package_comes_once_per_instance(tmp_path: Path, arch_debs: dict[str, bytes],
                                           debs: list[str], refused: bool) -> None:
    names = []
    for index, which in enumerate(debs):
        name = f"d{index}.deb"
        (tmp_path / name).write_bytes(arch_debs[which])
        names.append(name)
    manifest = package.Manifest(1, 1, tuple(names), None, None)
    if refused:
        with pytest.raises(UnsafePackageError,
                           match=r"d1\.deb: package '(libfoo|tool)' is also in d0\.deb"):
            package.inspect_debs(tmp_path, manifest, None)
    else:
        infos = package.inspect_debs(tmp_path, manifest, None)
        assert [(d.architecture, d.multi_arch) for d in infos] == [("amd64", "same"),
                                                                   ("i386", "same")]


# --- the remaining survivors of make mutate (issue 9) ---------------------------------------


def test_central_directory_of_exactly_the_cap_is_accepted(tmp_path: Path, parent: Path) -> None:
    """The central directory may take MAX_CENTRAL_DIR_BYTES_PER_MEMBER bytes per member,
    exactly: one entry of 46 + name + comment bytes filling it is extracted."""
    info = zipfile.ZipInfo("a" * 10)
    info.comment = b"c" * (package.MAX_CENTRAL_DIR_BYTES_PER_MEMBER - 46 - 10)
    path = make_zip(tmp_path / "p.zip", [(info, "x")])
    dest = extract_package(path, parent, max_unpacked_bytes=MiB, max_members=1)
    assert (dest / info.filename).read_bytes() == b"x"
    info.comment += b"c"
    other = tmp_path / "other"
    other.mkdir()
    assert_refused(make_zip(tmp_path / "q.zip", [(info, "x")]), other, "central directory",
                   max_members=1)


def test_a_member_file_is_never_opened_through_a_planted_link(
        tmp_path: Path, parent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line of defence: should a link ever stand where a member goes (a bug in
    the checks, a race), creating the member fails instead of writing through it."""
    outside = tmp_path / "outside"
    real_mkdtemp = package.tempfile.mkdtemp

    def planted(**kwargs: object) -> str:
        made = real_mkdtemp(**kwargs)  # type: ignore[call-overload]
        (Path(made) / "a").symlink_to(outside)
        return str(made)

    monkeypatch.setattr(package.tempfile, "mkdtemp", planted)
    with pytest.raises(FileExistsError):
        extract_package(make_zip(tmp_path / "p.zip", [("a", "evil")]), parent,
                        max_unpacked_bytes=MiB)
    assert not outside.exists()
    assert not list(parent.iterdir())


def test_a_refusal_survives_an_extraction_that_cannot_be_removed(
        tmp_path: Path, parent: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Cleaning up after a refusal must not replace the refusal (exit 3) with an OSError
    (exit 1): what cannot be removed is logged."""
    path = make_zip(tmp_path / "p.zip", [("a", "x" * 100), ("b", "y" * 100)])
    test_package.patch_member(path, "b", file_size=10)  # b lies about its size
    real_unlink = package.os.unlink

    def stuck(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(package.os, "unlink", stuck)
    with pytest.raises(UnsafePackageError):
        extract_package(path, parent, max_unpacked_bytes=MiB)
    monkeypatch.setattr(package.os, "unlink", real_unlink)
    assert "could not remove refused extraction" in caplog.text


def _manifest(tmp_path: Path, **over: object) -> Path:
    doc = {"format": 1, "version": 3, "debs": [], "run": None, "healthcheck": None, **over}
    names = [v for v in over.values() if isinstance(v, str)]
    return test_package.write_package(tmp_path / "x", doc, names)


def test_plain_names_may_start_with_any_letter(tmp_path: Path) -> None:
    root = _manifest(tmp_path, run="X-update", healthcheck="XX")
    manifest = package.load_manifest(root, 3)
    assert (manifest.run, manifest.healthcheck) == ("X-update", "XX")


@pytest.mark.parametrize("key", ["run", "healthcheck"])
def test_a_bad_optional_name_is_refused_naming_its_key(tmp_path: Path, key: str) -> None:
    root = _manifest(tmp_path)
    doc = {"format": 1, "version": 3, "debs": [], "run": None, "healthcheck": None,
           key: "../x"}
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UnsafePackageError, match=f"{key} entry"):
        package.load_manifest(root, 3)


def test_a_manifest_of_exactly_the_size_cap_is_read(tmp_path: Path) -> None:
    root = _manifest(tmp_path, run="update.sh")
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text.ljust(package.MAX_MANIFEST_BYTES))
    assert package.load_manifest(root, 3).version == 3
    (root / "manifest.json").write_text(text.ljust(package.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(UnsafePackageError, match="larger than"):
        package.load_manifest(root, 3)
