#!/usr/bin/python3
"""A stand-in for the original OPQ box updater (the seed's ``box_updater.py``), written from
the facts of issue 8 for tests/test_bridge_install.py, which installs it as
``/usr/local/bin/box_updater.py`` in a clean Debian root and runs it from root's crontab.

Each run: fetch ``server_url + version_file`` into ``download_dir_path``; update when
``local_version.json`` is missing or has a smaller ``version``; download the public key,
package and signature named in it; ``openssl base64 -d`` the signature and check it with
``openssl dgst -sha256 -verify``, looking for ``Verified OK``; rename the version file to
``local_version.json``; open the package with ``tarfile`` (any compression) into the
download directory; run ``update.sh`` there directly. Like the seed, it prints what went
wrong and exits 0 on every failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import urllib.request

CONFIG = "/etc/opq/updater_config.json"


def fetch(url: str, dest: str) -> None:
    with urllib.request.urlopen(url, timeout=30) as answer, open(dest, "wb") as out:
        out.write(answer.read())


def main() -> int:
    with open(CONFIG, encoding="utf-8") as handle:
        config = json.load(handle)
    directory = config["download_dir_path"]
    server = config["server_url"]
    version_file = config["version_file"]
    os.makedirs(directory, exist_ok=True)
    remote_path = os.path.join(directory, version_file)
    fetch(server + version_file, remote_path)
    with open(remote_path, encoding="utf-8") as handle:
        remote = json.load(handle)
    local_path = os.path.join(directory, "local_version.json")
    if os.path.exists(local_path):
        with open(local_path, encoding="utf-8") as handle:
            if json.load(handle)["version"] >= remote["version"]:
                print("Box is up to date")
                return 0
    files = {}
    for key in ("public_key", "package", "signature"):
        files[key] = os.path.join(directory, remote[key])
        fetch(server + remote[key], files[key])
    signature = files["signature"] + ".bin"
    subprocess.run(["openssl", "base64", "-d", "-in", files["signature"], "-out", signature],
                   check=False)
    verdict = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", files["public_key"], "-signature", signature,
         files["package"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        check=False).stdout
    if "Verified OK" not in verdict:
        print("Update package verification failed: " + verdict.strip())
        return 0
    os.rename(remote_path, local_path)
    with tarfile.open(files["package"]) as tar:
        tar.extractall(directory)
    subprocess.run([os.path.join(directory, "update.sh")], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
