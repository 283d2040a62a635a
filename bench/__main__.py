"""Run the benchmarks: ``python -m bench [--quick] [--only NAME ...] [--output PATH]``.

Prints the results as Markdown and writes them to ``bench/results/latest.md`` (or ``--output``).
A benchmark whose subject is not built yet reports ``skipped: <why>`` instead of failing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

from bench.report import RESULTS, Section, render, write

BENCHMARKS = ("gateway", "bridge", "sessions")


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the chosen benchmarks, print and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~2 min)")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="Markdown results file")
    args = parser.parse_args(argv)
    chosen = args.only or list(BENCHMARKS)
    sections: list[Section] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="remotecli-bench-") as tmp:
        for name in chosen:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            module = importlib.import_module(f"bench.{name}")
            workdir = Path(tmp) / name
            workdir.mkdir()
            sections += module.run(args.quick, workdir)
    page = render(sections, "quick" if args.quick else "full", time.monotonic() - started)
    print(page)
    path = write(page, args.output)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
