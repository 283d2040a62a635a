"""Skip an end-to-end cluster module, saying why, on a machine that cannot run it.

Imported before anything that imports Ray: the reason names what is missing (root, a program,
Ray itself) instead of an ImportError at collection.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence

import pytest


def cluster_skip_reason(root_for: str, programs: Sequence[str], hint: str) -> str | None:
    """Why a cluster module cannot run here: not root (``root_for`` says what needs it), a
    missing program (``hint`` says how to install it), or no Ray; None when it can."""
    if os.geteuid() != 0:
        return f"needs root: {root_for}"
    for program in programs:
        if shutil.which(program) is None:
            return f"needs {program}: {hint}"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "needs ray: pip install -e '.[cluster]'"
    return None


def skip_module_unless(
    module: str,
    root_for: str,
    programs: Sequence[str],
    hint: str,
    more: Callable[[], str | None] = lambda: None,
) -> None:
    """Skip the calling module (printing ``module`` and the reason) unless it can run here;
    ``more`` checks what else the module needs, once the rest is there."""
    reason = cluster_skip_reason(root_for, programs, hint) or more()
    if reason is not None:
        print(f"{module} skipped: {reason}")
        pytest.skip(reason, allow_module_level=True)
