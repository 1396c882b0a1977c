"""Run the fuzz targets under atheris (libFuzzer), coverage-guided.

    python -m fuzz.run [--time SECONDS | --runs N] [--workdir DIR] [TARGET ...]

Each target runs in its own process (libFuzzer owns the process) over a working corpus in
``DIR/corpus/TARGET`` that starts from the committed seeds in ``fuzz/seeds/TARGET``; the
seeds themselves are never written. A failing input is saved as ``DIR/artifacts/TARGET/...``;
turn it into a regression input under ``fuzz/regressions/TARGET/`` (tests/test_fuzz_corpus.py
runs those in every test run). Exit 0 when every target ran clean, 1 otherwise.

``python -m fuzz.run --child TARGET LIBFUZZER-ARGS...`` is the child process itself.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = HERE / "seeds"
TARGET_NAMES = ("json", "root", "release", "manifest", "zip", "deb")
#: libFuzzer flags common to every run: one input may take 10 s and 1 GiB at most (a hang or
#: a memory blow-up is a finding too), and a found crash stops the run.
COMMON_FLAGS = ("-timeout=10", "-rss_limit_mb=1024", "-print_final_stats=1")
#: Targets whose inputs are JSON get libFuzzer's dictionary of JSON tokens and field names.
JSON_TARGETS = frozenset({"json", "root", "release", "manifest"})
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def child(target: str, argv: list[str]) -> None:
    """Instrument the modules under test and hand the process to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["opq_box_updater", "zipfile", "tarfile", "debian",
                                             "json"]):
        import debian.debfile  # noqa: F401 - imported here to be instrumented

        import opq_box_updater.metadata
        import opq_box_updater.package  # noqa: F401

    from fuzz.targets import TARGETS

    atheris.Setup([sys.argv[0], *argv], TARGETS[target])
    atheris.Fuzz()


def run_target(target: str, workdir: Path, budget: list[str]) -> tuple[int, str]:
    """Fuzz one target; return libFuzzer's exit code and its summary line."""
    corpus = workdir / "corpus" / target
    artifacts = workdir / "artifacts" / target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{target}.log"
    flags = [*COMMON_FLAGS, *budget, f"-artifact_prefix={artifacts}/"]
    if target in JSON_TARGETS:
        flags.append(f"-dict={HERE / 'json.dict'}")
    cmd = [sys.executable, "-m", "fuzz.run", "--child", target, *flags, str(corpus),
           str(SEEDS / target)]
    started = time.monotonic()
    with open(log, "wb") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent,
                              check=False).returncode
    text = log.read_text(errors="replace")
    done = _DONE.search(text)
    summary = (f"{done.group(1)} inputs in {done.group(2)} s" if done
               else f"stopped after {time.monotonic() - started:.0f} s")
    return code, summary


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", type=int,
                        help="seconds per target (default 60 unless --runs is given)")
    parser.add_argument("--runs", type=int, help="inputs per target (stops at --time too)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "opq-fuzz")
    parser.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGET_NAMES)}")
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - set(TARGET_NAMES))
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGET_NAMES)}")
    seconds = args.time if args.time is not None else (None if args.runs else 60)
    budget = [*([f"-runs={args.runs}"] if args.runs else []),
              *([f"-max_total_time={seconds}"] if seconds else [])]
    failed = []
    for target in args.targets or TARGET_NAMES:
        code, summary = run_target(target, args.workdir, budget)
        print(f"fuzz {target}: {'ok' if code == 0 else f'FAILED (exit {code})'}, {summary}; "
              f"log {args.workdir / (target + '.log')}", flush=True)
        if code != 0:
            failed.append(target)
    if failed:
        print(f"fuzz: failing inputs under {args.workdir}/artifacts/: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
