"""What the benchmarks measure against: a signed repository with real packages, boxes with
their own configuration and state, and the exact commands a box and a publisher run."""

from __future__ import annotations

import compileall
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opq_box_updater.metadata import Release
from opq_box_updater.package import MANIFEST_NAME
from opq_box_updater.publish import repo as publish_repo

from .servers import PROJECT, SYSTEM_PATH, BenchError

#: The interpreter of both sides of every CPU/RSS comparison (Debian's, as on a box).
SYSTEM_PYTHON = "/usr/bin/python3"
MIB = 1024 * 1024
GIB = 1024 * MIB
#: The console-script body Debian's pybuild installs as /usr/bin/opq-box-updater.
BOX_MAIN = "import sys; from opq_box_updater.cli import main; sys.exit(main())"
PUBLISH_MAIN = "import sys; from opq_box_updater.publish.cli import main; sys.exit(main())"
RUN_SCRIPT = b"#!/bin/sh\nexit 0\n"
_ZIP_SLACK = 64 * 1024  # room for the zip's headers, manifest and script below a size cap


def child_env() -> dict[str, str]:
    """A clean environment for measured children: no proxies, no venv, bytecode caches
    used (PYTHONDONTWRITEBYTECODE unset), this source tree importable."""
    env = {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8", "PYTHONPATH": str(PROJECT)}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return env


def precompile() -> None:
    """Write the package's bytecode caches with the measured interpreter's version, so no
    measured run pays for compiling (Debian's own modules are compiled at install)."""
    ok = compileall.compile_dir(PROJECT / "opq_box_updater", quiet=1, force=False)
    if not ok:
        raise BenchError("compileall failed for opq_box_updater")


def write_package(out: Path, version: int, payload_bytes: int) -> Path:
    """A package of ``version``: manifest, run script and a stored ``payload.bin`` of
    ``payload_bytes`` written 1 MiB at a time (memory-flat, and fast: no compression).

    The payload is one random MiB repeated, with the chunk index stamped into each copy:
    it does not compress well and is not a zip bomb (stored, so it unpacks to its size).
    """
    manifest = {"format": 1, "version": version, "debs": [], "run": "update.sh",
                "healthcheck": None}
    block = bytearray(os.urandom(MIB))
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        zf.writestr(_info(MANIFEST_NAME, zipfile.ZIP_DEFLATED), json.dumps(manifest))
        zf.writestr(_info("update.sh", zipfile.ZIP_DEFLATED), RUN_SCRIPT)
        with zf.open(_info("payload.bin", zipfile.ZIP_STORED), "w", force_zip64=True) as dst:
            left, index = payload_bytes, 0
            while left > 0:
                block[:8] = index.to_bytes(8, "little")
                piece = min(left, MIB)
                dst.write(block[:piece] if piece < MIB else block)
                left -= piece
                index += 1
    tmp.replace(out)
    return out


def payload_for(total_bytes: int) -> int:
    """The payload size that keeps a package at or under ``total_bytes``."""
    return total_bytes - _ZIP_SLACK


def _info(name: str, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    info.compress_type = compress_type
    return info


@dataclass(frozen=True)
class Repo:
    """A repository with its KEYDIR; ``publish`` is the library's ``publish_release``."""

    path: Path
    keydir: Path

    @classmethod
    def create(cls, path: Path, keydir: Path) -> Repo:
        publish_repo.init_repo(path, keydir)
        return cls(path, keydir)

    @property
    def anchor(self) -> Path:
        return publish_repo.root_file(self.path, 1)

    def publish(self, package: Path, version_file: str) -> Release:
        return publish_repo.publish_release(self.path, self.keydir, package,
                                            version_file=version_file)

    def publish_argv(self, package: Path, version_file: str) -> list[str]:
        """``opq-box-publish release`` as a child process runs it."""
        return [SYSTEM_PYTHON, "-c", PUBLISH_MAIN, "release", str(self.path), str(package),
                "--keys", str(self.keydir), "--version-file", version_file]


@dataclass(frozen=True)
class Box:
    """One simulated box: its own config, state, cache and log under ``base``."""

    base: Path
    server_url: str
    version_file: str
    anchor: Path
    box_id: str

    @property
    def config_path(self) -> Path:
        return self.base / "updater_config.json"

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    def write(self) -> Box:
        self.base.mkdir(parents=True, exist_ok=True)
        doc = {"server_url": self.server_url, "version_file": self.version_file,
               "trust_root": str(self.anchor), "box_id": self.box_id,
               "download_dir_path": str(self.cache) + "/",
               "state_dir": str(self.base / "state") + "/",
               "log_file": str(self.base / "log" / "box_updater.log"),
               "hooks_dir": str(self.base / "hooks") + "/",
               "dpkg_root": str(self.base / "root"),
               "timeouts": {"connect": 10, "read": 30, "total": 600}}
        self.config_path.write_text(json.dumps(doc, indent=2))
        return self

    def argv(self, *command: str) -> list[str]:
        """``opq-box-updater --config CONFIG COMMAND...`` as the Debian command runs it."""
        return [SYSTEM_PYTHON, "-c", BOX_MAIN, "--config", str(self.config_path), *command]


def floor_argv(url: str) -> list[str]:
    """DESIGN 7's floor for a no-op check: the cheapest possible HTTP GET with requests."""
    return [SYSTEM_PYTHON, "-c", f"import requests; requests.get({url!r})"]


def fetch_argv(base_url: str, relpath: str, dest: Path, sha256: str, length: int) -> list[str]:
    """A child that runs only the box's download+verify step (``Fetcher.fetch_package``:
    stream, hash while writing, rename) and prints the seconds that step took and,
    of those, the seconds spent in fsync."""
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from opq_box_updater.config import Timeouts\n"
        "from opq_box_updater.fetcher import Fetcher\n"
        "real_fsync, synced = os.fsync, [0.0]\n"
        "def fsync(fd):\n"
        "    t = time.perf_counter()\n"
        "    real_fsync(fd)\n"
        "    synced[0] += time.perf_counter() - t\n"
        "os.fsync = fsync\n"
        "base, rel, dest, sha, length = sys.argv[1:]\n"
        "with Fetcher(base, Timeouts(total=600), progress=False) as f:\n"
        "    t = time.perf_counter()\n"
        "    f.fetch_package(rel, Path(dest), sha, int(length))\n"
        "    print(time.perf_counter() - t, synced[0])\n")
    return [SYSTEM_PYTHON, "-c", code, base_url, relpath, str(dest), sha256, str(length)]


def curl_argv(url: str, out: Path) -> list[str]:
    """``curl -o FILE URL``, printing curl's own total transfer time."""
    return ["curl", "-s", "-f", "-o", str(out), "-w", "%{time_total}", url]


def sha256sum_argv(path: Path) -> Sequence[str]:
    return ["sha256sum", str(path)]
