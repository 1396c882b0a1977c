"""``opq-box-updater``: argument parsing, logging setup and the one exception-to-exit-code map.

Every error ends as one line on stderr saying what failed and what to do; tracebacks only
with ``-v``. Exit codes are a contract (DESIGN 3.6).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import json
import logging
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, load_config, stored_box_id, with_box_id
from .errors import (
    ApplyError,
    ConfigError,
    DownloadError,
    LockError,
    RepositoryError,
    StateError,
    UpdaterError,
)
from .fsutil import unsafe_dir_reason

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3
EXIT_NETWORK = 4
EXIT_APPLY_FAILED = 5
EXIT_LOCKED = 6
EXIT_UPDATE_AVAILABLE = 100

#: The one place that maps errors to exit codes; the first matching class wins.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_CONFIG),
    (LockError, EXIT_LOCKED),
    (RepositoryError, EXIT_REFUSED),
    (DownloadError, EXIT_NETWORK),
    (ApplyError, EXIT_APPLY_FAILED),
    (UpdaterError, EXIT_UNEXPECTED),
)

logger = logging.getLogger("opq_box_updater")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
#: The log file's owner group and mode, the same from the postinst through the updater to
#: logrotate's ``create 0640 root adm`` (Debian's convention for logs).
LOG_GROUP = "adm"
LOG_MODE = 0o640
#: ``extra`` for a record whose stderr line says ``error:``; the log file has the level name.
ERROR_LINE = {"stderr_prefix": "error: "}


def exit_code_for(exc: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_UNEXPECTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opq-box-updater",
        description="Securely update this OPQ Box from the operators' signed repository.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="debug output and tracebacks on stderr")
    noise.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="check for an update and apply it")
    run.add_argument("--random-delay", type=float, default=0, metavar="SECONDS",
                     help="first wait a random time up to SECONDS (spreads a fleet's cron runs)")
    run.add_argument("--force", action="store_true",
                     help="retry a release that failed before")
    run.add_argument("--dry-run", action="store_true",
                     help="say what would be downloaded and applied; change nothing")
    check = sub.add_parser("check", help="verify only; exit 100 when an update is available")
    for command in (run, check):
        command.add_argument("--from", type=Path, dest="from_dir", metavar="DIR",
                             help="read the repository from DIR (a USB stick written by "
                                  "'opq-box-publish export') instead of server_url; no "
                                  "network")
    status = sub.add_parser("status", help="show the installed version and the last run")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


class _StderrFilter(logging.Filter):
    """Unknown-config-key warnings go to the log file only, unless -v (DESIGN 3.5)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or not getattr(record, "log_file_only", False)


class _StderrFormatter(logging.Formatter):
    """The message, after a ``stderr_prefix`` the record may carry (``error: ``): stderr says
    ``error: X`` where the log file says ``ERROR X``, never ``ERROR error: X``."""

    def format(self, record: logging.LogRecord) -> str:
        return str(getattr(record, "stderr_prefix", "")) + super().format(record)


class _LogFileFormatter(logging.Formatter):
    """Every line of a record gets the time and level, multi-line messages (the dry-run plan)
    included: a log line without a timestamp then always means a crash or an error before
    the log was opened (cron appends stderr to the same file)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if "\n" not in text:
            return text
        first, *rest = text.split("\n")
        prefix = first[: len(first) - len(record.getMessage().split("\n")[0])]
        return "\n".join([first, *(prefix + "  " + line for line in rest)])


def setup_logging(verbose: bool, quiet: bool) -> None:
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)
    handler.setFormatter(_StderrFormatter("%(message)s"))
    handler.addFilter(_StderrFilter(verbose))
    logger.addHandler(handler)


class _LogFileHandler(logging.FileHandler):
    """The log file; when a write fails (disk full, I/O error) it says so once on stderr and
    drops out, instead of logging's own traceback for every later line."""

    def _open(self) -> Any:
        return os.fdopen(open_log_file(Path(self.baseFilename)), "a", encoding="utf-8")

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a bad log call, not a bad file: logging's way
            super().handleError(record)
            return
        logger.removeHandler(self)
        logger.warning("cannot write the log file %s (%s); logging to stderr only",
                       self.baseFilename, error.strerror or error)
        with contextlib.suppress(OSError):
            self.close()


def open_log_file(path: Path) -> int:
    """Open the log for appending without following a symlink and only when it is a regular
    file (a planted link must not make root append to another file), with the owner and mode
    the postinst and logrotate give it: root:adm 0640 when run as root."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                 | os.O_NONBLOCK, LOG_MODE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != LOG_MODE:
            os.fchmod(fd, LOG_MODE)
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                gid = grp.getgrnam(LOG_GROUP).gr_gid
                if (st.st_uid, st.st_gid) != (0, gid):
                    os.fchown(fd, 0, gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_log_dir(path: Path) -> None:
    """Refuse (exit 2) a log directory another local user owns or may write to: they could
    swap the log for a link or a fifo between runs."""
    why = unsafe_dir_reason(path.parent)
    if why and os.geteuid() != 0 and _closed_root_dir(path.parent):
        why = None  # a user looking at root's box: safe, and the open says "needs root"
    if why:
        raise ConfigError(f"log directory {path.parent} {why}: make it root's and not "
                          f"writable by others (chown root:root {path.parent}; "
                          f"chmod 0755 {path.parent})")


def _closed_root_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == 0
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def add_log_file(path: Path) -> None:
    """Log to the config's log file; an unwritable log is a warning, never a failed run."""
    check_log_dir(path)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        handler = _LogFileHandler(path, encoding="utf-8")
    except PermissionError:
        if os.geteuid() != 0:
            raise  # a user, not a broken disk: main() says that this needs root
        logger.warning("cannot write the log file %s (permission denied); logging to stderr "
                       "only", path)
        return
    except OSError as exc:
        logger.warning("cannot write the log file %s (%s); logging to stderr only", path,
                       exc.strerror or exc)
        return
    handler.setLevel(logging.INFO)
    handler.setFormatter(_LogFileFormatter(LOG_FORMAT))
    logger.addHandler(handler)
    if _same_file(sys.stderr, path):
        # cron appends stderr to this very file (for errors before it is opened, such as
        # a broken config): from here on the file handler alone writes it, once.
        for other in list(logger.handlers):
            if isinstance(other, logging.StreamHandler) and other is not handler and \
                    getattr(other, "stream", None) is sys.stderr:
                logger.removeHandler(other)


def _same_file(stream: object, path: Path) -> bool:
    try:
        a = os.fstat(stream.fileno())  # type: ignore[attr-defined]
        b = os.stat(path)
    except (OSError, AttributeError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _installed(info: dict[str, Any], channel: str) -> str:
    """The installed release, naming its channel when it is not the configured one."""
    other = info["installed_channel"]
    if other and other != channel and info["installed_version"]:
        return f"{info['installed_version']} (of channel {other})"
    return str(info["installed_version"])


def _strings(value: Any) -> list[str]:
    """``value`` when it is a list of strings (bookkeeping may be damaged), else []."""
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else []


def _status(config: Config, as_json: bool) -> int:
    from .state import Store

    store = Store(config.state_dir)
    try:
        # Without the lock: only read, never move a corrupt file aside under a running run.
        state = store.load(repair=False) if store.state_path.exists() else None
    except StateError as exc:
        logger.warning("%s", exc)
        state = None
    last = store.load_last_run()
    roots = store.stored_roots()
    info: dict[str, Any] = {
        "installed_version": state.installed_version if state else 0,
        "root_version": max(roots) if roots else None,
        "last_run": last.get("last_run"),
        "last_result": last.get("last_result"),
        "last_message": last.get("last_message"),
        "leftovers_killed": _strings(last.get("leftovers_killed")),
        "failed_versions":
            list(state.channel(config.version_file).failed_versions) if state else [],
        "installed_channel": state.installed_channel if state else None,
        "applied_packages": dict(state.applied_packages) if state else {},
        "unrestored_packages": list(state.unrestored) if state else [],
        "phase": state.journal.phase if state else "idle",
        "box_id": config.box_id or stored_box_id(config.state_dir),
        "server_url": config.server_url,
        "version_file": config.version_file,
    }
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [
        ("installed version", _installed(info, config.version_file)),
        ("root version", info["root_version"] or "none yet"),
        ("last run", info["last_run"] or "never"),
        ("last result", info["last_result"] or "-"),
        ("last message", info["last_message"] or "-"),
        ("failed versions", ", ".join(map(str, info["failed_versions"])) or "none"),
        ("applied packages", ", ".join(f"{k}={v}" for k, v in
                                       sorted(info["applied_packages"].items())) or "none"),
        ("server", f"{config.server_url} ({config.version_file})"),
        ("box id", info["box_id"] or "none yet (generated on the first run)"),
    ]
    if info["leftovers_killed"]:
        rows.append(("leftovers killed", "of a run that was killed, before recovering: "
                     + ", ".join(info["leftovers_killed"])))
    if info["unrestored_packages"]:
        rows.append(("NOT RESTORED", "rollback incomplete: "
                     + ", ".join(info["unrestored_packages"])))
    if info["phase"] != "idle":
        rows.append(("interrupted", f"{info['phase']} (recovered on the next run)"))
    for label, value in rows:
        print(f"{label + ':':<18} {value}")
    return EXIT_OK


def _run(config: Config, args: argparse.Namespace) -> int:
    from .updater import Updater

    updater = Updater(with_box_id(config), from_dir=args.from_dir)
    if args.command == "check":
        outcome = updater.run(check_only=True)
        logger.info("check: %s", outcome.message, extra={"log_file_only": True})
        print(outcome.message)
        return EXIT_UPDATE_AVAILABLE if outcome.update_available else EXIT_OK
    outcome = updater.run(force=args.force, dry_run=args.dry_run,
                          random_delay=args.random_delay)
    if outcome.result == "dry-run":  # what was asked for: on stdout, even with -q
        logger.info("dry run: %s", outcome.message, extra={"log_file_only": True})
        print(outcome.message)
    else:
        logger.info("%s", outcome.message)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        config = load_config(args.config)
        if args.command == "status":
            code = _status(config, args.json)
            sys.stdout.flush()  # here, so a closed pipe is seen inside this try
            return code
        add_log_file(config.log_file)
        for key in config.unknown_keys:
            logger.warning("%s: unknown key '%s' ignored", config.path, key,
                           extra={"log_file_only": True})
        logger.debug("opq-box-updater %s: %s", __version__, args.command)
        code = _run(config, args)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except BrokenPipeError:  # `status | head`: the reader left; nothing is wrong here
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        code = exit_code_for(exc)
        needs_root = _needs_root(exc)
        if needs_root:
            logger.error("%s: permission denied: 'opq-box-updater %s' needs root (sudo "
                         "opq-box-updater %s)", needs_root, args.command, args.command,
                         extra=ERROR_LINE, exc_info=args.verbose)
            return EXIT_CONFIG
        if isinstance(exc, UpdaterError):
            logger.error("%s", exc, extra=ERROR_LINE, exc_info=args.verbose)
        else:
            hint = "" if args.verbose else " (run again with -v for a traceback)"
            logger.error("unexpected error: %s: %s%s", type(exc).__name__, exc, hint,
                         exc_info=args.verbose)
        return code


def _needs_root(exc: BaseException) -> str | None:
    """The file a non-root user was denied (a usage error: the box's files are root's), or
    ``None``. Root being denied is something else and stays unexpected."""
    if os.geteuid() == 0:
        return None
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:  # also when wrapped in StateError
        seen.add(id(error))
        if isinstance(error, PermissionError):
            return str(error.filename or "a file of the box")
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
