"""Benchmark results as Markdown tables, and the file they are written to.

Each benchmark returns :class:`Section` values; :func:`render` joins them under a header naming
the machine and its load (the figures are only comparable within one run), and
:func:`write` stores the page as ``bench/results/latest.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"


@dataclass
class Section:
    """One benchmark's figures: a table, the targets it is held to, and notes."""

    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    targets: list[tuple[str, str, str]] = field(default_factory=list)  # (target, measured, ok)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def markdown(self) -> str:
        """Render the section as Markdown."""
        out = [f"## {self.title}", ""]
        if self.skipped is not None:
            return "\n".join([*out, f"skipped: {self.skipped}", ""])
        if self.rows:
            out += _table(self.columns, self.rows)
        if self.targets:
            out += _table(["target", "measured", "met"], [list(t) for t in self.targets])
        out += [f"- {note}" for note in self.notes]
        return "\n".join([*out, ""])


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines, followed by a blank line."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt(value: float | None, digits: int = 0) -> str:
    """Format a figure, or a dash when it was not measured."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` as ``1.23x``, or a dash."""
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def verdict(ok: bool | None) -> str:
    """``yes``/``no``/``-`` for a target check."""
    return "-" if ok is None else ("yes" if ok else "no")


def render(sections: Sequence[Section], mode: str, elapsed: float) -> str:
    """Render the whole results page."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = [
        "# Benchmark results",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({mode}, {elapsed:.0f} s) on "
        f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; load average "
        f"at the end {load}. Peers were measured in the same run, in interleaved rounds; the "
        "machine was shared, so compare figures within this page only.",
        "",
    ]
    return "\n".join(header + [section.markdown() for section in sections])


def write(page: str, path: Path = RESULTS) -> Path:
    """Write the page to ``path`` (creating its directory) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
