"""``opq-box-publish``: argument parsing, output and exit codes — nothing else.

Exit codes: 0 ok; 1 unexpected error; 2 usage or configuration error (including anything
the operator asked for that cannot be done, :class:`~.common.PublishError`); 3 verification
failed (``verify``, or a repository whose own root chain does not verify); 4 ``rollout
widen`` refused because the current stage fails too often. Errors are one line on stderr;
tracebacks only with ``-v``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, RepositoryError
from ..metadata import format_time
from ..text import printable
from . import (
    bridge,
    build,
    export,
    fleet,
    keys,
    repo,
    rollout,
    rotate,
    serve,
    stage,
    store,
    verify,
)
from .common import (
    DEFAULT_RELEASE_EXPIRES,
    DEFAULT_ROOT_EXPIRES,
    PublishError,
    parse_duration,
    sha256_file,
)

PROG = "opq-box-publish"
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_VERIFY, EXIT_UNHEALTHY = 0, 1, 2, 3, 4
#: Failed boxes ``rollout status`` names per release.
FAILED_SHOWN = 20

logger = logging.getLogger("opq_box_updater")


def _out(text: str = "") -> None:
    print(text, flush=True)


def _expires(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except PublishError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _percent(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 100, not {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def _passphrase(args: argparse.Namespace) -> bytes | None:
    return keys.read_passphrase(args.passphrase_file)


# --- commands ------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    result = repo.init_repo(
        args.repo, args.keys, root_keys=args.root_keys, root_threshold=args.root_threshold,
        release_keys=args.release_keys, release_threshold=args.release_threshold,
        expires=args.expires or DEFAULT_ROOT_EXPIRES, passphrase=_passphrase(args))
    root = result.root
    _out(f"created repository {args.repo.absolute()}")
    _out(f"trust anchor: {result.trust_anchor} (root v1, expires {format_time(root.expires)})")
    _out("  install this file on every box as trust_root "
         "(/usr/share/opq-box-updater/root.json)")
    for name, ids in (("root", result.root_keyids), ("release", result.release_keyids)):
        _out(f"{name} keys (threshold {root.role(name).threshold}): {' '.join(ids)}")
    _out(f"private keys: {args.keys.absolute()} (mode 0600): keep them off the web server "
         "and back them up")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    manifest = build.build_package(args.out, version=args.version, debs=args.deb or (),
                                   run=args.run, healthcheck=args.healthcheck,
                                   apt_allow_remove=args.apt_allow_remove or ())
    for warning in build.files_dependency_warnings(args.deb or (), args.base_packages):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    sha, length = sha256_file(args.out)
    _out(f"built {args.out}: version {manifest.version}, debs [{', '.join(manifest.debs)}], "
         f"run {manifest.run}, healthcheck {manifest.healthcheck}"
         + (f", apt may remove [{', '.join(manifest.apt_allow_remove)}]"
            if manifest.apt_allow_remove else "")
         + f"; {length} bytes, sha256 {sha}")
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    warnings = build.package_dependency_warnings(args.package, args.base_packages)
    release = repo.publish_release(
        args.repo, args.keys, args.package, expires=args.expires or DEFAULT_RELEASE_EXPIRES,
        rollout=args.rollout, version_file=args.version_file, notes=args.notes,
        force=args.force, passphrase=_passphrase(args))
    _out(f"published release v{release.version} in {args.version_file}: "
         f"{release.package.path} ({release.package.length} bytes), rollout "
         f"{release.rollout_percent}%, expires {format_time(release.expires)}")
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    release = repo.refresh_release(
        args.repo, args.keys, expires=args.expires or DEFAULT_RELEASE_EXPIRES,
        version_file=args.version_file, rollout=args.rollout, passphrase=_passphrase(args),
        force=args.force)
    _out(f"re-signed {args.version_file}: release v{release.version}, issued "
         f"{format_time(release.issued)}, expires {format_time(release.expires)}, rollout "
         f"{release.rollout_percent}%")
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace) -> int:
    result = rotate.rotate_role(
        args.repo, args.keys, args.role, add=args.add or (), remove=args.remove or (),
        threshold=args.threshold, expires=args.expires or DEFAULT_ROOT_EXPIRES,
        passphrase=_passphrase(args))
    root = result.root
    role = root.role(args.role)
    _out(f"wrote root/{root.version}.root.json (expires {format_time(root.expires)})")
    _out(f"{args.role} keys (threshold {role.threshold}): {' '.join(role.keyids)}")
    for keyid in result.generated:
        _out(f"generated {args.role} key {keyid} in {args.keys}")
    if result.resigned:
        _out(f"re-signed for root v{root.version}: {', '.join(result.resigned)}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify.verify_repo(args.repo, args.trust_root)
    for warning in report.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    if not report.ok:
        return EXIT_VERIFY
    newest = report.roots[-1]
    _out(f"ok: root chain v{report.roots[0].version}..v{newest.version}, expires "
         f"{format_time(newest.expires)}")
    for name, release in report.releases.items():
        _out(f"ok: {name}: release v{release.version}, {release.package.path}, rollout "
             f"{release.rollout_percent}%, expires {format_time(release.expires)}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    result = export.export_repo(args.repo, args.dir, version_file=args.version_file)
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    release = result.release
    _out(f"exported release v{release.version} of {args.version_file} to {args.dir}: root "
         f"v1..v{result.root_version}, {release.package.path} ({release.package.length} "
         f"bytes); {len(result.written)} file(s) written, the copy verifies")
    _out(f"boxes take this copy until {format_time(release.expires)} (the release's expiry);"
         " after that refresh and export again")
    _out("on a box: mkdir -p /mnt/usb; mount -o ro,nodev,nosuid,noexec /dev/sda1 /mnt/usb; "
         "opq-box-updater run --from /mnt/usb; umount /mnt/usb (its version_file must be "
         f"{args.version_file})")
    return EXIT_OK


def cmd_bridge(args: argparse.Namespace) -> int:
    apt = None
    if (args.apt_source is None) != (args.apt_keyring is None):
        raise PublishError("--apt-source and --apt-keyring go together")
    if args.apt_source is not None:
        apt = bridge.AptSource(args.apt_source, args.apt_keyring)
    passphrase = (keys.read_passphrase(args.legacy_key_passphrase_file)
                  if args.legacy_key_passphrase_file else None)
    result = bridge.write_bridge(
        args.legacy_dir, legacy_key=args.legacy_key, debs=args.deb,
        server_url=args.server_url, trust_root=args.trust_root, with_debs=args.with_debs,
        version_file=args.version_file, version=args.legacy_version, apt=apt,
        report_url=args.report_url or "", passphrase=passphrase)
    _out(f"published bridge v{result.version} in {result.version_file}: "
         f"{result.package.name}, {result.public_key.name}, {result.signature.name}")
    _out(f"  carries {', '.join(result.debs)}; moves boxes to {args.server_url}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    serve.serve(args.repo, args.bind, args.port, store_url=args.store)
    return EXIT_OK


def _store(args: argparse.Namespace) -> store.Store:
    """``--store URL``; else REPO's default store; else the collector's
    (``$OPQ_COLLECTOR_DB`` or SQLite under /var/lib/opq-box-collector)."""
    if getattr(args, "repo", None) is not None:
        return store.open_repo_store(args.repo, args.store)
    return store.open_store(args.store or store.collector_store_url(os.environ), create=False)


def cmd_fleet(args: argparse.Namespace) -> int:
    opened = _store(args)
    sys.stdout.write(fleet.format_fleet(fleet.fleet_rows(opened)))
    conflicts = opened.conflict_count()
    if conflicts:
        print(f"{PROG}: warning: {conflicts} conflicting report(s), not shown above: "
              "see opq-box-publish boxes list", file=sys.stderr)
    return EXIT_OK


def cmd_boxes(args: argparse.Namespace) -> int:
    if (args.action == "list") != (args.box is None) or (args.key and args.action != "accept"):
        raise PublishError("usage: boxes list | boxes accept BOX [--key KEYID] | "
                           "boxes reject BOX | boxes rekey BOX")
    opened = _store(args)
    if args.action == "list":
        sys.stdout.write(fleet.format_boxes(
            opened.boxes(), opened.conflicts(limit=fleet.CONFLICTS_LISTED),
            opened.conflict_count()))
        return EXIT_OK
    if args.action == "accept":
        box = opened.accept(args.box, args.key)
    elif args.action == "reject":
        box = opened.reject(args.box)
    else:
        box = opened.rekey(args.box)
    text = (f"box {printable(box.box_id)}: {box.state}, key {box.key_id or '-'}, "
            f"counter {box.counter}")
    logger.info("boxes %s: %s", args.action, text)
    _out(text)
    return EXIT_OK


def _boxes(args: argparse.Namespace) -> list[rollout.BoxView]:
    """The newest report of every known box, from the collector's store."""
    opened = _store(args)
    try:
        return rollout.latest_views(opened.latest())
    finally:
        opened.close()


def _channel(row: rollout.Health) -> str:
    return f"{row.release.channel} v{row.release.version}"


def cmd_rollout_status(args: argparse.Namespace) -> int:
    boxes = _boxes(args)
    rows = [r for r in stage.status(args.repo, boxes)
            if args.version_file in (None, r.release.channel)]
    if not rows:
        raise PublishError(f"{args.repo} publishes no release"
                           + (f" in {args.version_file}" if args.version_file else ""))
    sys.stdout.write(rollout.format_health(rows))
    for row in rows:
        failed = [b for b in boxes if b.channel == row.release.channel
                  and rollout.is_failed(b, row.release)]
        for box in failed[:FAILED_SHOWN]:  # box-sent text: printable() for the terminal
            _out(f"{_channel(row)}: failed on {printable(box.box_id)} "
                 f"({printable(box.result or '-')}: "
                 f"{printable(' '.join((box.error or '').split())[:100])})")
        if len(failed) > FAILED_SHOWN:
            _out(f"{_channel(row)}: and {len(failed) - FAILED_SHOWN} more failed boxes")
    return EXIT_OK


def cmd_rollout_widen(args: argparse.Namespace) -> int:
    release, seen = stage.widen(
        args.repo, args.keys, args.to, _boxes(args), version_file=args.version_file,
        max_failure_rate=args.max_failure_rate, force=args.force,
        expires=args.expires or DEFAULT_RELEASE_EXPIRES, passphrase=_passphrase(args))
    rate = f"{seen.failure_rate:.1f}%" if seen.tried else "no box has tried it yet"
    _out(f"widened {args.version_file} v{release.version} to {release.rollout_percent}% "
         f"(the stage before: {seen.failed} of {seen.tried} failed, {rate}"
         f"{'; forced' if args.force else ''})")
    return EXIT_OK


def cmd_rollout_halt(args: argparse.Namespace) -> int:
    release = stage.halt(args.repo, args.keys, version_file=args.version_file,
                         expires=args.expires or DEFAULT_RELEASE_EXPIRES,
                         passphrase=_passphrase(args))
    _out(f"halted {args.version_file} v{release.version}: rollout 0%, issued "
         f"{format_time(release.issued)}; boxes that have it keep it (recall to replace it)")
    return EXIT_OK


def cmd_recall(args: argparse.Namespace) -> int:
    result = stage.recall(
        args.repo, args.keys, _boxes(args), version_file=args.version_file,
        to_version=args.to_version, rollout=args.rollout,
        expires=args.expires or DEFAULT_RELEASE_EXPIRES, passphrase=_passphrase(args))
    new = result.release
    _out(f"recalled {args.version_file} v{result.recalled.version}: published v{new.version} "
         f"with the content of v{result.source.version} ({new.package.path}), rollout "
         f"{new.rollout_percent}%")
    return EXIT_OK


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100, not {text!r}")
    return value


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show details and tracebacks")
    signing = argparse.ArgumentParser(add_help=False)
    signing.add_argument("--keys", type=Path, required=True, metavar="KEYDIR",
                         help="directory of private keys (never inside REPO)")
    signing.add_argument("--passphrase-file", type=Path, metavar="FILE",
                         help="passphrase of the keys (default: $OPQ_PUBLISH_PASSPHRASE)")

    parser = argparse.ArgumentParser(prog=PROG, parents=[common],
                                     description="Sign and publish OPQ Box updates.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str,
            *, signs: bool = False) -> argparse.ArgumentParser:
        parents = [common, signing] if signs else [common]
        p = sub.add_parser(name, parents=parents, help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create a repository, its first root and keys", signs=True)
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("--root-keys", type=_positive, default=1, metavar="N")
    p.add_argument("--root-threshold", type=_positive, default=1, metavar="T")
    p.add_argument("--release-keys", type=_positive, default=1, metavar="N")
    p.add_argument("--release-threshold", type=_positive, default=1, metavar="T")
    p.add_argument("--expires", type=_expires, metavar="DURATION",
                   help="root lifetime such as 2y (default) or 400d")

    p = add("build", cmd_build, "build an update package zip")
    p.add_argument("out", type=Path, metavar="OUT.zip")
    p.add_argument("--deb", type=Path, action="append", metavar="X.deb",
                   help="a Debian package (repeat; applied in this order)")
    p.add_argument("--run", type=Path, metavar="SCRIPT", help="run script (update.sh)")
    p.add_argument("--healthcheck", type=Path, metavar="SCRIPT")
    p.add_argument("--apt-allow-remove", action="append", metavar="PKG",
                   help="an installed package apt may remove while applying this release on "
                        "boxes with installer: apt (repeat; the rollback brings it back); "
                        "apt wanting to remove any other package postpones the update")
    p.add_argument("--version", type=_positive, required=True, metavar="V",
                   help="release number (an integer that only grows)")
    p.add_argument("--base-packages", type=Path, metavar="FILE",
                   help="packages every box has (`dpkg-query -W` on the box image): warn "
                        "about dependencies neither the release nor these satisfy")

    p = add("release", cmd_release, "sign and publish a package", signs=True)
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("package", type=Path, metavar="PACKAGE.zip")
    p.add_argument("--expires", type=_expires, metavar="DURATION", help="default 30d")
    p.add_argument("--rollout", type=_percent, default=100, metavar="PERCENT")
    p.add_argument("--version-file", default=repo.DEFAULT_VERSION_FILE, metavar="F")
    p.add_argument("--notes", default="", metavar="TEXT")
    p.add_argument("--force", action="store_true",
                   help="publish even when the version is not newer than the current one")
    p.add_argument("--base-packages", type=Path, metavar="FILE",
                   help="packages every box has (`dpkg-query -W` on the box image): warn "
                        "about dependencies neither the release nor these satisfy")

    p = add("refresh", cmd_refresh, "re-sign the current release with a later expiry",
            signs=True)
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("--expires", type=_expires, metavar="DURATION", help="default 30d")
    p.add_argument("--version-file", default=repo.DEFAULT_VERSION_FILE, metavar="F")
    p.add_argument("--rollout", type=_percent, metavar="PERCENT",
                   help="change the rollout percentage (default: keep)")
    p.add_argument("--force", action="store_true",
                   help="re-sign a release signed by the keys of the older root it names "
                        "(after a rotate cut short)")

    p = add("rotate", cmd_rotate, "write the next root with changed keys", signs=True)
    p.epilog = ("Without --add, --remove or --threshold every key of the role is replaced by a "
                "new one. A role left with fewer keys than its threshold gets new keys "
                "generated into KEYDIR. Version files are re-signed for the new root. Keys "
                "removed from the root stay in KEYDIR: delete or archive them yourself.")
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("--role", choices=("root", "release"), required=True)
    p.add_argument("--add", action="append", metavar="PUBKEY",
                   help="hex public key or .pub/.pem file (repeatable)")
    p.add_argument("--remove", action="append", metavar="KEYID",
                   help="keyid or unique prefix of at least 8 digits (repeatable)")
    p.add_argument("--threshold", type=_positive, metavar="T")
    p.add_argument("--expires", type=_expires, metavar="DURATION",
                   help="lifetime of the new root (default 2y)")

    p = add("verify", cmd_verify, "verify a whole repository as a box would")
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("--trust-root", type=Path, metavar="FILE",
                   help="trust anchor (default REPO/root/1.root.json)")

    p = add("export", cmd_export, "write one channel's release, its package and every root "
            "to a directory (a USB stick) for boxes without a network (run --from DIR)")
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--version-file", default=repo.DEFAULT_VERSION_FILE, metavar="F",
                   help="the channel to export (default version.json)")

    p = add("bridge", cmd_bridge, "a release for boxes on the original updater that moves "
            "them to opq-box-updater")
    p.epilog = ("Writes a legacy-format release (version file, public key, tar package, base64 "
                "signature) into LEGACY_DIR, signed with the operators' legacy RSA or EC key. "
                "Its update.sh installs opq-box-updater (from the apt repository of "
                "--apt-source when reachable, else from the carried debs), sets server_url "
                "and the trust anchor, and retires the original updater only after "
                "opq-box-updater verified the new server. See docs/migration.md.")
    p.add_argument("legacy_dir", type=Path, metavar="LEGACY_DIR")
    p.add_argument("--legacy-key", type=Path, required=True, metavar="KEY.pem",
                   help="the original updater's signing key (RSA or EC, PEM)")
    p.add_argument("--legacy-key-passphrase-file", type=Path, metavar="FILE")
    p.add_argument("--deb", type=Path, action="append", required=True, metavar="FILE.deb",
                   help="the opq-box-updater .deb (repeat for more debs to install)")
    p.add_argument("--server-url", required=True, metavar="URL",
                   help="the new repository the boxes follow (server_url)")
    p.add_argument("--trust-root", type=Path, required=True, metavar="ROOT.json",
                   help="the trust anchor the boxes pin (root/1.root.json of the new "
                        "repository)")
    p.add_argument("--with-debs", type=Path, metavar="DIR",
                   help="more debs to carry (dependencies, for boxes without apt access)")
    p.add_argument("--version-file", default=bridge.DEFAULT_VERSION_FILE, metavar="F",
                   help="the legacy version file (the boxes' version_file)")
    p.add_argument("--legacy-version", type=_positive, metavar="V",
                   help="version of the bridge (default: the current one rounded down, +1)")
    p.add_argument("--report-url", metavar="URL",
                   help="report_url of the migrated boxes: they report from the migration "
                        "on, so the fleet table shows which boxes moved")
    p.add_argument("--apt-source", type=Path, metavar="FILE.sources",
                   help="deb822 source of the operators' apt repository, with Signed-By")
    p.add_argument("--apt-keyring", type=Path, metavar="FILE",
                   help="the keyring that source's Signed-By names")


    db_help = ("report store: sqlite:////ABS/PATH.db or postgresql://USER@HOST/DB (default: "
               "REPO/.reports/reports.db with REPO, else $OPQ_COLLECTOR_DB or "
               f"{store.DEFAULT_COLLECTOR_DB})")
    p = add("serve", cmd_serve, "development HTTP server (ETag, Range, POST /report)")
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS")
    p.add_argument("--port", type=int, default=serve.DEFAULT_PORT, metavar="PORT",
                   help="0 picks a free port (printed on the first line)")
    p.add_argument("--store", "--db", dest="store", metavar="URL", help=db_help)

    p = add("rollout", cmd_rollout_status, "rollout health; widen or halt a phased rollout")
    stages = p.add_subparsers(dest="step", required=True, metavar="STEP")
    store_help = "the collector's report store (default sqlite under REPO/.reports)"
    for step, func, text, signs in (
            ("status", cmd_rollout_status, "per channel and release: boxes in the bucket, "
             "updated, failed, waiting, not seen, stale", False),
            ("widen", cmd_rollout_widen, "raise the rollout percentage unless the current "
             "stage fails too often (exit 4)", True),
            ("halt", cmd_rollout_halt, "set the rollout percentage to 0 at once", True)):
        q = stages.add_parser(step, parents=[common, signing] if signs else [common],
                              help=text, description=text)
        q.set_defaults(func=func)
        q.add_argument("repo", type=Path, metavar="REPO")
        q.add_argument("--version-file", metavar="F", default=None if step == "status"
                       else repo.DEFAULT_VERSION_FILE,
                       help="the channel (status: every channel by default)")
        if step != "halt":
            q.add_argument("--store", "--db", dest="store", metavar="URL", help=store_help)
        if signs:
            q.add_argument("--expires", type=_expires, metavar="DURATION", help="default 30d")
    widen = stages.choices["widen"]
    widen.add_argument("--to", type=_percent, required=True, metavar="PERCENT")
    widen.add_argument("--max-failure-rate", type=_rate, metavar="PERCENT",
                       default=rollout.DEFAULT_MAX_FAILURE_RATE,
                       help="refuse above this share of failed boxes among those that tried "
                            "(default 5)")
    widen.add_argument("--force", action="store_true", help="widen whatever the failure rate")

    p = add("recall", cmd_recall, "publish the last good release's content as a new version",
            signs=True)
    p.add_argument("repo", type=Path, metavar="REPO")
    p.add_argument("--version-file", default=repo.DEFAULT_VERSION_FILE, metavar="F")
    p.add_argument("--store", "--db", dest="store", metavar="URL", help=store_help)
    p.add_argument("--to-version", type=_positive, metavar="V",
                   help="the earlier release whose content to publish (default: the newest "
                        "one no box failed, with other content than the current one)")
    p.add_argument("--rollout", type=_percent, default=100, metavar="PERCENT")
    p.add_argument("--expires", type=_expires, metavar="DURATION", help="default 30d")

    p = add("fleet", cmd_fleet, "table of boxes: the newest report of each")
    p.add_argument("repo", type=Path, metavar="REPO", nargs="?")
    p.add_argument("--store", "--db", dest="store", metavar="URL", help=db_help)

    p = add("boxes", cmd_boxes, "list, accept, reject or re-key the boxes that report")
    p.epilog = ("A box's key is learned from its first signed report; a report signed by "
                "another key for the same box id is kept as a conflict. accept BOX --key "
                "KEYID trusts a key seen in a conflict; accept BOX takes a rejected box "
                "back; reject BOX refuses its reports; rekey BOX forgets its key, so the "
                "next report's key is learned (a reinstalled box).")
    p.add_argument("action", choices=("list", "accept", "reject", "rekey"))
    p.add_argument("box", nargs="?", metavar="BOX")
    p.add_argument("--key", metavar="KEYID", help="accept: a key id (or 8+ digit prefix) "
                   "seen in the box's conflicts")
    p.add_argument("--repo", type=Path, metavar="REPO",
                   help="the store of serve for REPO")
    p.add_argument("--store", "--db", dest="store", metavar="URL", help=db_help)
    return parser


class _Formatter(logging.Formatter):
    """``opq-box-publish: warning: X``: the level in lower case without ``addLevelName``,
    which would rename the levels for the whole process (the box's log file included)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {super().format(record)}"


def _setup_logging(verbose: bool) -> tuple[list[logging.Handler], int, bool]:
    """Route the shared ``opq_box_updater`` logger (the box modules the publisher uses log
    there too) to stderr; returns what it was, for main to restore."""
    saved = (list(logger.handlers), logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (the console script exits with it). The logger
    is handed back as it was: called in-process (the tests do), the publisher must not
    leave its handler, on a stream that may be gone, on the box's logger."""
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    handlers, level, propagate = _setup_logging(verbose)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_UNEXPECTED
    except Exception as exc:  # the one place where errors become exit codes
        code, text = _classify(exc, verbose)
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return code
    finally:
        for handler in logger.handlers:
            handler.flush()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _classify(exc: Exception, verbose: bool) -> tuple[int, str]:
    if isinstance(exc, stage.UnhealthyRolloutError):
        return EXIT_UNHEALTHY, str(exc)
    if isinstance(exc, ConfigError):  # PublishError included
        return EXIT_USAGE, str(exc)
    if isinstance(exc, RepositoryError):
        return EXIT_VERIFY, f"verification failed: {exc}"
    if isinstance(exc, OSError):
        return EXIT_UNEXPECTED, str(exc)
    text = f"unexpected {type(exc).__name__}: {exc}"
    return EXIT_UNEXPECTED, text if verbose else text + " (run with -v for the traceback)"

if __name__ == "__main__":
    sys.exit(main())
