"""Build real .deb files and throw-away dpkg databases for tests (python-debian's
``test_debfile.py`` style: real archives from ``dpkg-deb -b``, never hand-written fakes).

Everything here works in directories the test owns; nothing touches the host's dpkg database.
A tool that is missing fails the test when ``CI`` is set, and skips it otherwise: a skipped
test proves nothing, but a developer without dpkg-dev can still run the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from opq_box_updater.runner import child_env

MAINTAINER_SCRIPTS = frozenset({"preinst", "postinst", "prerm", "postrm", "config"})


def require_tool(name: str) -> str:
    """The path of program ``name``: fail the test if it is missing under CI, else skip it."""
    path = shutil.which(name, path=child_env()["PATH"])
    if path is None:
        message = f"{name} is not installed (apt-get install dpkg-dev)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def deb_filename(name: str, version: str, arch: str) -> str:
    """dpkg's file name for a package: the epoch is left out (``1:2.0`` -> ``2.0``)."""
    return f"{name}_{version.split(':', 1)[-1]}_{arch}.deb"


def make_deb(out_dir: Path, name: str, version: str, *, arch: str = "all",
             depends: str | None = None,
             files: Mapping[str, str | bytes] | None = None,
             scripts: Mapping[str, str] | None = None,
             extra_control: Mapping[str, str] | None = None,
             control_files: Mapping[str, str] | None = None,
             compression: str = "xz") -> Path:
    """Build ``out_dir/<name>_<version>_<arch>.deb`` with ``dpkg-deb --root-owner-group -b``.

    ``files`` maps paths inside the package (``usr/share/foo/x``) to contents (files 0644,
    directories 0755). ``scripts`` maps maintainer script names to their text, made 0755; a
    script without ``#!`` gets ``#!/bin/sh`` and ``set -e`` in front. ``extra_control`` adds or
    overrides control fields (``Pre-Depends``, ``Conflicts``, ``Description``...).
    ``control_files`` adds other DEBIAN/ files verbatim (``conffiles``, ``triggers``).
    ``compression`` is passed to ``dpkg-deb -Z`` (xz, as Debian's archive uses, gzip, none).
    """
    dpkg_deb = require_tool("dpkg-deb")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / deb_filename(name, version, arch)
    with tempfile.TemporaryDirectory(prefix="deb-", dir=out_dir) as tmp:
        stage = Path(tmp) / "stage"
        control_dir = stage / "DEBIAN"
        control_dir.mkdir(parents=True)
        fields = {"Package": name, "Version": version, "Architecture": arch,
                  "Maintainer": "OPQ Tests <tests@example.invalid>", "Priority": "optional",
                  "Section": "misc", "Description": f"test package {name}"}
        if depends:
            fields["Depends"] = depends
        fields.update(extra_control or {})
        (control_dir / "control").write_text(
            "".join(f"{key}: {value}\n" for key, value in fields.items()), encoding="utf-8")
        for script, text in (scripts or {}).items():
            if script not in MAINTAINER_SCRIPTS:
                raise ValueError(f"{script!r} is not a maintainer script; use control_files")
            if not text.startswith("#!"):
                text = "#!/bin/sh\nset -e\n" + text
            _write(control_dir / script, text.encode(), 0o755)
        for other, text in (control_files or {}).items():
            _write(control_dir / other, text.encode(), 0o644)
        for relpath, content in (files or {}).items():
            if relpath.startswith("/") or ".." in relpath.split("/"):
                raise ValueError(f"package path {relpath!r} must be relative")
            data = content.encode() if isinstance(content, str) else content
            _write(stage / relpath, data, 0o644)
        for directory in (stage, *(p for p in stage.rglob("*") if p.is_dir())):
            directory.chmod(0o755)  # dpkg-deb insists on 0755 for DEBIAN
        _run([dpkg_deb, "--root-owner-group", f"-Z{compression}", "-b", str(stage), str(target)])
    return target


def init_dpkg_root(root: Path) -> Path:
    """Make ``root`` an empty dpkg database for ``dpkg --root=R --force-script-chrootless``.

    The host's ``var/lib/dpkg/arch`` (foreign architectures) is copied when it exists, so
    the root accepts what the host accepts. Returns ``root``.
    """
    admin = root / "var/lib/dpkg"
    for sub in ("info", "updates", "triggers", "parts", "alternatives"):
        (admin / sub).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available", "diversions", "statoverride"):
        (admin / name).touch()
    (root / "var/log").mkdir(parents=True, exist_ok=True)
    host_arch = Path("/var/lib/dpkg/arch")
    if host_arch.is_file():
        shutil.copyfile(host_arch, admin / "arch")
    return root


def dpkg_command(root: Path, *args: str) -> list[str]:
    """``dpkg`` working on the test root ``root``, logging to ``root/var/log/dpkg.log``.

    As non-root, ``--force-not-root`` lets dpkg work without chown-ing files (the test then
    checks contents, not ownership).
    """
    cmd = [require_tool("dpkg"), f"--root={root}", "--force-script-chrootless",
           f"--log={root}/var/log/dpkg.log"]
    if os.geteuid() != 0:
        cmd.append("--force-not-root")
    return [*cmd, *args]


def dpkg_query(root: Path, *packages: str) -> dict[str, str]:
    """``{package: version}`` of what dpkg-query lists as installed in ``root``."""
    out = _run([require_tool("dpkg-query"), f"--root={root}", "-W",
                "-f=${Package} ${Version} ${db:Status-Abbrev}\\n", *packages])
    installed = {}
    for line in out.splitlines():
        package, version, status = line.split(" ", 2)
        if status.strip() == "ii":
            installed[package] = version
    return installed


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _run(cmd: Sequence[str]) -> str:
    """Run a helper command; on failure raise with its output so the test says why."""
    proc = subprocess.run(cmd, env=child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}")
    return proc.stdout
