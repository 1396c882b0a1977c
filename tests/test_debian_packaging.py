"""Fast checks of the Debian packaging sources (debian/, cron.d/, docs/nginx/).

The maintainer scripts' config handling is exercised directly: the Python that the postinst
runs to change ``server_url`` and the readers the debconf ``config`` script uses are taken
out of the scripts and run on files in a temporary directory. The nginx site configuration
is served by Debian's nginx on 127.0.0.1. The whole package life cycle runs in
``test_debian_install.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import opq_box_updater

PROJECT = Path(__file__).resolve().parent.parent
DEBIAN = PROJECT / "debian"
POSTINST = DEBIAN / "opq-box-updater.postinst"
CONFIG_SCRIPT = DEBIAN / "opq-box-updater.config"
POSTRM = DEBIAN / "opq-box-updater.postrm"
MAINTAINER_SCRIPTS = (CONFIG_SCRIPT, POSTINST, POSTRM)
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _require(tool: str) -> str:
    path = shutil.which(tool, path=SYSTEM_PATH)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI but not installed")
        pytest.skip(f"{tool} not installed")
    return path


# --- versions and static files ---------------------------------------------------------------


def test_changelog_version_is_the_module_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    found = re.match(r"opq-box-updater \(([^)]+)\) \S+; urgency=\w+$", first)
    assert found, first
    upstream = re.split(r"[-+~]", found.group(1))[0]
    assert upstream == opq_box_updater.__version__


@pytest.mark.parametrize("script", MAINTAINER_SCRIPTS, ids=lambda p: p.name)
def test_maintainer_scripts_are_strict_posix_shell(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -e$", text, re.MULTILINE)
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True)


def test_cron_entry() -> None:
    text = (PROJECT / "cron.d/opq-box-updater").read_text()
    assert text.endswith("\n"), "cron ignores a last line without a newline"
    jobs = [line for line in text.splitlines() if line and not line.startswith("#")
            and "=" not in line.split()[0]]
    assert len(jobs) == 1
    fields = jobs[0].split(None, 6)
    assert fields[2:5] == ["*", "*", "*"] and fields[5] == "root", "daily, as root"
    assert 0 <= int(fields[0]) < 60 and 0 <= int(fields[1]) < 24
    assert fields[6].startswith("test -x /usr/bin/opq-box-updater && mkdir -p /var/log/opq && "
                                "nice -n 10 ionice -c3 ")
    assert re.search(r"^PATH=.*/usr/sbin.*/usr/bin", text, re.MULTILINE)


def test_logrotate_rules_parse(tmp_path: Path) -> None:
    logrotate = _require("logrotate")
    proc = subprocess.run(
        [logrotate, "-d", "-s", str(tmp_path / "state"), str(DEBIAN / "opq-box-updater.logrotate")],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr


# --- the postinst's server_url writer --------------------------------------------------------


def _postinst_writer() -> str:
    found = re.search(r"<<'PYEOF'\n(.*?)\nPYEOF\n", POSTINST.read_text(), re.DOTALL)
    assert found
    return found.group(1)


def set_server_url(path: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _postinst_writer(), str(path), url],
                          capture_output=True, text=True, check=False)


def test_postinst_creates_the_config(tmp_path: Path) -> None:
    path = tmp_path / "updater_config.json"
    old_umask = os.umask(0o077)
    try:
        proc = set_server_url(path, "https://emilia.example.org/opq/")
    finally:
        os.umask(old_umask)
    assert (proc.returncode, proc.stdout) == (0, "created\n"), proc.stderr
    assert json.loads(path.read_text()) == {"server_url": "https://emilia.example.org/opq/"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file left"


def test_postinst_changes_only_server_url(tmp_path: Path) -> None:
    path = tmp_path / "updater_config.json"
    admin = {"version_file": "version-beta.json", "server_url": "http://old.example/",
             "timeouts": {"connect": 2.5, "read": 30, "total": 600}, "note": "Zählerschrank",
             "max_package_bytes": 10**12}
    path.write_text(json.dumps(admin))
    path.chmod(0o600)
    proc = set_server_url(path, "https://new.example/opq/")
    assert (proc.returncode, proc.stdout) == (0, "updated\n"), proc.stderr
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {**admin, "server_url": "https://new.example/opq/"}
    assert list(data) == list(admin), "key order kept"
    assert "Zählerschrank" in path.read_text(encoding="utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "the administrator's mode kept"


def test_postinst_leaves_an_unchanged_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "updater_config.json"
    path.write_text('{"server_url":"http://same.example/",   "x": [1,2]}')
    before = path.stat()
    proc = set_server_url(path, "http://same.example/")
    assert (proc.returncode, proc.stdout) == (0, "unchanged\n")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", "\xff\xfe"], ids=["bad-json", "list",
                                                                           "not-utf8"])
def test_postinst_never_overwrites_a_file_it_cannot_read(tmp_path: Path, content: str) -> None:
    path = tmp_path / "updater_config.json"
    path.write_bytes(content.encode("latin-1"))
    proc = set_server_url(path, "http://new.example/")
    assert proc.returncode == 1
    assert "fix it by hand" in proc.stderr
    assert path.read_bytes() == content.encode("latin-1")


# --- the config script's reader --------------------------------------------------------------


def _config_reader() -> str:
    found = re.search(r"python3 -c '\n(.*?)\n' \"\$CONFIG\"", CONFIG_SCRIPT.read_text(),
                      re.DOTALL)
    assert found
    return found.group(1)


def _config_sed() -> str:
    found = re.search(r"sed -n '([^']+)' \"\$CONFIG\"", CONFIG_SCRIPT.read_text())
    assert found
    return found.group(1)


@pytest.mark.parametrize(("content", "url"), [
    ('{\n  "timeouts": {"read": 5},\n  "server_url": "http://a.example:8151/opq/"\n}\n',
     "http://a.example:8151/opq/"),
    ('{"server_url": "https://b.example/"}', "https://b.example/"),
    ('{"version_file": "version.json"}', ""),
    ("{broken", ""),
])
def test_config_script_reads_the_current_url(tmp_path: Path, content: str, url: str) -> None:
    path = tmp_path / "updater_config.json"
    path.write_text(content)
    read = subprocess.run([sys.executable, "-c", _config_reader(), str(path)],
                          capture_output=True, text=True, check=True)
    assert read.stdout.strip() == url
    # Without python3 (dpkg-preconfigure before python3 is unpacked) sed reads the same.
    fallback = subprocess.run(["sed", "-n", _config_sed(), str(path)], capture_output=True,
                              text=True, check=True)
    assert fallback.stdout.strip() == url


# --- the nginx site configuration ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nginx_repo(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, repository dir) of nginx running docs/nginx/opq-box-repo.conf."""
    nginx = _require("nginx")
    repo = tmp_path / "repo"
    (repo / "root").mkdir(parents=True)
    (repo / "packages").mkdir()
    port = _free_port()
    site = (PROJECT / "docs/nginx/opq-box-repo.conf").read_text()
    site, listens = re.subn(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{port};", site)
    site, roots = re.subn(r"root /srv/opq-box-repo;", f"root {repo};", site)
    site, aliases = re.subn(r"alias /srv/opq-box-apt/;", f"alias {tmp_path / 'apt'}/;", site)
    assert listens == roots == aliases == 1
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "temp"
    temp.mkdir()
    # As root, workers would run as nobody and could not read a 0700 temporary directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (tmp_path / "nginx.conf").write_text(
        f"{user}pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\ndaemon off;\n"
        "events {}\nhttp {\n  include /etc/nginx/mime.types;\n"
        f"  access_log {tmp_path}/access.log;\n"
        + "".join(f"  {kind}_temp_path {temp}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  include {tmp_path}/site.conf;\n}}\n")
    server = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                              stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    err = server.stderr.read().decode() if server.stderr else ""
                    pytest.fail(f"nginx did not start: {err}")
                time.sleep(0.1)
        yield base, repo
    finally:
        server.terminate()
        server.wait(timeout=10)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), b""


def test_nginx_site_serves_a_repository(nginx_repo: tuple[str, Path]) -> None:
    base, repo = nginx_repo
    (repo / "version.json").write_text('{"signed": {}, "signatures": []}')
    (repo / "root/1.root.json").write_text("{}")
    package = "ab" * 32
    (repo / "packages" / f"{package}.zip").write_bytes(bytes(range(256)) * 40)
    (repo / ".version.json.tmp").write_text("half written")

    status, headers, _ = _get(base + "version.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-cache"
    assert _get(base + "version.json", {"If-None-Match": headers["ETag"]})[0] == 304
    assert _get(base + "version.json",
                {"If-Modified-Since": headers["Last-Modified"]})[0] == 304

    status, headers, _ = _get(base + "root/1.root.json")
    assert status == 200 and headers["Cache-Control"] == "no-cache"

    status, headers, body = _get(base + f"packages/{package}.zip", {"Range": "bytes=100-"})
    assert status == 206 and body == (bytes(range(256)) * 40)[100:]
    assert headers["Content-Range"] == "bytes 100-10239/10240"
    assert "immutable" in headers["Cache-Control"]

    for path in (".version.json.tmp", "", "root/", "packages/", "packages/x.zip",
                 "version-beta.json"):
        assert _get(base + path)[0] == 404, path


def test_nginx_site_serves_the_apt_repository(nginx_repo: tuple[str, Path]) -> None:
    """The /apt/ location (issue 8): exactly the files of an apt repository that
    scripts/apt-repo writes, Release files and indexes revalidated, by-hash and pool
    immutable, half-written dotfiles and listings never."""
    base, repo = nginx_repo
    apt = repo.parent / "apt"
    dists = apt / "dists/bookworm"
    by_hash = dists / "main/binary-armhf/by-hash/SHA256"
    by_hash.mkdir(parents=True)
    (apt / "pool/main").mkdir(parents=True)
    files = {"dists/bookworm/InRelease": "no-cache", "dists/bookworm/Release": "no-cache",
             "dists/bookworm/Release.gpg": "no-cache",
             "dists/bookworm/main/binary-armhf/Packages": "no-cache",
             "dists/bookworm/main/binary-armhf/Packages.gz": "no-cache",
             "dists/bookworm/main/binary-armhf/by-hash/SHA256/" + "0f" * 32: "immutable",
             "pool/main/opq-box-updater_1.1.0+site2_all.deb": "immutable"}
    for name in files:
        (apt / name).write_text(name)
    for name, cache in files.items():
        status, headers, body = _get(base + "apt/" + name)
        assert (status, body.decode()) == (200, name), name
        assert cache in headers["Cache-Control"], name
    for name in ("dists/bookworm/.Release.tmp", "dists/bookworm/main/binary-armhf/by-hash/"
                 "SHA256/.0f.tmp", ".stage.x/dists/bookworm/InRelease", "pool/main/.x.deb",
                 "pool/main/x.txt", "", "dists/", "pool/main/"):
        (apt / name).parent.mkdir(parents=True, exist_ok=True)
        if name and not name.endswith("/"):
            (apt / name).write_text("hidden")
        assert _get(base + "apt/" + name)[0] == 404, name


# --- the maintainer scripts with a stand-in for debconf (issue 13, 2 and 3) -----------------

#: A stand-in for /usr/share/debconf/confmodule: values in files, every call logged, and
#: the answers a person types taken in order from ``answers`` (none left: "not shown", 30).
STUB_CONFMODULE = r"""
_f() { printf '%s/%s' "$STUB" "$(echo "$1" | tr / _)"; }
db_get() { RET="$(cat "$(_f "$1")" 2>/dev/null || true)"; }
db_set() { printf '%s' "$2" > "$(_f "$1")"; }
db_fset() { echo "fset $*" >> "$STUB/log"; }
db_subst() { q="$1"; k="$2"; shift 2; echo "subst $q $k=$*" >> "$STUB/log"; }
db_go() { :; }
db_stop() { :; }
db_input() {
    echo "input $2" >> "$STUB/log"
    case "$2" in *invalid_server_url) return 0 ;; esac
    [ -s "$STUB/answers" ] || return 30
    head -n 1 "$STUB/answers" | tr -d '\n' > "$(_f "$2")"
    sed -i 1d "$STUB/answers"
}
"""


class Debconf:
    """The config script and the postinst run against a directory instead of /etc, /var
    and debconf's database; ``python3`` is this project's."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.stub = base / "debconf"
        self.stub.mkdir()
        (self.stub / "confmodule").write_text(STUB_CONFMODULE)
        self.config = base / "etc/opq/updater_config.json"
        self.logdir = base / "var/log/opq"

    def script(self, path: Path) -> Path:
        text = path.read_text().replace(". /usr/share/debconf/confmodule",
                                        f'STUB={self.stub}; . "$STUB/confmodule"')
        for old in ("/etc/opq", "/var/log/opq", "/var/lib/opq-box-updater",
                    "/var/cache/opq-box-updater"):
            text = text.replace(old, f"{self.base}{old}")
        out = self.stub / path.name
        out.write_text(text)
        return out

    def run(self, path: Path, *answers: str, action: str = "configure"
            ) -> subprocess.CompletedProcess[str]:
        (self.stub / "answers").write_text("".join(a + "\n" for a in answers))
        (self.stub / "log").write_text("")
        env = {"PATH": f"{Path(sys.executable).parent}:{SYSTEM_PATH}", "LC_ALL": "C.UTF-8"}
        return subprocess.run(["sh", str(self.script(path)), action], capture_output=True,
                              text=True, timeout=120, env=env, cwd=self.base, check=False)

    def get(self, question: str) -> str:
        path = self.stub / f"opq-box-updater_{question}"
        return path.read_text() if path.exists() else ""

    def set(self, question: str, value: str) -> None:
        (self.stub / f"opq-box-updater_{question}").write_text(value)

    def log(self) -> list[str]:
        return (self.stub / "log").read_text().splitlines()


GOOD_URL = "https://emilia.example.org/opq-updates/"
BAD_URLS = {"http://?x": "names no host", "http:///path": "names no host",
            "http://#frag": "names no host",
            "https://emilia.example.org/opq-updates/repo?token=a": "must not have a query",
            "http://127.0.0.1:99999/": "invalid port", "http://[::1": "cannot be parsed"}


@pytest.mark.parametrize("bad", BAD_URLS)
def test_config_script_asks_again_saying_what_is_wrong(tmp_path: Path, bad: str) -> None:
    debconf = Debconf(tmp_path)
    proc = debconf.run(CONFIG_SCRIPT, bad, GOOD_URL)
    assert proc.returncode == 0, proc.stderr
    assert debconf.get("server_url") == GOOD_URL
    log = debconf.log()
    assert log.count("input opq-box-updater/server_url") == 2, log
    assert "input opq-box-updater/invalid_server_url" in log
    assert f"subst opq-box-updater/invalid_server_url url={bad}" in log
    reason = next(line for line in log if "invalid_server_url reason=" in line)
    assert BAD_URLS[bad] in reason and "the URL" not in reason, reason


def test_reconfigure_shows_the_current_url_and_an_empty_answer_keeps_it(tmp_path: Path) -> None:
    debconf = Debconf(tmp_path)
    debconf.config.parent.mkdir(parents=True)
    debconf.config.write_text(json.dumps({"server_url": GOOD_URL, "version_file": "version.json"}))
    debconf.set("applied_server_url", GOOD_URL)
    proc = debconf.run(CONFIG_SCRIPT, "")
    assert proc.returncode == 0, proc.stderr
    assert f"subst opq-box-updater/server_url current={GOOD_URL}" in debconf.log()
    assert debconf.get("server_url") == GOOD_URL
    assert "input opq-box-updater/invalid_server_url" not in debconf.log()


def test_config_script_drops_blanks_and_shows_control_characters(tmp_path: Path) -> None:
    """What a console without line editing sends: an arrow key's escape sequence, blanks
    around a pasted URL (tests/operator_reconfigure.py types them at a real terminal)."""
    debconf = Debconf(tmp_path)
    proc = debconf.run(CONFIG_SCRIPT, "https://x.example.org/\x1b[D", f"  {GOOD_URL}\t")
    assert proc.returncode == 0, proc.stderr
    assert debconf.get("server_url") == GOOD_URL
    assert ("subst opq-box-updater/invalid_server_url url=https://x.example.org/^[[D"
            in debconf.log())


def test_a_preseeded_bad_url_is_asked_again_and_never_written(tmp_path: Path) -> None:
    debconf = Debconf(tmp_path)
    debconf.set("server_url", "https://emilia.example.org/opq-updates/?token=a")
    proc = debconf.run(CONFIG_SCRIPT, GOOD_URL)
    assert proc.returncode == 0, proc.stderr
    assert "fset opq-box-updater/server_url seen false" in debconf.log()
    assert debconf.get("server_url") == GOOD_URL
    # Noninteractive (nothing shown): the postinst refuses it and says why.
    debconf.set("server_url", "http://127.0.0.1:99999/")
    assert debconf.run(CONFIG_SCRIPT).returncode == 0
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert "not changed: the URL has an invalid port" in proc.stderr
    assert not debconf.config.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_postinst_takes_the_log_directory_back_and_sets_the_log_mode(tmp_path: Path) -> None:
    debconf = Debconf(tmp_path)
    debconf.logdir.mkdir(parents=True)
    os.chown(debconf.logdir, 65534, 65534)
    debconf.logdir.chmod(0o777)
    debconf.set("server_url", GOOD_URL)
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    st = debconf.logdir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)
    log = debconf.logdir / "box_updater.log"
    st = log.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, ADM_GID, 0o640)
    assert json.loads(debconf.config.read_text()) == {"server_url": GOOD_URL}
    # A log left 0644 root:root (by cron's redirection, or an older version) is brought back.
    os.chown(log, 0, 0)
    log.chmod(0o644)
    assert debconf.run(POSTINST).returncode == 0
    st = log.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, ADM_GID, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_postinst_never_changes_a_file_the_log_links_to(tmp_path: Path) -> None:
    debconf = Debconf(tmp_path)
    debconf.logdir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    (debconf.logdir / "box_updater.log").symlink_to(victim)
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file" in proc.stderr
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


ADM_GID = 4


def test_nginx_serves_exactly_the_channel_names_the_box_accepts(
        nginx_repo: tuple[str, Path]) -> None:
    """docs/nginx and metadata.CHANNEL_PATTERN agree (issue 13, 6)."""
    from opq_box_updater.metadata import CHANNEL_PATTERN

    base, repo = nginx_repo
    names = ["version.json", "version-beta.json", "version-arm_64.json", "versionX.json",
             "version-a-b.json", "version-.json", "version_beta.json"]
    for name in names:
        (repo / name).write_text("{}")
    for name in names:
        expected = 200 if CHANNEL_PATTERN.fullmatch(name) else 404
        assert _get(base + name)[0] == expected, name


# --- a Raspberry Pi: tmpfs /var/log, linked /etc/opq, the cache on its own mount ------------


CRON = PROJECT / "cron.d/opq-box-updater"


def test_cron_line_starts_the_updater_when_the_log_directory_is_gone(tmp_path: Path) -> None:
    """A tmpfs /var/log is empty after a reboot: the redirection must not stop every run."""
    command = re.search(r"^(?:\S+\s+){5}root\s+(.+)$", CRON.read_text(), re.MULTILINE)
    assert command
    bindir = tmp_path / "bin"
    bindir.mkdir()
    updater = bindir / "opq-box-updater"
    updater.write_text(f'#!/bin/sh\necho "ran: $*"; touch {tmp_path}/ran\n')
    updater.chmod(0o755)
    logdir = tmp_path / "var/log/opq"
    line = (command.group(1).replace("/usr/bin/opq-box-updater", str(updater))
            .replace("/var/log/opq", str(logdir))
            .replace("--random-delay 3600", "--random-delay 0"))
    env = {"PATH": f"{bindir}:{SYSTEM_PATH}", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ran").exists(), "the updater never started"
    assert (logdir / "box_updater.log").read_text() == "ran: -q run --random-delay 0\n"


def test_tmpfiles_entry_makes_the_log_directory_at_boot(tmp_path: Path) -> None:
    tmpfiles = _require("systemd-tmpfiles")
    entry = DEBIAN / "opq-box-updater.tmpfiles"
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", tmp_path / "etc" / name)
    proc = subprocess.run([tmpfiles, f"--root={tmp_path}", "--create", str(entry)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    st = (tmp_path / "var/log/opq").lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert (st.st_uid, st.st_gid) == (0, 0)
    st = (tmp_path / "var/log/opq/box_updater.log").lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, ADM_GID)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_postinst_writes_through_a_linked_config_and_keeps_its_group(tmp_path: Path) -> None:
    debconf = Debconf(tmp_path)
    debconf.config.parent.mkdir(parents=True)
    target = tmp_path / "data/opq/updater_config.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"server_url": "https://old.example.org/", "log_level": "INFO"}))
    os.chown(target, 0, ADM_GID)
    target.chmod(0o640)
    debconf.config.symlink_to(target)
    debconf.set("server_url", GOOD_URL)
    proc = debconf.run(POSTINST)
    assert proc.returncode == 0, proc.stderr
    assert debconf.config.is_symlink() and os.readlink(debconf.config) == str(target)
    assert json.loads(target.read_text()) == {"server_url": GOOD_URL, "log_level": "INFO"}
    st = target.lstat()
    assert stat.S_ISREG(st.st_mode)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, ADM_GID, 0o640)
    assert sorted(p.name for p in target.parent.iterdir()) == ["updater_config.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mount needs root")
def test_purge_tolerates_a_linked_etc_opq_and_a_mounted_cache(tmp_path: Path) -> None:
    debconf = Debconf(tmp_path)
    real_etc = tmp_path / "data/etc-opq"
    (real_etc / "updater/hooks").mkdir(parents=True)
    (real_etc / "updater/hooks/50-admin").write_text("#!/bin/sh\n")
    (real_etc / "updater_config.json").write_text("{}")
    debconf.config.parent.parent.mkdir(parents=True)
    debconf.config.parent.symlink_to(real_etc)
    cache = tmp_path / "var/cache/opq-box-updater"
    (cache).mkdir(parents=True)
    (tmp_path / "var/lib/opq-box-updater/rollback").mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(cache)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {mounted.stderr}")
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr}")
    try:
        (cache / "abc.zip").write_text("x")
        (cache / "sub").mkdir()
        proc = debconf.run(POSTRM, action="purge")
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(cache) and list(cache.iterdir()) == []
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert debconf.config.parent.is_symlink()
    assert not (real_etc / "updater_config.json").exists()
    assert (real_etc / "updater/hooks/50-admin").exists(), "the admin's hooks are kept"
    assert not (tmp_path / "var/lib/opq-box-updater").exists()
