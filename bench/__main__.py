"""Run the benchmarks: ``python -m bench [--quick] [--only NAME ...] [--output PATH]``.

Prints the results as Markdown and writes them to ``bench/results/latest.md`` (or ``--output``).
A benchmark whose subject is not built yet reports ``skipped: <why>`` instead of failing.

Each benchmark is a module ``bench.<name>`` with ``run(quick, workdir) -> list[Section]``
(``workdir`` is a fresh temporary directory, removed afterwards); ``run(quick)`` and a
coroutine function are accepted too.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import RESULTS, Section, render, write

BENCHMARKS = (
    "gateway",
    "bridge",
    "sessions",
    "runs",
    "keystrokes",
    "dashboard",
    "load",
    "qemu",
    "cluster",
    "channel",
)


def _run(run: Callable[..., Any], quick: bool, workdir: Path) -> list[Section]:
    """Call a benchmark's ``run`` with the arguments it takes; await it if it is a coroutine."""
    takes_workdir = len(inspect.signature(run).parameters) >= 2
    result = run(quick, workdir) if takes_workdir else run(quick)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    sections: list[Section] = result
    return sections


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
            try:
                module = importlib.import_module(f"bench.{name}")
            except ImportError as exc:
                sections.append(Section(name, skipped=f"cannot import bench.{name}: {exc}"))
                continue
            workdir = Path(tmp) / name
            workdir.mkdir()
            try:
                sections += _run(module.run, args.quick, workdir)
            except Exception as exc:  # one broken benchmark must not lose the others' figures
                reason = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
                sections.append(Section(name, skipped=reason))
    page = render(sections, "quick" if args.quick else "full", time.monotonic() - started)
    print(page)
    path = write(page, args.output)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
