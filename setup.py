"""Packaging metadata; the Debian package (debian/) builds from this with pybuild."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(
    r'__version__ = "([^"]+)"', Path("opq_box_updater/__init__.py").read_text()
).group(1)  # type: ignore[union-attr]

setup(
    name="opq-box-updater",
    version=VERSION,
    description="Secure remote updater for OPQ Box power-quality monitors",
    license="MIT",
    packages=find_packages(include=["opq_box_updater", "opq_box_updater.*"]),
    # The bridge's update.sh (opq-box-publish bridge) is read from the installed package.
    package_data={"opq_box_updater.publish": ["bridge-update.sh"]},
    python_requires=">=3.11",
    install_requires=["requests", "cryptography", "python-debian"],
    entry_points={
        "console_scripts": [
            "opq-box-updater = opq_box_updater.cli:main",
            "opq-box-publish = opq_box_updater.publish.cli:main",
        ]
    },
)
