"""The box configuration, ``/etc/opq/updater_config.json``, as a frozen dataclass.

Key names are a contract (DESIGN 3.5). Every error names the key and the file, so the one
line the CLI prints is enough for an operator to fix it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from .errors import ConfigError
from .fsutil import atomic_write, unsafe_dir_reason
from .metadata import CHANNEL_PATTERN

DEFAULT_CONFIG_PATH = Path("/etc/opq/updater_config.json")

GIB = 1024**3


class Timeouts(NamedTuple):
    """Limits in seconds; ``total`` bounds all network activity of one run. ``dpkg_lock``
    (an extension of DESIGN 3.5) bounds the wait for a dpkg lock held by apt."""

    connect: float = 10
    read: float = 30
    total: float = 3600
    dpkg_lock: float = 120


class Config(NamedTuple):
    """A validated configuration; paths are absolute."""

    server_url: str
    path: Path = DEFAULT_CONFIG_PATH
    version_file: str = "version.json"
    download_dir_path: Path = Path("/var/cache/opq-box-updater/")
    trust_root: Path = Path("/usr/share/opq-box-updater/root.json")
    state_dir: Path = Path("/var/lib/opq-box-updater/")
    log_file: Path = Path("/var/log/opq/box_updater.log")
    hooks_dir: Path = Path("/etc/opq/updater/hooks/")
    dpkg_root: Path = Path("/")
    box_id: str = ""
    installer: str = "dpkg"
    timeouts: Timeouts = Timeouts()
    max_package_bytes: int = 1 * GIB
    max_unpacked_bytes: int = 2 * GIB
    ca_bundle: Path | None = None
    report_url: str | None = None
    unknown_keys: tuple[str, ...] = ()

    def url(self, relpath: str) -> str:
        """Join ``server_url`` and a repository-relative path with exactly one slash."""
        return join_url(self.server_url, relpath)


def join_url(base: str, relpath: str) -> str:
    """Join a base URL and a relative path with exactly one ``/`` between them."""
    return base.rstrip("/") + "/" + relpath.lstrip("/")


_PATH_KEYS = ("download_dir_path", "trust_root", "state_dir", "log_file", "hooks_dir",
              "dpkg_root")
_KNOWN_KEYS = frozenset(
    {"server_url", "version_file", "box_id", "installer", "timeouts", "max_package_bytes",
     "max_unpacked_bytes", "ca_bundle", "report_url", *_PATH_KEYS}
)


MACHINE_ID = Path("/etc/machine-id")
#: A box id the updater generated and keeps in ``<state_dir>/box_id`` (32 hex digits).
BOX_ID_FILE = "box_id"
_BOX_ID = re.compile(r"[0-9a-f]{32}")


def _machine_id() -> str:
    """``/etc/machine-id`` when it holds a real id; systemd writes ``uninitialized`` (or
    nothing) into images that have not booted yet, and such a value is no identity."""
    try:
        value = MACHINE_ID.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return value if _BOX_ID.fullmatch(value) and value != "0" * 32 else ""


def with_box_id(config: Config) -> Config:
    """``config`` with a box id: the configured one or the machine id, else one generated once
    and kept in ``<state_dir>/box_id`` so that the box keeps its rollout bucket and its fleet
    row. A box without any of them used to report ``unknown``: all such boxes shared one
    bucket and one row."""
    if config.box_id:
        return config
    state_dir = config.state_dir
    stored = stored_box_id(state_dir)
    if stored:
        return config._replace(box_id=stored)
    why = unsafe_dir_reason(state_dir)
    if why:
        raise ConfigError(f"state directory {state_dir} {why}: make it root's and not "
                          f"writable by others (chown root: {state_dir}; chmod 0700 {state_dir})")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    box_id = secrets.token_hex(16)
    atomic_write(state_dir / BOX_ID_FILE, (box_id + "\n").encode("ascii"), mode=0o644)
    return config._replace(box_id=box_id)


def stored_box_id(state_dir: Path) -> str:
    """The id :func:`with_box_id` generated earlier, or ``""`` (none yet, or unreadable)."""
    try:
        value = (state_dir / BOX_ID_FILE).read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""
    return value if _BOX_ID.fullmatch(value) else ""


def _fail(path: Path, key: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: key '{key}' {why}")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def url_problem(value: str) -> str | None:
    """What is wrong with a server URL, or ``None`` when it is usable.

    The one rule for ``server_url`` and ``report_url``, shared by this module, the debconf
    config script and the postinst (``python3 -m opq_box_updater.config --check-url URL``):
    http or https, a host (a name, an IPv4 or a bracketed IPv6 address), an optional port
    1-65535, an optional path; no query, fragment, user name or password, whitespace or
    control character. Anything else would be accepted once and then fail every day.
    """
    if not value:
        return "is empty"
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "contains whitespace or a control character"
    if not value.isascii():
        return "contains a non-ASCII character (write an internationalised name as xn--...)"
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        return f"cannot be parsed ({exc})"
    try:
        port = parts.port
    except ValueError:
        return "has an invalid port (a number 1-65535)"
    if parts.scheme not in ("http", "https") or not value.lower().startswith(
            parts.scheme + "://"):
        return "must start with http:// or https://"
    if "@" in parts.netloc:
        return "must not contain a user name or password"
    if not parts.hostname:
        return "names no host (write it as http://HOST/PATH)"
    if "?" in value:
        return "must not have a query (?...)"
    if "#" in value:
        return "must not have a fragment (#...)"
    if port is not None and not 1 <= port <= 65535:
        return "has an invalid port (a number 1-65535)"
    if parts.netloc.rsplit("]", 1)[-1].endswith(":"):
        return "has an empty port after ':'"
    host = parts.hostname
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"has an invalid IPv6 address [{host}]"
    elif not all(_HOST_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
        return f"has an invalid host name {host!r}"
    return None


def _http_url(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, "must be a non-empty string (an http:// or https:// URL)")
    why = url_problem(value)
    if why:
        raise _fail(path, key, f"{why}: {value!r}")
    return value


def _positive_int(path: Path, key: str, value: Any) -> int:
    if type(value) is not int or value <= 0:
        raise _fail(path, key, f"must be a positive integer, not {value!r}")
    return value


def _timeouts(path: Path, value: Any) -> Timeouts:
    if not isinstance(value, dict):
        raise _fail(path, "timeouts", 'must be an object like {"connect": 10, "read": 30}')
    known = {"connect", "read", "total", "dpkg_lock"}
    for name in value:
        if name not in known:
            raise _fail(path, f"timeouts.{name}", "is not one of connect, read, total, "
                        "dpkg_lock")
    out: dict[str, float] = {}
    for name, number in value.items():
        if type(number) not in (int, float) or not number > 0:
            raise _fail(path, f"timeouts.{name}", f"must be a positive number, not {number!r}")
        out[name] = float(number)
    return Timeouts(**out)


def parse_config(data: bytes, path: Path = DEFAULT_CONFIG_PATH) -> Config:
    """Validate the raw bytes of a config file; raise :class:`ConfigError` naming the key."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    if "server_url" not in raw:
        raise _fail(path, "server_url", "is required (the repository's base URL)")
    kwargs: dict[str, Any] = {"path": path,
                              "server_url": _http_url(path, "server_url", raw["server_url"])}
    for key in _PATH_KEYS:
        if key in raw:
            value = raw[key]
            if not isinstance(value, str) or not value.startswith("/"):
                raise _fail(path, key, f"must be an absolute path, not {value!r}")
            kwargs[key] = Path(value)
    if "version_file" in raw:
        value = raw["version_file"]
        if not isinstance(value, str) or not CHANNEL_PATTERN.fullmatch(value):
            raise _fail(path, "version_file", "must be version.json or version-NAME.json with "
                        f"NAME of letters, digits and '_' (a channel), not {value!r}")
        kwargs["version_file"] = value
    if "box_id" in raw:
        if not isinstance(raw["box_id"], str) or not raw["box_id"].strip():
            raise _fail(path, "box_id", "must be a non-empty string")
        kwargs["box_id"] = raw["box_id"].strip()
    else:
        kwargs["box_id"] = _machine_id()
    if "installer" in raw:
        if raw["installer"] not in ("dpkg", "apt"):
            raise _fail(path, "installer", f'must be "dpkg" or "apt", not {raw["installer"]!r}')
        kwargs["installer"] = raw["installer"]
    if "timeouts" in raw:
        kwargs["timeouts"] = _timeouts(path, raw["timeouts"])
    for key in ("max_package_bytes", "max_unpacked_bytes"):
        if key in raw:
            kwargs[key] = _positive_int(path, key, raw[key])
    if raw.get("ca_bundle") is not None:
        value = raw["ca_bundle"]
        if not isinstance(value, str) or not value.startswith("/"):
            raise _fail(path, "ca_bundle", f"must be an absolute path or null, not {value!r}")
        kwargs["ca_bundle"] = Path(value)
    if raw.get("report_url") is not None:
        kwargs["report_url"] = _http_url(path, "report_url", raw["report_url"])
    kwargs["unknown_keys"] = tuple(sorted(k for k in raw if k not in _KNOWN_KEYS))
    return Config(**kwargs)


def load_config(path: Path = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate the config file; the caller warns about ``unknown_keys``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (create it, or run 'dpkg-reconfigure opq-box-updater')"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_config(data, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -I -m opq_box_updater.config --check-url URL``: the maintainer scripts'
    way to apply :func:`url_problem` (exit 0, or 2 with the reason on stdout)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--check-url":
        print("usage: python3 -m opq_box_updater.config --check-url URL", file=sys.stderr)
        return 2
    why = url_problem(args[1])
    if why:
        print(f"the URL {why}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
