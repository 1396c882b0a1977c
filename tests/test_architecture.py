"""The import rules of docs/design-decisions.md ("Architecture"), enforced.

Every module of the box has a level; it may import only modules of lower levels (so there
are no cycles and nothing reaches up), and the verification core (``metadata``, ``trust``)
does no I/O at all. The publisher shares only the helpers both sides need with the box.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opq_box_updater"

#: The box's modules by level: a module imports only from strictly lower levels.
LEVELS: dict[str, int] = {
    "errors": 0, "faults": 0, "fsutil": 0, "deadline": 0, "source": 0, "procs": 0,
    "text": 0,
    "metadata": 1, "runner": 1, "partfile": 1, "sessions": 1,
    "trust": 2, "config": 2, "state": 2, "package": 2, "guard": 2, "reporting": 2,
    "applyplan": 3, "httpcheck": 3, "debcache": 3,
    "rollbackcache": 4,
    "installer": 5, "fetcher": 5, "localsource": 5,
    "transaction": 6,
    "updater": 7,
    "cli": 8,
}
#: What the I/O-free core may import: no os, pathlib, sockets, subprocesses or HTTP.
CORE = {"metadata", "trust"}
CORE_STDLIB = {"__future__", "hashlib", "json", "re", "collections", "datetime", "typing",
               "cryptography"}
#: The box modules the publisher may use: one implementation of the checks, no box state.
SHARED_WITH_PUBLISHER = {"errors", "fsutil", "metadata", "package", "text"}
PUBLISH_LEVELS = {"common": 0, "sealed": 0, "keys": 1, "build": 1, "bridge": 1, "store": 1,
                  "history": 1, "rollout": 1, "repo": 2, "fleetpage": 2, "reports": 2, "fleet": 2,
                  "rotate": 3,
                  "verify": 3, "stage": 3, "serve": 3, "export": 4, "fleetweb": 4,
                  "collector": 5, "cli": 5}


def imports(path: Path, source: str | None = None) -> tuple[set[str], set[str]]:
    """(modules of this package, top-level names of other packages) that ``path`` imports;
    package modules are named relative to the package (``publish.repo``); the package
    itself (``from . import __version__``) is left out."""
    relative = path.relative_to(PACKAGE).with_suffix("").parts
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("opq_box_updater."):
                    inside.add(alias.name.removeprefix("opq_box_updater."))
                elif alias.name != "opq_box_updater":
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = node.module or ""
                if name.startswith("opq_box_updater."):
                    inside.add(name.removeprefix("opq_box_updater."))
                elif name == "opq_box_updater":
                    inside.update(a.name for a in node.names
                                  if PACKAGE.joinpath(a.name + ".py").exists())
                else:
                    outside.add(name.split(".")[0])
                continue
            base = list(relative[:-1])[:len(relative) - node.level]
            if node.module:
                inside.add(".".join([*base, node.module]))
            else:  # from . import x, y: modules or names of the package
                inside.update(".".join([*base, a.name]) for a in node.names
                              if (PACKAGE.joinpath(*base, a.name + ".py")).exists())
    return {m for m in inside if m}, outside


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_every_module_has_a_level() -> None:
    box = {name(p) for p in modules() if not name(p).startswith("publish.")}
    publish = {name(p).removeprefix("publish.") for p in modules()
               if name(p).startswith("publish.")}
    assert box == set(LEVELS), "give a new module its level in LEVELS and the docs' map"
    assert publish == set(PUBLISH_LEVELS)


@pytest.mark.parametrize("path", [p for p in modules() if not name(p).startswith("publish.")],
                         ids=name)
def test_box_modules_import_only_lower_levels(path: Path) -> None:
    own = LEVELS[name(path)]
    inside, _ = imports(path)
    upward = sorted(m for m in inside if m.startswith("publish") or LEVELS[m] >= own)
    assert not upward, f"{name(path)} (level {own}) imports {upward}"


@pytest.mark.parametrize("core", sorted(CORE))
def test_the_core_does_no_io(core: str) -> None:
    path = PACKAGE / f"{core}.py"
    _, outside = imports(path)
    assert outside <= CORE_STDLIB, f"{core} imports {sorted(outside - CORE_STDLIB)}"
    calls = [n for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in {"open", "print", "input", "exec", "eval", "__import__"}]
    assert not calls, f"{core} calls {[c.func.id for c in calls]}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", [p for p in modules() if name(p).startswith("publish.")],
                         ids=name)
def test_the_publisher_uses_only_the_shared_box_modules(path: Path) -> None:
    own = PUBLISH_LEVELS[name(path).removeprefix("publish.")]
    inside, _ = imports(path)
    box = {m for m in inside if not m.startswith("publish.")}
    assert box <= SHARED_WITH_PUBLISHER, f"{name(path)} imports box modules {box}"
    upward = sorted(m for m in inside if m.startswith("publish.")
                    and PUBLISH_LEVELS[m.removeprefix("publish.")] >= own)
    assert not upward, f"{name(path)} imports {upward}"


def test_the_parser_sees_every_kind_of_import() -> None:
    """Lazy, relative, absolute and parent-relative imports are all seen (a rule that
    cannot see an import cannot fail)."""
    source = ("import os\nfrom .state import Store\nfrom . import fetcher\n"
              "def f():\n    from opq_box_updater import installer\n"
              "    import opq_box_updater.cli\n    from ..fsutil import atomic_write\n")
    inside, outside = imports(PACKAGE / "trust.py", source)
    assert outside == {"os"}
    assert inside == {"state", "fetcher", "installer", "cli", "fsutil"}
    inside, _ = imports(PACKAGE / "publish" / "repo.py", source)
    assert inside == {"publish.state", "installer", "cli", "fsutil"}
