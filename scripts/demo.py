#!/usr/bin/env python3
"""`make demo`: a real update cycle against a local repository, nothing outside this machine.

Operator side: create keys and a repository, build packages carrying a real .deb and a run
script, sign and publish them, serve them on 127.0.0.1. Box side: the real opq-box-updater
against a sandbox config whose dpkg works in demo/box/root, never on this machine's own
packages. Shows an install, an upgrade and an automatic rollback.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("OPQ_DEMO_DIR", ROOT / "demo")).resolve()
BIN = Path(sys.executable).parent
PUBLISH = str(BIN / "opq-box-publish")
UPDATER = str(BIN / "opq-box-updater")


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}",
          flush=True)


def sh(*cmd: str, ok: tuple[int, ...] = (0,)) -> int:
    shown = shlex.join(c.replace(str(DEMO) + "/", "demo/") for c in cmd)
    print(f"$ {shown.replace(str(BIN) + '/', '')}", flush=True)
    code = subprocess.call(cmd, env=ENV)
    if code not in ok:
        sys.exit(f"demo: command failed with exit {code}: {shown}")
    return code


ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
       "COLUMNS": "100"}


def make_deb(name: str, version: str, message: str) -> Path:
    """A small real .deb: one file and a postinst, built with dpkg-deb."""
    tree = DEMO / "build" / f"{name}-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/share/opq-demo").mkdir(parents=True)
    (tree / "usr/share/opq-demo/message").write_text(message + "\n")
    (tree / "DEBIAN/control").write_text(textwrap.dedent(f"""\
        Package: {name}
        Version: {version}
        Architecture: all
        Maintainer: OPQ Demo <opq@example.org>
        Description: demo application of the OPQ Box updater
        """))
    postinst = tree / "DEBIAN/postinst"
    postinst.write_text(f'#!/bin/sh\nset -e\necho "postinst: {name} {version} configured"\n')
    postinst.chmod(0o755)
    out = DEMO / "build" / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def script(name: str, body: str) -> Path:
    path = DEMO / "build" / name
    path.write_text("#!/bin/sh\nset -e\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def init_dpkg_root(root: Path) -> None:
    dpkg = root / "var/lib/dpkg"
    for sub in ("info", "updates", "triggers", "alternatives"):
        (dpkg / sub).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available"):
        (dpkg / name).touch()
    (root / "var/log").mkdir(parents=True, exist_ok=True)


def show_packages(root: Path) -> None:
    """``dpkg -l`` of the sandbox root (never this machine's own database)."""
    sh("dpkg", f"--root={root}", "-l", "opq-demo-app", ok=(0, 1))


def main() -> int:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    (DEMO / "build").mkdir(parents=True)
    repo, keys, box = DEMO / "repo", DEMO / "keys", DEMO / "box"

    say("Operator: create signing keys and an empty repository")
    sh(PUBLISH, "init", str(repo), "--keys", str(keys))

    say("Operator: build and publish release 1 (a .deb and a run script)")
    deb1 = make_deb("opq-demo-app", "1.0", "hello from release 1")
    run1 = script("update.sh", 'echo "update.sh: release $OPQ_UPDATE_VERSION applied '
                               '(was $OPQ_PREVIOUS_VERSION)"\n')
    sh(PUBLISH, "build", str(DEMO / "build/r1.zip"), "--deb", str(deb1), "--run", str(run1),
       "--version", "1")
    sh(PUBLISH, "release", str(repo), str(DEMO / "build/r1.zip"), "--keys", str(keys))

    say("Operator: serve the repository on 127.0.0.1")
    server = subprocess.Popen([PUBLISH, "serve", str(repo), "--bind", "127.0.0.1", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=ENV)
    try:
        assert server.stdout is not None
        first = server.stdout.readline().strip()
        url = first.split(" on ", 1)[1]
        print(first)

        say("Box: a sandbox configuration (dpkg works in demo/box/root, not on this machine)")
        init_dpkg_root(box / "root")
        config = box / "updater_config.json"
        config.write_text(textwrap.dedent(f"""\
            {{
              "server_url": "{url}",
              "trust_root": "{repo}/root/1.root.json",
              "download_dir_path": "{box}/cache/",
              "state_dir": "{box}/state/",
              "log_file": "{box}/box_updater.log",
              "hooks_dir": "{box}/hooks/",
              "dpkg_root": "{box}/root",
              "box_id": "demo-box-1",
              "timeouts": {{"connect": 5, "read": 10, "total": 120}}
            }}
            """))
        print(config.read_text())
        cfg = ["--config", str(config)]

        say("Box: check (exit 100 means an update is available)")
        sh(UPDATER, *cfg, "check", ok=(100,))
        say("Box: packages before")
        show_packages(box / "root")
        say("Box: run — downloads, verifies, installs release 1")
        sh(UPDATER, *cfg, "run")
        show_packages(box / "root")

        say("Operator: publish release 2 (opq-demo-app 1.1)")
        deb2 = make_deb("opq-demo-app", "1.1", "hello from release 2")
        sh(PUBLISH, "build", str(DEMO / "build/r2.zip"), "--deb", str(deb2), "--run", str(run1),
           "--version", "2")
        sh(PUBLISH, "release", str(repo), str(DEMO / "build/r2.zip"), "--keys", str(keys))
        say("Box: run — upgrades to release 2")
        sh(UPDATER, *cfg, "run")
        show_packages(box / "root")
        say("Box: run again — nothing new (the server answers 304)")
        sh(UPDATER, *cfg, "run")

        say("Operator: publish a broken release 3 (its health check fails)")
        deb3 = make_deb("opq-demo-app", "1.2", "hello from a broken release")
        bad = script("healthcheck.sh", 'echo "healthcheck: the app does not start" >&2\n'
                                       "exit 1\n")
        sh(PUBLISH, "build", str(DEMO / "build/r3.zip"), "--deb", str(deb3), "--run", str(run1),
           "--healthcheck", str(bad), "--version", "3")
        sh(PUBLISH, "release", str(repo), str(DEMO / "build/r3.zip"), "--keys", str(keys))
        say("Box: run — applies 1.2, the health check fails, rolls back (exit 5)")
        sh(UPDATER, *cfg, "run", ok=(5,))
        show_packages(box / "root")
        say("Box: run again — release 3 is remembered as failed and skipped (exit 0)")
        sh(UPDATER, *cfg, "run")

        say("Box: status")
        sh(UPDATER, *cfg, "status")
        say("Operator: the repository still verifies")
        sh(PUBLISH, "verify", str(repo))
    finally:
        server.terminate()
        server.wait(timeout=10)
    say("Demo finished: release 1 installed, upgraded to 2, broken 3 rolled back. "
        "Files are in demo/; the box's log is demo/box/box_updater.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
