"""The one subprocess wrapper: every dpkg, run-parts, hook and script call goes through here.

Like pip's ``call_subprocess``: the command is logged, output captured (stderr folded into
stdout so the tail shows what happened in order), a timeout enforced, and a failure raised as
:class:`SubprocessError` carrying the command, exit code and the tail of the output.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import SubprocessError

logger = logging.getLogger(__name__)

#: Directories dpkg needs (ldconfig, start-stop-daemon); cron's default PATH lacks them.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TAIL_LINES = 20


@dataclass(frozen=True)
class Result:
    """What a finished command returned."""

    cmd: tuple[str, ...]
    returncode: int
    output: str


def system_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for children: ours, with sbin directories on PATH, plus ``extra``."""
    env = dict(os.environ)
    parts = env.get("PATH", "").split(":") if env.get("PATH") else []
    for directory in SYSTEM_PATH.split(":"):
        if directory not in parts:
            parts.append(directory)
    env["PATH"] = ":".join(parts)
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 3600,
    check: bool = True,
    stdin_data: str | None = None,
) -> Result:
    """Run ``cmd``; raise :class:`SubprocessError` on timeout, on a missing program, or, with
    ``check``, on a non-zero exit. ``env`` is the complete child environment (default: ours
    plus :data:`SYSTEM_PATH`)."""
    argv = tuple(os.fspath(c) for c in cmd)
    printable = shlex.join(argv)
    logger.debug("running: %s", printable)
    try:
        proc = subprocess.run(
            argv,
            env=dict(env) if env is not None else system_env(),
            cwd=cwd,
            input=stdin_data,
            stdin=None if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            text=True,
            errors="replace",
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output if isinstance(exc.output, str) else ""
        raise SubprocessError(f"{argv[0]} timed out after {timeout:.0f}s", argv, None,
                              tail(out)) from None
    except OSError as exc:
        raise SubprocessError(f"cannot run {argv[0]}: {exc.strerror}", argv, None, "") from None
    result = Result(argv, proc.returncode, proc.stdout)
    for line in tail(proc.stdout).splitlines():
        logger.debug("  | %s", line)
    if check and proc.returncode != 0:
        raise SubprocessError(
            f"{printable} exited with status {proc.returncode}", argv, proc.returncode,
            tail(proc.stdout))
    return result
