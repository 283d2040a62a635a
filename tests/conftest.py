"""Shared test configuration: one timeout factor, and a raised file-descriptor limit."""

from __future__ import annotations

import os
import resource

# Every timeout in the tests is a multiple of MS, so a slow machine scales them all at once with
# REMOTECLI_TEST_TIMEOUT_FACTOR (as websockets' suite does with WEBSOCKETS_TESTS_TIMEOUT_FACTOR).
TIMEOUT_FACTOR = float(os.environ.get("REMOTECLI_TEST_TIMEOUT_FACTOR", "1"))
MS = 0.001 * TIMEOUT_FACTOR

_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < min(_hard, 65536):
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(_hard, 65536), _hard))
