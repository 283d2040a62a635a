"""Bridge benchmark: the VNC bridge against websockify, both doing WebSocket-to-TCP echo.

The bridge runs behind a Gateway in its own process (:mod:`bench.peers.vnc_bridge`), websockify
as `websockify PORT 127.0.0.1:ECHO`; both relay to the same plain TCP echo server
(:mod:`bench.upstream`), standing in for a session's VNC server. Throughput and round trips are
measured in interleaved rounds with the load client offering subprotocol ``binary`` as noVNC
does. Then each peer, freshly started, is asked to hold many idle bridged connections, each
checked with one echo: the most it holds is its concurrency limit.

``BENCH_BRIDGE_BASELINE=/path/to/other/checkout/src`` adds a peer, ``vnc bridge baseline``: the
same peer module with that source tree first on PYTHONPATH, to compare a change with the code
before it in the same run (``git worktree add /tmp/before REV``).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from bench.processes import (
    PYTHON,
    Peer,
    free_port,
    hold_tunnels,
    python_peer,
    raise_fd_limit,
    run_client,
)
from bench.report import Section, fmt, median, ratio, verdict

BRIDGE = "vnc bridge"
BASELINE = "vnc bridge baseline"
BASELINE_ENV = "BENCH_BRIDGE_BASELINE"
WEBSOCKIFY = "websockify"
_PATH = "/api/sessions/bench/vnc"


def _bridge_peer(echo: int, workdir: Path) -> Peer:
    port = free_port()
    return python_peer(BRIDGE, "bench.peers.vnc_bridge", [str(port), str(echo)], workdir, port)


def _baseline_peer(echo: int, workdir: Path) -> Peer:
    """The bridge peer running the ``remotecli`` of the source tree BENCH_BRIDGE_BASELINE names."""
    source = os.environ[BASELINE_ENV]
    if not (Path(source) / "remotecli" / "controller" / "bridge.py").is_file():
        raise RuntimeError(f"{BASELINE_ENV}={source} holds no remotecli package")
    port = free_port()
    argv = [PYTHON, "-m", "bench.peers.vnc_bridge", str(port), str(echo)]
    return Peer(BASELINE, argv, workdir, port, env={**os.environ, "PYTHONPATH": source})


def _websockify_peer(echo: int, workdir: Path) -> Peer:
    port = free_port()
    program = shutil.which("websockify", path=str(Path(sys.executable).parent)) or "websockify"
    return Peer(WEBSOCKIFY, [program, str(port), f"127.0.0.1:{echo}"], workdir, port)


def _missing() -> str | None:
    """Why the bridge cannot run yet, or None."""
    for module in ("remotecli.controller.bridge", "remotecli.gateway"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not built yet"
        except ImportError as exc:
            return f"{module} is not importable: {exc}"
    probe = subprocess.run(
        [sys.executable, "-c", "import bench.peers.vnc_bridge"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if probe.returncode != 0:
        return "the bridge does not import: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    return None


def run(quick: bool, workdir: Path) -> list[Section]:
    """Run the bridge benchmark; return its section."""
    raise_fd_limit()
    title = "VNC bridge: WebSocket to TCP echo (64 KiB messages)"
    why = _missing()
    if why is not None:
        return [Section(title, skipped=why)]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    bridge_count = min(6_000, (hard - 48) // 2)
    counts = {BRIDGE: bridge_count, BASELINE: bridge_count, WEBSOCKIFY: 600}
    rounds, seconds = (2, 1.0) if quick else (5, 2.0)
    echo_port = free_port()
    echo = python_peer(
        "upstream-tcp", "bench.upstream", ["tcp", str(echo_port)], workdir, echo_port
    )
    echo.start()
    makers = {BRIDGE: _bridge_peer, WEBSOCKIFY: _websockify_peer}
    if os.environ.get(BASELINE_ENV):
        makers = {BRIDGE: _bridge_peer, BASELINE: _baseline_peer, WEBSOCKIFY: _websockify_peer}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in makers}
    errors: dict[str, str] = {}
    peers: dict[str, Peer] = {}
    try:
        for name, maker in makers.items():
            try:
                peer = maker(echo_port, workdir)
                peer.start()
                peers[name] = peer
            except RuntimeError as exc:
                errors[name] = str(exc)[:200]
        names = list(peers)
        for index in range(rounds):
            for name in names[index % max(1, len(names)) :] + names[: index % max(1, len(names))]:
                spec = {"port": peers[name].port, "path": _PATH, "subprotocol": "binary"}
                throughput = run_client({**spec, "mode": "echo", "seconds": seconds}, 60)
                rtt = run_client({**spec, "mode": "rtt", "count": 500}, 60)
                for kind, result in (("echo", throughput), ("rtt", rtt)):
                    if "error" in result:
                        errors[f"{name} {kind}"] = result["error"]
                if "mbps" in throughput:
                    samples[name].setdefault("echo", []).append(throughput["mbps"])
                if "p50_ms" in rtt:
                    samples[name].setdefault("rtt", []).append(rtt["p50_ms"] * 1000)
        for name in names:
            peers.pop(name).stop()
            peer = makers[name](echo_port, workdir)
            peer.start()
            peers[name] = peer
            spec = {"port": peer.port, "path": _PATH, "subprotocol": "binary"}
            spec |= {"count": counts[name], "concurrency": 50 if name == WEBSOCKIFY else 100}
            spec |= {"open_timeout": 10, "max_seconds": 90}
            held = hold_tunnels(spec, peer, 240, proportional=True)
            if "error" in held:
                errors[f"{name} connections"] = held["error"]
                continue
            if held["errors"]:
                errors[f"{name} connections"] = str(held["errors"])[:200]
            samples[name]["held"] = [held["alive"]]
            if held["alive"]:
                per = (held["rss_held_kib"] - held["rss_before_kib"]) / held["alive"]
                samples[name]["rss"] = [per]
    finally:
        for peer in peers.values():
            peer.stop()
        echo.stop()
    return [_section(title, samples, counts, errors, rounds, seconds)]


def _section(
    title: str,
    samples: dict[str, dict[str, list[float]]],
    counts: dict[str, int],
    errors: dict[str, str],
    rounds: int,
    seconds: float,
) -> Section:
    fig = {name: {key: median(values) for key, values in b.items()} for name, b in samples.items()}
    bridge, ws = fig[BRIDGE], fig[WEBSOCKIFY]
    columns = [
        "peer",
        "echo MB/s",
        "vs websockify",
        "RTT p50 µs",
        "connections held",
        "KiB/conn (PSS)",
    ]
    rows = [
        [
            name,
            fmt(fig[name].get("echo")),
            ratio(fig[name].get("echo"), ws.get("echo")),
            fmt(fig[name].get("rtt")),
            f"{fmt(fig[name].get('held'))} of {counts[name]:,}",
            fmt(fig[name].get("rss"), 1),
        ]
        for name in samples
    ]
    held = bridge.get("held")
    section = Section(title, columns, rows)
    speed, reference = bridge.get("echo"), ws.get("echo")
    section.targets = [
        (
            "throughput >= 3x websockify",
            ratio(speed, reference),
            verdict(None if speed is None or not reference else speed >= 3 * reference),
        ),
        (
            ">= 5,000 concurrent bridged connections",
            fmt(held),
            verdict(None if held is None else held >= 5_000),
        ),
    ]
    section.notes = [
        f"{rounds} interleaved rounds of {seconds:.0f} s; medians. Echo: payload bytes echoed "
        "back per second through WebSocket → peer → TCP echo → peer → WebSocket, 1 MiB in flight.",
        "Connections held: idle bridged connections opened 100 at a time on a freshly started "
        "peer, each then answering one 64-byte echo; websockify is asked for 600 only (it "
        "forks a process per connection, and serves about 510 at most). KiB/conn: growth of "
        "the peer's process-tree PSS (proportional set size: shared pages divided among the "
        "processes mapping them, fair to websockify's forked children), divided by the "
        "connections held.",
    ]
    section.notes += [f"{key}: {message}" for key, message in errors.items()]
    return section
