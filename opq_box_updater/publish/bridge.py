"""A release for boxes still on the original updater (issue 8, part 2): the bridge.

The original updater (``box_updater.py`` of the seed) fetches ``server_url + version_file``,
a JSON object naming a ``public_key``, a ``package`` and a ``signature`` on the same
server; it takes the release when its ``version`` (a number, possibly a float) is higher
than the one in its ``local_version.json``, checks the package with
``openssl dgst -sha256 -verify KEY -signature SIG.bin PACKAGE`` after ``openssl base64 -d``,
opens it with Python's ``tarfile`` into its download directory and runs ``update.sh``
there, as root. :func:`write_bridge` writes exactly that, signed with the operators'
legacy key, and the package's ``update.sh`` (``bridge-update.sh`` next to this module)
installs ``opq-box-updater`` and retires the original updater.

Signatures are made with ``cryptography`` the way ``openssl dgst -sha256 -sign`` makes
them: RSA PKCS#1 v1.5 or ECDSA (DER), over SHA-256. The files of a bridge release have
names of their own (``opq-bridge-<version>.*``); the version file is replaced last and
atomically, so a box never reads a version file whose files are missing.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shlex
import tarfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..errors import RepositoryError
from ..fsutil import atomic_write
from ..metadata import check_root_fresh, verify_trust_anchor
from ..package import read_deb
from .common import PublishError, normalize_now, repo_lock

UPDATER_PACKAGE = "opq-box-updater"
DEFAULT_VERSION_FILE = "version.json"
#: File names that are safe unquoted in a shell script, a URL and a tar member name.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,200}")
_KEYRING_DIRS = ("/etc/apt/keyrings/", "/usr/share/keyrings/")
LegacyKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class BridgeRelease(NamedTuple):
    """What :func:`write_bridge` wrote into the legacy repository."""

    version: int
    version_file: Path
    package: Path
    public_key: Path
    signature: Path
    debs: tuple[str, ...]


class AptSource(NamedTuple):
    """The operators' apt repository (part 1): a deb822 ``.sources`` file and its keyring."""

    sources: Path
    keyring: Path


# --- the legacy signature --------------------------------------------------------------------


def load_legacy_key(path: Path, passphrase: bytes | None = None) -> LegacyKey:
    """The operators' legacy signing key: an RSA or EC private key in PEM, as
    ``openssl dgst -sha256 -sign`` takes it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PublishError(f"{path}: cannot read the legacy key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        raise PublishError(f"{path}: the legacy key is encrypted: give its passphrase with "
                           "--legacy-key-passphrase-file") from None
    except ValueError as exc:
        raise PublishError(f"{path}: not a PEM private key openssl could sign with ({exc})"
                           ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PublishError(f"{path}: a {type(key).__name__.removeprefix('_')} key; the original "
                           "updater verifies with openssl dgst -sha256, which needs RSA or EC")
    return key


def legacy_sign(key: LegacyKey, data: bytes) -> bytes:
    """The raw signature ``openssl dgst -sha256 -sign KEY`` writes for ``data``."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def legacy_verify(public_pem: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is what :func:`legacy_sign` made for ``data`` (a self-check)."""
    public = serialization.load_pem_public_key(public_pem)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def openssl_base64(data: bytes) -> bytes:
    """Base64 as ``openssl base64`` writes it: lines of 64 characters, each ending in a
    newline (``openssl base64 -d`` fails on longer lines)."""
    text = base64.b64encode(data)
    return b"".join(text[i:i + 64] + b"\n" for i in range(0, len(text), 64))


# --- the version ----------------------------------------------------------------------------


def current_version(version_file: Path) -> int | float | None:
    """The ``version`` of the legacy version file, or None when there is none yet."""
    try:
        raw = version_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PublishError(f"{version_file}: cannot read it ({exc.strerror})") from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise PublishError(f"{version_file}: not JSON ({exc}); fix or remove it") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if (isinstance(version, bool) or not isinstance(version, int | float)
            or not math.isfinite(version)):
        raise PublishError(f"{version_file}: its version {version!r} is not a number")
    return version


def next_version(current: int | float | None, wanted: int | None = None) -> int:
    """The bridge's version: higher than ``current`` (1.3 -> 2), or ``wanted`` if it is."""
    if wanted is not None:
        if current is not None and not wanted > current:
            raise PublishError(f"--legacy-version {wanted} is not higher than the current "
                               f"legacy version {current}")
        return wanted
    return 1 if current is None else math.floor(current) + 1


# --- the package ----------------------------------------------------------------------------


def _plain(name: str, what: str) -> str:
    if not _PLAIN_NAME.fullmatch(name):
        raise PublishError(f"{what} {name!r}: use a plain file name (letters, digits, ._+~-)")
    return name


def collect_debs(debs: Sequence[Path], with_debs: Path | None) -> dict[str, tuple[Path, str]]:
    """The debs the bridge carries by file name, with their package names, checked like a
    box checks them; exactly one is opq-box-updater (listed first), the rest its module
    and dependencies."""
    files = list(debs)
    if with_debs is not None:
        if not with_debs.is_dir():
            raise PublishError(f"--with-debs {with_debs}: not a directory")
        files += sorted(p for p in with_debs.iterdir() if p.name.endswith(".deb"))
    found: dict[str, tuple[Path, str]] = {}
    updaters = []
    for path in files:
        if not path.is_file():
            raise PublishError(f"{path}: no such .deb file")
        name = _plain(path.name, "deb file name")
        if name in found:
            if found[name][0].resolve() == path.resolve():
                continue
            raise PublishError(f"two different debs are named {name}")
        package = read_deb(path, name).package
        if package == UPDATER_PACKAGE:
            updaters.append(name)
        found[name] = (path, package)
    if len(updaters) != 1:
        raise PublishError(f"the bridge needs exactly one {UPDATER_PACKAGE} .deb, got "
                           f"{len(updaters)} ({', '.join(updaters) or 'none'})")
    return {updaters[0]: found.pop(updaters[0]), **found}


def check_url(url: str, option: str = "--server-url") -> str:
    """A rough check (the box's postinst and config apply the full rule): http(s), one
    line, nothing a shell or debconf line would take apart."""
    if not re.fullmatch(r"https?://[^\s'\"\\]+", url):
        raise PublishError(f"{option} {url!r}: an http:// or https:// URL without blanks")
    return url


def keyring_path(sources: Path) -> str:
    """Where the ``.sources`` entry's ``Signed-By`` expects its keyring on the box."""
    try:
        text = sources.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PublishError(f"{sources}: cannot read it ({exc})") from None
    found = re.findall(r"^Signed-By:[ \t]*(\S+)[ \t]*$", text, re.MULTILINE | re.IGNORECASE)
    directory, _, name = found[0].rpartition("/") if len(set(found)) == 1 else ("", "", "")
    if directory + "/" not in _KEYRING_DIRS or not _PLAIN_NAME.fullmatch(name):
        raise PublishError(f"{sources}: needs one 'Signed-By: PATH' naming a keyring file in "
                           f"{' or '.join(_KEYRING_DIRS)}")
    return str(found[0])


def bridge_conf(version: int, server_url: str, debs: dict[str, tuple[Path, str]],
                apt: AptSource | None, report_url: str = "") -> bytes:
    """``bridge.conf``, the values ``update.sh`` reads (shell assignments, quoted)."""
    values = {
        "BRIDGE_VERSION": str(version),
        "SERVER_URL": server_url,
        "REPORT_URL": report_url,
        "DEBS": " ".join(debs),
        "PACKAGES": " ".join(package for _, package in debs.values()),
        "UPDATER_DEB": next(iter(debs)),
        "APT_SOURCE": apt.sources.name if apt else "",
        "APT_KEYRING": apt.keyring.name if apt else "",
        "APT_KEYRING_PATH": keyring_path(apt.sources) if apt else "",
    }
    lines = ["# Written by opq-box-publish bridge; read by update.sh."]
    lines += [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    return ("\n".join(lines) + "\n").encode("utf-8")


def update_script() -> bytes:
    """The bridge's ``update.sh``: the template with its ``#!/bin/sh`` line (the original
    updater runs it directly)."""
    template = resources.files(__package__).joinpath("bridge-update.sh").read_bytes()
    return b"#!/bin/sh\n" + template


def build_tar(version: int, *, server_url: str, debs: dict[str, tuple[Path, str]],
              trust_root: bytes,
              apt: AptSource | None, mtime: int, report_url: str = "") -> bytes:
    """The bridge package: a gzip tar the original updater unpacks into its download
    directory. Members are owned by root (tarfile as root applies the stored owner)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes | None, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime, info.uid, info.gid = mode, mtime, 0, 0
            info.uname = info.gname = "root"
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        add("update.sh", update_script(), 0o755)
        add("bridge.conf", bridge_conf(version, server_url, debs, apt, report_url), 0o644)
        add("trust-root.json", trust_root, 0o644)
        add("debs", None, 0o755)
        for name, (path, _) in debs.items():
            add(f"debs/{name}", path.read_bytes(), 0o644)
        if apt is not None:
            add("apt", None, 0o755)
            add(f"apt/{apt.sources.name}", apt.sources.read_bytes(), 0o644)
            add(f"apt/{apt.keyring.name}", apt.keyring.read_bytes(), 0o644)
    return buffer.getvalue()


# --- the whole release ----------------------------------------------------------------------


def write_bridge(legacy_dir: Path, *, legacy_key: Path, debs: Sequence[Path], server_url: str,
                 trust_root: Path, with_debs: Path | None = None,
                 version_file: str = DEFAULT_VERSION_FILE, version: int | None = None,
                 apt: AptSource | None = None, report_url: str = "",
                 passphrase: bytes | None = None) -> BridgeRelease:
    """Check every input, then write the bridge release into ``legacy_dir``: package,
    public key and signature first, the version file last (atomically). ``report_url``
    becomes the migrated boxes' ``report_url`` (so they appear in ``fleet``)."""
    _plain(version_file, "--version-file")
    check_url(server_url)
    if report_url:
        check_url(report_url, "--report-url")
    key = load_legacy_key(legacy_key, passphrase)
    try:
        anchor = trust_root.read_bytes()
    except OSError as exc:
        raise PublishError(f"--trust-root {trust_root}: cannot read it ({exc.strerror})"
                           ) from None
    root = verify_trust_anchor(anchor)
    try:
        check_root_fresh(root, normalize_now(None))
    except RepositoryError as exc:
        raise PublishError(f"--trust-root {trust_root}: {exc}") from None
    carried = collect_debs(debs, with_debs)
    if apt is not None:
        _plain(apt.sources.name, "--apt-source")
        _plain(apt.keyring.name, "--apt-keyring")
        if not apt.sources.name.endswith(".sources"):
            raise PublishError(f"--apt-source {apt.sources}: a deb822 file ending in .sources")
        keyring_path(apt.sources)
    if not legacy_dir.is_dir():
        raise PublishError(f"{legacy_dir}: not a directory (the legacy repository that the "
                           "original updater's server_url serves)")
    with repo_lock(legacy_dir):
        target = legacy_dir / version_file
        new = next_version(current_version(target), version)
        package = build_tar(new, server_url=server_url, debs=carried, trust_root=anchor,
                            apt=apt, mtime=int(time.time()), report_url=report_url)
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        signature = legacy_sign(key, package)
        if not legacy_verify(public_pem, package, signature):  # pragma: no cover
            raise PublishError("the legacy signature does not verify; nothing was published")
        stem = f"opq-bridge-{new}"
        names = {"package": f"{stem}.tar.gz", "public_key": f"{stem}.pem",
                 "signature": f"{stem}.sig"}
        atomic_write(legacy_dir / names["package"], package)
        atomic_write(legacy_dir / names["public_key"], public_pem)
        atomic_write(legacy_dir / names["signature"], openssl_base64(signature))
        doc: dict[str, Any] = {"version": new, **names}
        atomic_write(target, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    return BridgeRelease(version=new, version_file=target,
                         package=legacy_dir / names["package"],
                         public_key=legacy_dir / names["public_key"],
                         signature=legacy_dir / names["signature"], debs=tuple(carried))

