"""``python -m bench`` (``make bench``): measure the DESIGN 7 budgets and print one table.

Exit 0 when the benchmark ran (whether or not every budget passed; the table says PASS or
MISS), 1 when it could not run. ``--tiny`` uses small sizes and few rounds: it proves the
code works, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .run import FULL, TINY, Bench, describe_machine, format_table, scratch, timed
from .servers import BenchError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--tiny", action="store_true",
                        help="small packages and few rounds (a smoke test)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="parent of the scratch directory (default $TMPDIR or /tmp); "
                             "needs about 4.2 GiB free")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    try:
        print(describe_machine(), flush=True)
        with scratch(args.workdir, args.keep) as work:
            results, seconds = timed(lambda: Bench(work, sizes, sys.stderr).run())
            if args.keep:
                print(f"scratch directory kept: {work}", file=sys.stderr)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(format_table(results), end="")
    print(f"\n{len(results)} budgets, {sum(r.passed for r in results)} PASS, "
          f"{sum(not r.passed for r in results)} MISS; {seconds:.0f} s"
          f"{' (--tiny: sizes too small for the figures to mean anything)' if args.tiny else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
