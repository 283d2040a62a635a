"""A light run of the load benchmark (``bench/load.py``): 300 tunnels and a 2 s session burst.

The full run (2,000 tunnels, 20 creations per second for 30 s) is ``python -m bench.load``;
this one proves the same properties at a size that suits the test suite: every tunnel opens and
echoes while all are open, every creation succeeds, and the controller's file descriptors and
memory come back to where they started.
"""

from __future__ import annotations

from bench.load import measure


def test_300_tunnels_and_a_session_burst_leave_no_error_and_no_leak() -> None:
    """300 tunnels twice and 40 creations: no error, fds back, no memory growth in round two."""
    tunnels, again, creations = measure(True, tunnels=300, seconds=2.0)
    assert tunnels["errors"] == {}
    assert tunnels["opened"] == 300
    assert tunnels["echoed_all_at_once"] == 300
    assert creations["errors"] == {}
    assert creations["created"] == creations["requested"] == 40
    assert again["errors"] == {}
    assert again["rss_kib"][2] - again["rss_kib"][0] < 8 * 1024, again  # no growth per round
    for phase in (tunnels, again, creations):
        fds_before, _, fds_after = phase["fds"]
        assert fds_after <= fds_before + 8, phase
        rss_before, _, rss_after = phase["rss_kib"]
        assert rss_after - rss_before < 32 * 1024, phase
    assert tunnels["fds"][1] >= tunnels["fds"][0] + 2 * 300  # both sides of every tunnel were open
