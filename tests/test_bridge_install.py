"""A box on the original updater moves to opq-box-updater through the bridge (issue 8,
part 2), in a clean Debian 12 root set up as the issue's facts describe the deployed boxes.

The root (the cached tarball of tests/test_debian_install.py: cron, openssl, python3) gets
a stand-in for the original updater (tests/legacy_box_updater.py) as
``/usr/local/bin/box_updater.py``, its config, its ``local_version.json`` (version 1.3), its
log, and the ``run_updater`` line in root's crontab (written with ``crontab``, beside a
line of the site's own). Two nginx on 127.0.0.1 serve the legacy repository (every file)
and the new repository with the operators' signed apt repository under ``/apt/`` (the
shipped site; ``scripts/apt-repo``); ``opq-box-publish serve`` collects the boxes'
reports. The scenario, each step on the one root:

1. a bridge whose package was tampered with is refused by the original updater;
2. a bridge whose install fails keeps the original updater in charge: the box is as before
   (cron line, box_updater.py, config, no opq-box-updater), and it retries next run; the
   same for a bridge whose new server does not answer (installed, then removed again);
3. a run of the original updater with a good bridge killed as dpkg unpacks
   opq-box-updater (a power cut) leaves the original updater in charge, and the next
   cron run migrates the box, installing from the apt repository whose source and
   keyring the bridge carries;
4. the next ``opq-box-updater run`` installs a release from the new repository;
5. running the bridge's update.sh again changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from debs import make_deb
from nginxfix import Nginx, require_nginx
from test_apt_provisioning import KEYRING, SOURCES, apt_repo, make_signer
from test_debian_install import (
    LIBRARY,
    PAYLOAD,
    PUBLISH,
    RAN_MARKER,
    SYSTEM_PATH,
    Root,
    _mounts_under,
    _require_prerequisites,
    _run,
    _unavailable,
    build_debs,
    changelog_version,
    publish_release,
    root_tarball,
)

pytestmark = [pytest.mark.slow, pytest.mark.root]

HERE = Path(__file__).resolve().parent
CONFIG = "/etc/opq/updater_config.json"
LOG = "/var/log/opq/box_updater.log"
DOWNLOAD = "/var/opq/updater"
LEGACY_BIN = "/usr/local/bin/box_updater.py"
CRON_LINE = ("0 0 * * * /usr/bin/python3 /usr/local/bin/box_updater.py "
             ">> /var/log/opq/box_updater.log 2>&1 # run_updater")
SITE_LINE = "30 6 * * * /usr/bin/test -d /var/opq # the site's own job"
EARLIER_LOG = "2026-01-01 00:00:01 Box is up to date\n"
LINKED_CONFIG = "/srv/opq-data/updater_config.json"


def legacy_site(root: Path) -> Callable[[str], str]:
    """The legacy server's site: every file of ``root`` (as the original updater's server on
    port 8151 served it), on the port nginxfix chose for the shipped site."""
    def rewrite(site: str) -> str:
        listen = re.search(r"^\s*(listen 127\.0\.0\.1:\d+;)", site, re.MULTILINE)
        assert listen, site
        return f"server {{\n    {listen.group(1)}\n    root {root};\n    location / {{ }}\n}}\n"
    return rewrite


@dataclass
class World:
    root: Root
    tmp: Path
    legacy_dir: Path
    legacy_key: Path
    legacy_url: str
    new_url: str
    anchor: Path
    box_debs: list[Path]
    repo: Path
    report_url: str
    apt_source: Path
    apt_keyring: Path

    def bridge(self, *, url: str | None = None, deb: Path | None = None,
               apt: bool = False) -> int:
        """Publish a bridge into the legacy repository (the box's debs, or ``deb`` alone;
        with the apt repository's source when ``apt``); returns its version."""
        debs = [arg for path in ([deb] if deb else self.box_debs)
                for arg in ("--deb", str(path))]
        if apt:
            debs += ["--apt-source", str(self.apt_source), "--apt-keyring",
                     str(self.apt_keyring)]
        _run([str(PUBLISH), "bridge", str(self.legacy_dir), "--legacy-key",
              str(self.legacy_key), *debs, "--server-url", url or self.new_url,
              "--trust-root", str(self.anchor), "--report-url", self.report_url])
        return int(json.loads((self.legacy_dir / "version.json").read_text())["version"])

    def cron_command(self) -> str:
        """The run_updater line of root's crontab as cron runs it (cron's environment)."""
        table = self.root.sh("crontab -u root -l").stdout
        line = next(x for x in table.splitlines() if x.endswith("# run_updater"))
        return ("env -i PATH=/usr/bin:/bin HOME=/root SHELL=/bin/sh LOGNAME=root "
                f"/bin/sh -c {shlex.quote(line.split(None, 5)[5])}")

    def legacy_cron_run(self) -> str:
        """One run of the original updater from cron; returns what it added to the log."""
        before = self.root.file(LOG).read_text()
        self.root.sh(self.cron_command(), timeout=600)
        return self.root.file(LOG).read_text().removeprefix(before)

    def legacy_cron_run_cut(self, when: str) -> str:
        """A run of the original updater killed (SIGKILL, every process of it) as soon as
        its log shows ``when``: the state a power cut leaves, less the lost page cache."""
        before = self.root.file(LOG).read_text()
        enter = ('mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; '
                 'root="$1"; shift; exec chroot "$root" "$@"')
        run = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", enter,
             "enter-root", str(self.root.path), "/bin/sh", "-c", self.cron_command()],
            env={"PATH": SYSTEM_PATH}, start_new_session=True)
        deadline = time.monotonic() + 300
        try:
            while when not in self.root.file(LOG).read_text().removeprefix(before):
                assert run.poll() is None, "the run ended before " + when
                assert time.monotonic() < deadline, "no " + when
                time.sleep(0.01)
        finally:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        return self.root.file(LOG).read_text().removeprefix(before)

    def fleet(self) -> list[list[str]]:
        """The rows of ``opq-box-publish fleet`` (reports received by the collector)."""
        table = _run([str(PUBLISH), "fleet", str(self.repo)]).stdout.splitlines()
        return [row.split(None, 4) for row in table[1:]]

    def legacy_state(self) -> dict[str, object]:
        """What the original updater's being in charge consists of."""
        return {
            "crontab": self.root.sh("crontab -u root -l").stdout,
            "bin": self.root.file(LEGACY_BIN).read_bytes(),
            "config": self.root.file(CONFIG).read_bytes(),
            "updater": self.root.sh(f"dpkg-query -W -f '${{db:Status-Status}} ' "
                                    f"opq-box-updater {LIBRARY}", check=False).stdout,
        }


def _legacy_box(root: Root, legacy_url: str) -> None:
    """The box as the original updater's setup.py and setup_cron.py left it."""
    shutil.copy(HERE / "legacy_box_updater.py", root.file(LEGACY_BIN))
    root.file(LEGACY_BIN).chmod(0o755)
    root.file("/etc/opq").mkdir()
    root.file(CONFIG).write_text(json.dumps({"download_dir_path": f"{DOWNLOAD}/",
                                             "server_url": legacy_url,
                                             "version_file": "version.json"}))
    root.file(DOWNLOAD).mkdir(parents=True)
    root.file(f"{DOWNLOAD}/local_version.json").write_text(
        json.dumps({"version": 1.3, "public_key": "key.pem", "package": "update.tar.gz",
                    "signature": "update.sig"}))
    root.file("/var/log/opq").mkdir(parents=True)
    root.file(LOG).write_text(EARLIER_LOG)
    table = shlex.quote(f"{SITE_LINE}\n{CRON_LINE}\n")
    root.sh(f"printf '%s' {table} | crontab -u root -")


@contextlib.contextmanager
def report_collector(repo: Path) -> Iterator[str]:
    """``opq-box-publish serve`` on a free loopback port, collecting the boxes' reports
    into ``repo/.reports``; yields its report URL."""
    server = subprocess.Popen([str(PUBLISH), "serve", str(repo), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        first = server.stdout.readline().split()
        assert first[:1] == ["serving"], first
        yield first[-1].rstrip("/") + "/report"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    _require_prerequisites()
    require_nginx()
    tmp = tmp_path_factory.mktemp("bridge-install")
    repo = publish_release(tmp / "publish")  # release 1: the payload .deb and a run script
    # Without a trust anchor in the package: the bridge pins the one it carries.
    debs = build_debs(tmp / "dist")
    legacy_dir = tmp / "legacy"
    legacy_dir.mkdir()
    (legacy_dir / "version.json").write_text('{"version": 1.3, "package": "update.tar.gz"}')
    # The operators' signed apt repository (part 1), served by the new repository's nginx.
    for tool in ("gpg", "gpgv", "apt-ftparchive"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            _unavailable(f"{tool} is missing (make apt-repo installs apt-utils gpg gpg-agent)")
    signer = make_signer("OPQ Box archive")
    apt_dir = tmp / "apt"
    apt_repo(apt_dir, signer, [debs["opq-box-updater"], debs[LIBRARY]])
    keyring = tmp / KEYRING.rsplit("/", 1)[1]
    signer.export(keyring)
    key = tmp / "legacy.pem"
    _run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
          "-out", str(key)])

    path = tmp / "root"
    path.mkdir()
    _run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(root_tarball())])
    policy = path / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    with Nginx(repo, tmp / "nginx-new", apt_dir=apt_dir) as new, \
            Nginx(legacy_dir, tmp / "nginx-legacy", site_filter=legacy_site(legacy_dir)) \
            as legacy, \
            report_collector(repo) as report_url:
        root = Root(path)
        sources = tmp / SOURCES.rsplit("/", 1)[1]
        sources.write_text(f"Types: deb\nURIs: {new.url}apt/\nSuites: bookworm\n"
                           f"Components: main\nSigned-By: {KEYRING}\n")
        try:
            _legacy_box(root, legacy.url)
            yield World(root=root, tmp=tmp, legacy_dir=legacy_dir, legacy_key=key,
                        legacy_url=legacy.url, new_url=new.url,
                        anchor=repo / "root/1.root.json",
                        box_debs=[debs["opq-box-updater"], debs[LIBRARY]],
                        repo=repo, report_url=report_url, apt_source=sources,
                        apt_keyring=keyring)
        finally:
            subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=signer.env(), check=False)
            shutil.rmtree(signer.home, ignore_errors=True)
            for point in sorted(_mounts_under(path), reverse=True):
                subprocess.run(["umount", "--lazy", point], check=False)
            if not _mounts_under(path):  # never delete through a mount into the host
                shutil.rmtree(path, ignore_errors=True)


def check_tampered_bridge_is_refused(world: World) -> None:
    legacy = world.legacy_state()
    version = world.bridge()
    package = world.legacy_dir / f"opq-bridge-{version}.tar.gz"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x01
    package.write_bytes(bytes(data))
    log = world.legacy_cron_run()
    assert "Update package verification failed" in log, log
    assert "opq-bridge" not in log, "update.sh did not run"
    assert world.legacy_state() == legacy
    assert json.loads(world.root.file(f"{DOWNLOAD}/local_version.json").read_text()
                      )["version"] == 1.3


def check_failed_install_keeps_the_legacy_updater(world: World) -> None:
    legacy = world.legacy_state()
    # An opq-box-updater whose dependency the box cannot get: apt refuses, nothing changes.
    broken = make_deb(world.tmp / "broken", "opq-box-updater", "0.0.1",
                      depends="opq-no-such-package")
    world.bridge(deb=broken)
    log = world.legacy_cron_run()
    assert "FAILED: installing opq-box-updater" in log, log
    assert world.legacy_state() == legacy
    assert not world.root.file(f"{DOWNLOAD}/local_version.json").exists(), \
        "the original updater runs the bridge again next time"

    # Installed, but the new server does not answer: removed again, the config put back.
    # The config is a link into the site's data partition here: the link stays a link.
    config = world.root.file(CONFIG)
    kept = world.root.file(LINKED_CONFIG)
    kept.parent.mkdir(parents=True)
    shutil.copy2(config, kept)
    config.unlink()
    config.symlink_to(os.path.relpath(kept, config.parent))
    world.bridge(url=world.new_url + "nothing-here/")
    log = world.legacy_cron_run()
    assert "FAILED: opq-box-updater check exited 4" in log, log
    assert f"removing again what this run installed: opq-box-updater {LIBRARY}" in log, log
    assert config.is_symlink(), "the restored config replaced the administrator's link"
    assert [p.name for p in config.parent.iterdir() if not p.is_dir()] == [config.name]
    state = world.legacy_state()
    assert state["updater"] == "config-files not-installed ", state["updater"]
    assert state == {**legacy, "updater": "config-files not-installed "}
    assert not world.root.file(f"{DOWNLOAD}/local_version.json").exists()
    # The failed migration reported itself: the operators see it in the fleet table.
    [(_box, installed, result, *_)] = world.fleet()
    assert (installed, result) == ("0", "network-error"), world.fleet()
    config.unlink()  # a plain file again for the rest of the scenario
    shutil.copy2(kept, config)
    shutil.rmtree(kept.parent)


def check_one_legacy_run_migrates_the_box(world: World) -> bytes:
    """A run cut short while the package is being installed; the next run finishes."""
    original_config = world.root.file(CONFIG).read_bytes()
    world.bridge(apt=True)
    world.legacy_cron_run_cut("Unpacking opq-box-updater")
    assert CRON_LINE in world.root.sh("crontab -u root -l").stdout
    assert world.root.file(LEGACY_BIN).is_file()
    assert not world.root.file(f"{DOWNLOAD}/local_version.json").exists()
    log = world.legacy_cron_run()
    assert "done: opq-box-updater" in log, log
    assert f"installed opq-box-updater {changelog_version()} from the apt repository" in log
    assert world.root.file(KEYRING).read_bytes() == world.apt_keyring.read_bytes()
    assert world.root.file(SOURCES).read_bytes() == world.apt_source.read_bytes()
    status = world.root.sh("dpkg-query -W -f '${Version} ${db:Status-Status}' opq-box-updater")
    assert status.stdout == f"{changelog_version()} installed"
    config = json.loads(world.root.file(CONFIG).read_text())
    assert config == {"server_url": world.new_url, "version_file": "version.json",
                      "trust_root": "/etc/opq/updater/trust-root.json",
                      "report_url": world.report_url}, config
    assert world.root.file(f"{CONFIG}.legacy").read_bytes() == original_config
    assert world.root.file("/etc/opq/updater/trust-root.json").read_bytes() == \
        world.anchor.read_bytes()
    assert world.root.sh("crontab -u root -l").stdout == f"{SITE_LINE}\n", \
        "only the run_updater line is gone"
    assert not world.root.file(LEGACY_BIN).exists()
    assert world.root.file(f"{LEGACY_BIN}.retired").is_file()
    assert world.root.file(LOG).read_text().startswith(EARLIER_LOG), "the log is kept"
    assert world.root.file("/etc/cron.d/opq-box-updater").is_file()
    return world.root.file(CONFIG).read_bytes()


def check_the_new_updater_installs_a_release(world: World) -> None:
    ran = world.root.sh("opq-box-updater run", check=False)
    assert ran.returncode == 0, ran
    installed = world.root.sh(f"dpkg-query -W -f '${{Version}} ${{Status}}' {PAYLOAD}").stdout
    assert installed == "1.0 install ok installed"
    assert world.root.file(RAN_MARKER).read_text().split() == ["1", "0"]
    status = json.loads(world.root.sh("opq-box-updater status --json").stdout)
    assert status["installed_version"] == 1 and status["last_result"] == "updated", status
    assert [row[1:3] for row in world.fleet()] == [["1", "updated"]], world.fleet()


def check_the_bridge_again_changes_nothing(world: World, config: bytes) -> None:
    def state() -> tuple[object, ...]:
        return (world.root.file(CONFIG).read_bytes(), world.root.sh("crontab -u root -l").stdout,
                world.root.sh("dpkg-query -W -f '${Version} ${Status}' opq-box-updater").stdout,
                world.root.file(f"{CONFIG}.legacy").read_bytes(),
                {key: value for key, value in json.loads(world.root.sh(
                    "opq-box-updater status --json").stdout).items()
                 if not key.startswith("last_")})
    before = state()
    again = world.root.sh(f"{DOWNLOAD}/update.sh", check=False)
    assert again.returncode == 0, again
    assert "done:" in again.stdout and "FAILED" not in again.stdout, again.stdout
    assert state() == before
    assert world.root.file(CONFIG).read_bytes() == config


def test_a_legacy_box_moves_to_the_new_updater(world: World) -> None:
    check_tampered_bridge_is_refused(world)
    check_failed_install_keeps_the_legacy_updater(world)
    config = check_one_legacy_run_migrates_the_box(world)
    check_the_new_updater_installs_a_release(world)
    check_the_bridge_again_changes_nothing(world, config)
