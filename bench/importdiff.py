"""What a command imports beyond a baseline command, from ``python -X importtime``.

Used to explain a no-op check that costs more than the floor: the time goes where the
modules are that the floor does not import.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)$")
OWN_PACKAGE = "opq_box_updater"


@dataclass(frozen=True)
class Imported:
    """One module of an importtime report: ``self_us`` microseconds, ``parent`` the module
    whose import caused it (None at top level)."""

    name: str
    self_us: int
    parent: str | None


def parse_importtime(stderr: str) -> dict[str, Imported]:
    """Parse ``-X importtime`` output (children come before their parent, indented)."""
    modules: dict[str, Imported] = {}
    pending: list[tuple[int, str, int]] = []  # (depth, name, self_us) awaiting a parent
    for line in stderr.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        self_us, name = int(match.group(1)), match.group(4)
        depth = (len(match.group(3)) - 1) // 2
        while pending and pending[-1][0] > depth:
            _, child, child_us = pending.pop()
            modules[child] = Imported(child, child_us, name)
        pending.append((depth, name, self_us))
    for _, name, self_us in pending:
        modules[name] = Imported(name, self_us, None)
    return modules


def group_of(name: str, modules: Mapping[str, Imported]) -> str:
    """The module a cost is charged to: this project's modules each on their own, anything
    else to the outermost module it came with below one of ours (``inspect`` and ``ast`` to
    ``dataclasses``, ``gettext`` to ``argparse``)."""
    if name.startswith(OWN_PACKAGE):
        return name
    group = name
    parent = modules[name].parent
    while parent is not None and not parent.startswith(OWN_PACKAGE):
        group = parent
        parent = modules[parent].parent
    return group


def diff(ours: Mapping[str, Imported], floor: Mapping[str, Imported]) -> list[tuple[str, float]]:
    """(group, milliseconds) of the modules in ``ours`` and not in ``floor``, costliest
    first."""
    totals: dict[str, int] = {}
    for name, module in ours.items():
        if name in floor:
            continue
        group = group_of(name, ours)
        totals[group] = totals.get(group, 0) + module.self_us
    return sorted(((g, us / 1000) for g, us in totals.items()), key=lambda item: -item[1])


def importtime(argv: Sequence[str], env: Mapping[str, str]) -> dict[str, Imported]:
    """Run ``argv`` (an interpreter first) with ``-X importtime`` and parse its report."""
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=dict(env),
                          capture_output=True, text=True, timeout=120, check=False)
    return parse_importtime(proc.stderr)


def extra_imports(ours: Sequence[str], floor: Sequence[str], env: Mapping[str, str],
                  runs: int = 5) -> list[tuple[str, float]]:
    """What ``ours`` imports beyond ``floor``, grouped (see :func:`group_of`); the median
    of ``runs`` runs of each, costliest first."""
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        for group, ms in diff(importtime(ours, env), importtime(floor, env)):
            samples.setdefault(group, []).append(ms)
    medians = {g: statistics.median(v + [0.0] * (runs - len(v))) for g, v in samples.items()}
    return sorted(medians.items(), key=lambda item: -item[1])
