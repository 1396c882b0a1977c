"""The Debian packages in a clean Debian 12 root (DESIGN 5 and 6, issue 4).

One scenario, in the order an operator lives it, inside a root made by ``mmdebstrap`` (its
mirror argument is this machine's apt sources file; the tarball is cached, so reruns take
about a minute):

preseed ``server_url`` -> ``apt-get install ./opq-box-updater_*.deb`` (built without a trust
anchor: installs, the updater refuses with exit 2) -> config, cron and logrotate files ->
``dpkg-reconfigure`` with a new answer -> an administrator's edits survive reconfigure, win
over the stored answer -> ``dpkg-reconfigure`` typed at a console (a real pty, readline
and teletype: refused answers asked again, empty answer, Ctrl-D, hang-up, a new URL;
tests/operator_reconfigure.py) -> the edits survive an upgrade to a newer build with the
trust anchor -> a real update cycle against ``opq-box-publish serve`` on 127.0.0.1 (the chroot
shares the host's network): a package carrying a ``.deb`` and a run script, applied with
that root's dpkg -> the cron command itself -> a release carrying a newer opq-box-updater,
which the cron job installs over itself -> ``logrotate -f``, then another run still logs ->
remove, then purge, leave nothing behind (compared like piuparts does, ignoring the
bookkeeping of apt, dpkg, debconf and logrotate).

Commands in the root run through ``unshare --mount`` + ``chroot`` with /proc and /dev
mounted in a private mount namespace, so no mount can outlive a command.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from operator_reconfigure import check_interactive_reconfigure

pytestmark = [pytest.mark.slow, pytest.mark.root]

PROJECT = Path(__file__).resolve().parent.parent
PUBLISH = Path(sys.executable).parent / "opq-box-publish"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SUITE = "bookworm"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
#: The box package's dependencies (and cron, logrotate) go into the cached root, so that
#: ``apt-get install ./x.deb`` needs no package lists and no network.
ROOT_PACKAGES = ("debconf", "python3", "python3-requests", "python3-cryptography",
                 "python3-debian", "cron", "logrotate")
TARBALL_MAX_AGE = 7 * 24 * 3600
BUILD_DEBS = ("mmdebstrap", "build-essential", "dpkg-dev", "debhelper", "dh-python",
              "python3-all", "po-debconf",
              "python3-setuptools")
TOOLS = ("mmdebstrap", "dpkg-buildpackage", "dpkg-deb", "unshare", "chroot", "make")

CONFIG = "/etc/opq/updater_config.json"
#: The Python module both command packages depend on (issue 8).
LIBRARY = "python3-opq-box-updater"
FIRST_URL = "http://updates.example.invalid/opq/"
PAYLOAD = "opq-test-payload"
RAN_MARKER = "/tmp/opq-update-ran"

#: What apt, dpkg, debconf and logrotate keep for every package (piuparts ignores the
#: same), the virtual file systems, and /tmp.
IGNORED = re.compile(
    r"^/(proc|dev|sys|run|tmp)(/|$)"
    r"|^/var/lib/(dpkg|apt|logrotate|ucf)(/|$)"
    r"|^/var/cache/(apt|debconf|ldconfig)(/|$)"
    r"|^/var/log/(apt(/|$)|dpkg\.log$|alternatives\.log$)"
    r"|^/etc/ld\.so\.cache$"
)


# --- prerequisites ---------------------------------------------------------------------------


def _unavailable(why: str) -> None:
    """Fail under CI (a skipped test proves nothing), skip on a developer's machine."""
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def _require_prerequisites() -> None:
    if os.geteuid() != 0:
        _unavailable("the Debian install test needs root (mmdebstrap, chroot)")
    subprocess.run([str(PROJECT / "scripts/need-apt"), *BUILD_DEBS], check=False)
    missing = [tool for tool in TOOLS if shutil.which(tool, path=SYSTEM_PATH) is None]
    if missing:
        _unavailable(f"missing tools: {' '.join(missing)} (apt-get install {' '.join(BUILD_DEBS)})")
    if not APT_SOURCES.is_file():
        _unavailable(f"{APT_SOURCES} not found: mmdebstrap needs this machine's apt sources")
    probe = subprocess.run([str(PUBLISH), "--help"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.fail(f"{PUBLISH} does not work yet:\n{probe.stderr[-2000:]}")


def _run(cmd: list[str], *, timeout: float = 600, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)}: exit {proc.returncode}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# --- the clean root --------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("OPQ_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "opq-box-updater")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def root_tarball() -> Path:
    """A Debian 12 root (variant apt plus ROOT_PACKAGES) as a tarball, built once a week."""
    key = hashlib.sha256(
        json.dumps([SUITE, ROOT_PACKAGES, APT_SOURCES.read_text()]).encode()).hexdigest()[:16]
    tarball = _cache_dir() / f"debian-{SUITE}-{key}.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < TARBALL_MAX_AGE:
        return tarball
    partial = tarball.with_suffix(f".{os.getpid()}.partial.tar")
    try:
        _run(["mmdebstrap", "--quiet", "--variant=apt", "--include=" + ",".join(ROOT_PACKAGES),
              SUITE, str(partial), str(APT_SOURCES)],
             env={"PATH": SYSTEM_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8"})
        os.replace(partial, tarball)
    finally:
        partial.unlink(missing_ok=True)
    for old in tarball.parent.glob(f"debian-{SUITE}-*.tar"):
        if old != tarball:
            old.unlink(missing_ok=True)
    return tarball


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        points = [line.split()[4] for line in handle]
    return [point for point in points if point.startswith(prefix)]


@dataclass
class Root:
    """A Debian root directory; ``sh`` runs a shell script inside it as root."""

    path: Path

    def file(self, name: str) -> Path:
        return self.path / name.lstrip("/")

    def command(self, script: str, *, network: bool = True,
                env: tuple[str, ...] = ("DEBIAN_FRONTEND=noninteractive",)) -> list[str]:
        """The host command that runs ``script`` in the root, with a clean environment plus
        ``env``; ``network=False``: in a network namespace of its own (no server reachable)."""
        enter = ('mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; '
                 'root="$1"; shift; exec chroot "$root" "$@"')
        return ["unshare", "--mount", *([] if network else ["--net"]), "--propagation",
                "private", "--", "sh", "-ec", enter,
                "enter-root", str(self.path), "/usr/bin/env", "-i", f"PATH={ROOT_PATH}",
                "HOME=/root", "LC_ALL=C.UTF-8", *env, "/bin/sh", "-ec", script]

    def sh(self, script: str, *, check: bool = True, timeout: float = 300,
           network: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = self.command(script, network=network)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={"PATH": SYSTEM_PATH}, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"in the root: {script}\nexit {proc.returncode}\n"
                        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return proc

    def config(self) -> dict[str, object]:
        return dict(json.loads(self.file(CONFIG).read_text(encoding="utf-8")))

    def debconf_answer(self) -> str:
        shown = self.sh("debconf-show opq-box-updater").stdout
        found = re.search(r"opq-box-updater/server_url: ?(.*)$", shown, re.MULTILINE)
        assert found, shown
        return found.group(1).strip()


@pytest.fixture
def clean_root(tmp_path: Path) -> Iterator[Root]:
    _require_prerequisites()
    tarball = root_tarball()
    path = tmp_path / "root"
    path.mkdir()
    _run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(tarball)])
    # Never start services inside the root.
    policy = path / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield Root(path)
    finally:
        leftover = _mounts_under(path)
        for point in sorted(leftover, reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False)
        if not _mounts_under(path):  # never delete through a mount into the host
            shutil.rmtree(path, ignore_errors=True)


def snapshot(root: Path) -> dict[str, str]:
    """Every path in the root with type, mode and owner (content too under /etc)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = "/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
        kept = []
        for name in dirnames:
            rel = os.path.join(rel_dir, name)
            if not IGNORED.search(rel):
                kept.append(name)
        dirnames[:] = kept
        for name in [*kept, *filenames]:
            rel = os.path.join(rel_dir, name)
            if IGNORED.search(rel):
                continue
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            desc = f"{stat.filemode(info.st_mode)} {info.st_uid}:{info.st_gid}"
            if stat.S_ISLNK(info.st_mode):
                desc += " -> " + os.readlink(full)
            elif stat.S_ISREG(info.st_mode) and rel.startswith("/etc/"):
                with open(full, "rb") as handle:
                    desc += " " + hashlib.sha256(handle.read()).hexdigest()
            out[rel] = desc
    return out


def snapshot_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    lines = [f"left behind: {p} ({after[p]})" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed: {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"changed: {p}: {before[p]} -> {after[p]}"
              for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines


# --- what the test installs ------------------------------------------------------------------


def changelog_version() -> str:
    return _run(["dpkg-parsechangelog", "-S", "Version", "-l",
                 str(PROJECT / "debian/changelog")]).stdout.strip()


def build_debs(out: Path, *, trust_root: Path | None = None,
               version: str | None = None) -> dict[str, Path]:
    """``make deb`` into ``out``; returns the .deb of each binary package by name."""
    cmd = ["make", "--no-print-directory", "-C", str(PROJECT), "deb", f"DIST={out}",
           f"DEB_WORK={out}.work"]
    if trust_root is not None:
        cmd.append(f"TRUST_ROOT={trust_root}")
    if version is not None:
        cmd.append(f"DEB_VERSION={version}")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    _run(cmd, env=env)
    return {deb.name.split("_")[0]: deb for deb in out.glob("*.deb")}


def build_payload_deb(tmp: Path, version: str = "1.0") -> Path:
    """A small real package for the update to install."""
    tree = tmp / f"payload-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: {PAYLOAD}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: OPQ Box Team <opq@example.org>\n"
        "Description: payload of the Debian install test\n")
    share = tree / "usr/share" / PAYLOAD
    share.mkdir(parents=True)
    (share / "hello").write_text("installed by an OPQ Box update\n")
    deb = tmp / f"{PAYLOAD}_{version}_all.deb"
    _run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)])
    return deb


def publish_release(tmp: Path) -> Path:
    """A repository with release 1: the payload .deb plus a run script."""
    repo, keys = tmp / "repo", tmp / "keys"
    _run([str(PUBLISH), "init", str(repo), "--keys", str(keys)])
    script = tmp / "update.sh"
    script.write_text("#!/bin/sh\nset -e\n"
                      f'echo "$OPQ_UPDATE_VERSION $OPQ_PREVIOUS_VERSION" > {RAN_MARKER}\n')
    package = tmp / "update-1.zip"
    _run([str(PUBLISH), "build", str(package), "--deb", str(build_payload_deb(tmp)),
          "--run", str(script), "--version", "1"])
    _run([str(PUBLISH), "release", str(repo), str(package), "--keys", str(keys)])
    return repo


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def repo_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(repository, server_url) of ``opq-box-publish serve`` on 127.0.0.1."""
    _require_prerequisites()
    publish_dir = tmp_path / "publish"
    publish_dir.mkdir()
    repo = publish_release(publish_dir)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(PUBLISH), "serve", str(repo), "--bind", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "version.json", timeout=2) as answer:
                    assert answer.status == 200
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("opq-box-publish serve did not come up: "
                                + (tmp_path / "serve.log").read_text()[-2000:])
                time.sleep(0.2)
        yield repo, url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# --- the scenario ----------------------------------------------------------------------------


def preseed(root: Root, url: str) -> None:
    root.sh("echo 'opq-box-updater opq-box-updater/server_url string "
            f"{url}' | debconf-set-selections")


def cron_command(root: Root) -> str:
    text = root.file("/etc/cron.d/opq-box-updater").read_text()
    found = re.search(r"^(?:\S+\s+){5}root\s+(.+)$", text, re.MULTILINE)
    assert found, text
    return found.group(1)


def check_fresh_install(root: Root) -> None:
    config = root.file(CONFIG)
    assert root.config() == {"server_url": FIRST_URL}
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    assert root.debconf_answer() == FIRST_URL
    for directory, mode in (("/var/lib/opq-box-updater", 0o700),
                            ("/var/cache/opq-box-updater", 0o700), ("/var/log/opq", 0o755)):
        assert stat.S_IMODE(root.file(directory).stat().st_mode) == mode, directory
    key = root.file("/var/lib/opq-box-updater/report_key.pem")  # made by postinst (issue 10)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 0
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    cron = root.file("/etc/cron.d/opq-box-updater")
    assert stat.S_IMODE(cron.stat().st_mode) == 0o644
    assert re.search(r"^PATH=.*/usr/sbin", cron.read_text(), re.MULTILINE)
    command = cron_command(root)
    # The log directory is made before the redirection (a tmpfs /var/log after a reboot).
    assert command.startswith("test -x /usr/bin/opq-box-updater && mkdir -p /var/log/opq && "
                              "nice -n 10 ionice -c3 ")
    tmpfiles = root.file("/usr/lib/tmpfiles.d/opq-box-updater.conf").read_text()
    assert re.search(r"^d /var/log/opq ", tmpfiles, re.MULTILINE), tmpfiles
    assert "opq-box-updater -q run --random-delay 3600" in command
    assert command.endswith(">> /var/log/opq/box_updater.log 2>&1")

    rotate = root.file("/etc/logrotate.d/opq-box-updater").read_text()
    for word in ("/var/log/opq/*.log", "weekly", "rotate 8", "compress", "delaycompress",
                 "missingok", "notifempty", "create 0640 root adm"):
        assert word in rotate, word
    root.sh("logrotate -d /etc/logrotate.d/opq-box-updater")

    assert root.file("/usr/share/man/man8/opq-box-updater.8.gz").exists()
    version = root.sh("opq-box-updater --version").stdout
    assert re.search(r"\d+\.\d+", version), version
    # Built without a trust anchor: installs, and the updater refuses with a clear message.
    assert not root.file("/usr/share/opq-box-updater/root.json").exists()
    refused = root.sh("opq-box-updater run", check=False)
    assert refused.returncode == 2, refused
    assert "trust anchor" in refused.stderr and "TRUST_ROOT" in refused.stderr, refused.stderr


def check_reconfigure_and_admin_edits(root: Root, url: str) -> bytes:
    """New answers change server_url only; an administrator's edits win and are kept."""
    preseed(root, url)
    root.sh("dpkg-reconfigure -f noninteractive opq-box-updater")
    assert root.config() == {"server_url": url}

    # The administrator adds keys and re-formats the file; a reconfigure changes nothing.
    edited = {"server_url": url, "timeouts": {"connect": 5, "read": 20, "total": 600},
              "version_file": "version.json", "x_site_note": "rack 7"}
    root.file(CONFIG).write_text(json.dumps(edited, indent=4) + "\n")
    before = root.file(CONFIG).read_bytes()
    root.sh("dpkg-reconfigure -f noninteractive opq-box-updater")
    assert root.file(CONFIG).read_bytes() == before

    # The administrator changes server_url by hand: that wins over the stored answer.
    hand_url = url.replace("127.0.0.1", "localhost")
    root.file(CONFIG).write_text(json.dumps({**edited, "server_url": hand_url}, indent=4))
    root.sh("dpkg-reconfigure -f noninteractive opq-box-updater")
    assert root.config() == {**edited, "server_url": hand_url}
    assert root.debconf_answer() == hand_url

    # A new preseeded answer changes server_url again, and nothing else.
    preseed(root, url)
    root.sh("dpkg-reconfigure -f noninteractive opq-box-updater")
    assert root.config() == edited
    assert list(root.config()) == list(edited), "key order kept"
    return root.file(CONFIG).read_bytes()


def check_upgrade(root: Root, debs: dict[str, Path], version: str, config: bytes) -> None:
    for deb in debs.values():
        shutil.copy(deb, root.file("/tmp"))
    names = " ".join(f"./{deb.name}" for deb in debs.values())
    root.sh(f"cd /tmp && apt-get install -y {names}")
    status = root.sh("dpkg-query -W -f '${Version} ${Status}\\n' opq-box-updater").stdout
    assert status.strip() == f"{version} install ok installed"
    assert root.file(CONFIG).read_bytes() == config, "the upgrade kept the admin's file"
    assert root.file("/usr/share/opq-box-updater/root.json").is_file()
    assert root.file("/usr/share/doc/opq-box-publisher/examples/opq-box-repo.conf").is_file()
    assert root.file("/usr/share/man/man1/opq-box-publish.1.gz").exists()
    root.sh("opq-box-publish --help >/dev/null")


def run_cron_line(root: Root) -> None:
    """The cron job's own command line, as cron runs it (no DEBIAN_FRONTEND, no delay)."""
    command = cron_command(root).replace("--random-delay 3600", "--random-delay 0")
    proc = root.sh(f"unset DEBIAN_FRONTEND; {command}")
    assert (proc.stdout, proc.stderr) == ("", ""), proc


def check_update_cycle(root: Root) -> None:
    """Release 1 (a new .deb plus a run script) is applied with the root's own dpkg."""
    log = root.file("/var/log/opq/box_updater.log")
    checked = root.sh("opq-box-updater check", check=False)
    assert checked.returncode == 100, checked
    ran = root.sh("opq-box-updater run", check=False)
    assert ran.returncode == 0, ran
    installed = root.sh(f"dpkg-query -W -f '${{Version}} ${{Status}}' {PAYLOAD}").stdout
    assert installed == "1.0 install ok installed"
    assert root.file(f"/usr/share/{PAYLOAD}/hello").is_file()
    assert root.file(RAN_MARKER).read_text().split() == ["1", "0"]
    status = json.loads(root.sh("opq-box-updater status --json").stdout)
    assert status["installed_version"] == 1 and status["last_result"] == "updated", status
    assert log.stat().st_size > 0

    size = log.stat().st_size
    run_cron_line(root)
    assert log.stat().st_size > size
    status = json.loads(root.sh("opq-box-updater status --json").stdout)
    assert status["installed_version"] == 1 and status["last_result"] == "up-to-date", status


def check_self_upgrade(root: Root, repo: Path, new: dict[str, Path], version: str,
                       config: bytes, installed: dict[str, Path]) -> None:
    """Release 2 carries a newer opq-box-updater and its module: the cron job upgrades the
    updater itself, once the debs it would roll back to are at hand (docs/operations.md,
    "Installing a box")."""
    package = repo.parent / "update-2.zip"
    _run([str(PUBLISH), "build", str(package), "--deb", str(new[LIBRARY]),
          "--deb", str(new["opq-box-updater"]), "--version", "2"])
    _run([str(PUBLISH), "release", str(repo), str(package), "--keys",
          str(repo.parent / "keys")])
    # Installed from local files, the running updater's debs are nowhere a rollback could
    # take them from: the update waits, saying which deb it needs.
    run_cron_line(root)
    state = json.loads(root.sh("opq-box-updater status --json").stdout)
    assert state["last_result"] == "postponed", state
    assert f"={installed[LIBRARY].name.split('_')[1]}" in state["last_message"]
    archives = root.file("/var/cache/apt/archives")
    for name in (LIBRARY, "opq-box-updater"):
        shutil.copy(installed[name], archives / installed[name].name)
    run_cron_line(root)
    status = root.sh("dpkg-query -W -f '${Version} ${Status}' opq-box-updater").stdout
    assert status == f"{version} install ok installed"
    assert root.sh("dpkg --audit").stdout == ""
    state = json.loads(root.sh("opq-box-updater status --json").stdout)
    assert state["installed_version"] == 2 and state["last_result"] == "updated", state
    assert root.file(CONFIG).read_bytes() == config, "the self-upgrade kept the admin's file"


def check_logrotate(root: Root) -> None:
    log = root.file("/var/log/opq/box_updater.log")
    root.sh("logrotate -f /etc/logrotate.d/opq-box-updater")
    assert root.file("/var/log/opq/box_updater.log.1").stat().st_size > 0
    info = log.stat()
    assert info.st_size == 0 and stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_gid == 4, "group adm"  # base-passwd's fixed gid
    root.sh("opq-box-updater -q run")
    assert log.stat().st_size > 0, "the updater logs after rotation"


def check_remove_and_purge(root: Root, baseline: dict[str, str]) -> None:
    root.sh(f"apt-get remove -y opq-box-publisher opq-box-updater {LIBRARY}")
    assert not root.file("/usr/bin/opq-box-updater").exists()
    assert root.file(CONFIG).is_file(), "remove keeps the configuration"
    assert root.file("/etc/cron.d/opq-box-updater").is_file(), "remove keeps conffiles"
    guard = root.sh(cron_command(root), check=False)
    assert (guard.returncode, guard.stdout, guard.stderr) == (1, "", ""), guard

    root.sh(f"dpkg --purge opq-box-publisher opq-box-updater {LIBRARY} {PAYLOAD}")
    assert "opq-box-updater" not in root.sh("debconf-show opq-box-updater").stdout
    for db in ("config.dat", "templates.dat"):
        assert "opq-box-updater/" not in root.file(f"/var/cache/debconf/{db}").read_text(), db
    leftovers = snapshot_diff(baseline, snapshot(root.path))
    assert not leftovers, "\n".join(leftovers[:60])


def test_debian_packages_in_a_clean_root(clean_root: Root, repo_server: tuple[Path, str],
                                         tmp_path: Path) -> None:
    root = clean_root
    repo, url = repo_server
    version = changelog_version()
    anchor = repo / "root/1.root.json"
    first = build_debs(tmp_path / "dist1")
    second = build_debs(tmp_path / "dist2", trust_root=anchor, version=f"{version}+test2")
    third = build_debs(tmp_path / "dist3", trust_root=anchor, version=f"{version}+test3")
    assert set(first) == set(second) == {"opq-box-updater", "opq-box-publisher", LIBRARY}

    baseline = snapshot(root.path)

    preseed(root, FIRST_URL)
    for name in ("opq-box-updater", LIBRARY):
        shutil.copy(first[name], root.file("/tmp"))
    root.sh(f"cd /tmp && apt-get install -y ./{first['opq-box-updater'].name} "
            f"./{first[LIBRARY].name}")
    check_fresh_install(root)

    config = check_reconfigure_and_admin_edits(root, url)
    check_interactive_reconfigure(root, url)  # at a 24x80 console; ends with `config` again
    check_upgrade(root, second, f"{version}+test2", config)
    check_update_cycle(root)
    check_self_upgrade(root, repo, third, f"{version}+test3", config, second)
    check_logrotate(root)
    check_remove_and_purge(root, baseline)
