"""The SD-card recipe of docs/operations.md ("SD-card images") leaves nothing in the image
that makes every box cloned from it the same box.

The image's root has been through the package's postinst (which makes the box's report
key, ``python3 -m opq_box_updater.reporting --make-key``); the recipe's own shell hooks,
taken from the docs as written, then run on that root as mmdebstrap runs them (``$1`` is
the root). No machine id, generated box id, report key or report counter may be left: a
clone would report under another box's key (the collector refuses it as a replay, or
takes its reports for the other box's). The debs for the first self-update's rollback
must be kept. The hooks that need apt and a chroot are left to the real trial.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from opq_box_updater import reporting
from opq_box_updater.config import BOX_ID_FILE

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
STATE = "var/lib/opq-box-updater"


def recipe_hooks() -> list[str]:
    """The ``--customize-hook``s of the section's mmdebstrap command, in order."""
    section = DOC.read_text(encoding="utf-8").split("### SD-card images", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    hooks = re.findall(r"--customize-hook='([^']*)'", block)
    assert len(hooks) >= 5, block
    return hooks


def test_the_image_keeps_no_identity_and_the_rollback_debs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = root / STATE
    state.mkdir(parents=True, mode=0o700)
    (root / "etc").mkdir()
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    assert reporting.main(["--make-key", str(state)]) == 0  # what the postinst does
    (state / reporting.COUNTER_NAME).write_text("3\n")
    (state / BOX_ID_FILE).write_text("fedcba9876543210fedcba9876543210\n")
    archives = root / "var/cache/apt/archives"
    archives.mkdir(parents=True)
    debs = ["opq-box-updater_1.1.0_all.deb", "python3-opq-box-updater_1.1.0_all.deb"]
    for deb in debs:
        (archives / deb).write_bytes(deb.encode())

    shell_hooks = [h for h in recipe_hooks() if not h.startswith(("copy-in ", "chroot "))]
    for hook in shell_hooks:
        subprocess.run(["sh", "-ec", hook, "sh", str(root)], check=True)

    assert (root / "etc/machine-id").read_bytes() == b""
    left = sorted(p.name for p in state.iterdir() if p.is_file())
    assert left == [], f"a cloned box would share {left}"
    assert sorted(p.name for p in (state / "debs").iterdir()) == debs
