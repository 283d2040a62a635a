"""Gateway benchmark: `remotecli gateway` against nginx, node http-proxy and no proxy at all.

Every peer runs in its own process with one worker, in front of the same WebSocket upstream
(:mod:`bench.upstream`, its own process too); the load client is a third process per
measurement (:mod:`bench.loadclient`). Rounds are interleaved (each round measures every peer,
in a rotated order) so a burst of load from elsewhere on the machine hits all of them alike; a
figure is the median over rounds. Memory per idle tunnel is measured on freshly started peers:
the resident memory of the peer's process tree (nginx's master and worker) before and while
holding N tunnels, divided by N. CPU per GB is the CPU time (user and system) of the peer's
process tree over the timed span of a throughput measurement, divided by the payload moved.

``BENCH_GATEWAY_BASELINE=/path/to/other/checkout/src`` adds a peer, ``gateway baseline``, that
runs the gateway from that source tree (``python -m remotecli`` with it first on PYTHONPATH), to
compare a change with the code before it in the same run (``git worktree add /tmp/before REV``).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.processes import (
    PYTHON,
    REPO,
    Peer,
    free_port,
    hold_tunnels,
    python_peer,
    raise_fd_limit,
    run_client,
)
from bench.report import Section, fmt, median, ratio, verdict

GATEWAY = "gateway"
BASELINE = "gateway baseline"
BASELINE_ENV = "BENCH_GATEWAY_BASELINE"
NGINX_STOCK = "nginx stock"
NGINX_64K = "nginx 64k"
NODE = "node http-proxy"
DIRECT = "direct"
PEERS = (GATEWAY, NGINX_STOCK, NGINX_64K, NODE, DIRECT)


def _peer_names() -> tuple[str, ...]:
    """The peers of this run: the baseline gateway too when BENCH_GATEWAY_BASELINE names one."""
    return (GATEWAY, BASELINE, *PEERS[1:]) if os.environ.get(BASELINE_ENV) else PEERS


_NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
{extra}        }}
    }}
}}
"""

_NGINX_64K = """\
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            client_body_buffer_size 64k;
"""


def nginx_peer(name: str, upstream: int, workdir: Path, big_buffers: bool) -> Peer:
    """An nginx with one worker proxying WebSockets to 127.0.0.1:``upstream``."""
    port = free_port()
    directory = workdir / name.replace(" ", "-")
    directory.mkdir(parents=True, exist_ok=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = _NGINX_CONF.format(
        nofile=nofile,
        connections=2 * nofile,
        dir=directory,
        port=port,
        upstream=upstream,
        extra=_NGINX_64K if big_buffers else "",
    )
    (directory / "nginx.conf").write_text(conf)
    argv = ["nginx", "-p", str(directory), "-e", str(directory / "error.log")]
    argv += ["-c", str(directory / "nginx.conf"), "-g", "daemon off;"]
    return Peer(name, argv, workdir, port)


def node_peer(upstream: int, workdir: Path) -> Peer:
    """node-http-proxy (bench/peers/http_proxy.js) proxying to 127.0.0.1:``upstream``."""
    port = free_port()
    script = REPO / "bench" / "peers" / "http_proxy.js"
    return Peer(
        NODE, ["node", str(script), str(port), f"http://127.0.0.1:{upstream}"], workdir, port
    )


def gateway_peer(upstream: int, workdir: Path, source: str | None = None) -> Peer:
    """`remotecli gateway` with one route to 127.0.0.1:``upstream``.

    With ``source`` (a ``src`` directory), the gateway of that source tree, as peer BASELINE.
    """
    port = free_port()
    if source is None:
        command, env, name = [str(Path(sys.executable).parent / "remotecli")], None, GATEWAY
    else:
        if not (Path(source) / "remotecli" / "__main__.py").is_file():
            raise RuntimeError(f"{BASELINE_ENV}={source} holds no remotecli package")
        command, name = [PYTHON, "-m", "remotecli"], BASELINE
        env = {**os.environ, "PYTHONPATH": source}
    argv = [*command, "gateway", "--listen", f"127.0.0.1:{port}"]
    argv += ["--route", f"/=http://127.0.0.1:{upstream}"]
    help_text = subprocess.run(
        [*command, "gateway", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env=env,
        cwd=REPO,
    ).stdout
    if "--max-connections" in help_text:
        argv += ["--max-connections", "30000"]
    return Peer(name, argv, workdir, port, env=env)


class _Direct(Peer):
    """No proxy: the client talks to the upstream itself."""

    def __init__(self, upstream: int, workdir: Path) -> None:
        super().__init__(DIRECT, [], workdir, upstream)

    def start(self, timeout: float = 15.0) -> None:
        pass

    def stop(self, grace: float = 5.0) -> None:
        pass


def _factories(upstream: int, workdir: Path) -> dict[str, Callable[[], Peer]]:
    return {
        GATEWAY: lambda: gateway_peer(upstream, workdir),
        BASELINE: lambda: gateway_peer(upstream, workdir, os.environ.get(BASELINE_ENV)),
        NGINX_STOCK: lambda: nginx_peer(NGINX_STOCK, upstream, workdir, big_buffers=False),
        NGINX_64K: lambda: nginx_peer(NGINX_64K, upstream, workdir, big_buffers=True),
        NODE: lambda: node_peer(upstream, workdir),
        DIRECT: lambda: _Direct(upstream, workdir),
    }


def _start(factory: Callable[[], Peer], errors: dict[str, str], name: str) -> Peer | None:
    """Start a peer; on failure record why and return None."""
    try:
        peer = factory()
        peer.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        errors[name] = f"skipped: {reason}"
        return None
    return peer


def run(quick: bool, workdir: Path) -> list[Section]:
    """Run the gateway benchmark; return its sections."""
    raise_fd_limit()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    big = min(10_000, (hard - 48) // 2)
    rounds, seconds, rtt_count = (2, 1.0, 500) if quick else (7, 1.5, 2000)
    upstream_port = free_port()
    upstream = python_peer(
        "upstream-ws", "bench.upstream", ["ws", str(upstream_port)], workdir, upstream_port
    )
    upstream.start()
    factories = _factories(upstream_port, workdir)
    errors: dict[str, str] = {}
    peers: dict[str, Peer] = {}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in _peer_names()}
    try:
        for name in _peer_names():
            peer = _start(factories[name], errors, name)
            if peer is not None:
                peers[name] = peer
        names = [name for name in _peer_names() if name in peers]
        for index in range(rounds):
            for kind, spec in _specs(seconds, rtt_count).items():
                for name in names[index % len(names) :] + names[: index % len(names)]:
                    _measure(peers[name], kind, spec, samples[name], errors)
        for peer in peers.values():
            peer.stop()
        sizes = (1_000,) if quick else (1_000, big)
        for name in names:
            if name == DIRECT:
                continue
            for size in sizes:
                _memory(name, factories[name], size, samples[name], errors)
    finally:
        for peer in peers.values():
            peer.stop()
        upstream.stop()
    return [_section(samples, errors, big, quick, rounds, seconds)]


def _add(bucket: dict[str, list[float]], key: str, value: Any) -> None:
    if isinstance(value, int | float):
        bucket.setdefault(key, []).append(float(value))


def _specs(seconds: float, rtt_count: int) -> dict[str, dict[str, Any]]:
    """The load-client measurements of one round, by name."""
    return {
        "upload": {"mode": "upload", "seconds": seconds},
        "echo": {"mode": "echo", "seconds": seconds},
        "rtt": {"mode": "rtt", "count": rtt_count},
        "upgrades": {"mode": "upgrades", "count": 500},
    }


_FIGURES = {
    "upload": (("upload", "mbps"), ("upload_cpu", "cpu_s_per_gb")),
    "echo": (("echo", "mbps"), ("echo_cpu", "cpu_s_per_gb")),
    "rtt": (("rtt_p50", "p50_ms"), ("rtt_p99", "p99_ms")),
    "upgrades": (("upg_p99", "p99_ms"), ("upg_failed", "failed")),
}


def _measure(
    peer: Peer,
    kind: str,
    spec: dict[str, Any],
    bucket: dict[str, list[float]],
    errors: dict[str, str],
) -> None:
    """Run one measurement against one peer and add its figures to the peer's samples."""
    pids = peer.pids() if peer.proc is not None else []  # direct: no proxy process
    result = run_client({"port": peer.port, "path": "/echo", "cpu_pids": pids, **spec}, 90)
    if "error" in result:
        errors[f"{peer.name} {kind}"] = result["error"]
    for key, field in _FIGURES[kind]:
        _add(bucket, key, result.get(field))


def _memory(
    name: str,
    factory: Callable[[], Peer],
    size: int,
    bucket: dict[str, list[float]],
    errors: dict[str, str],
) -> None:
    """Start a fresh peer, warm it with one tunnel, then hold ``size`` idle tunnels."""
    peer = _start(factory, errors, name)
    if peer is None:
        return
    try:
        spec = {"port": peer.port, "path": "/echo"}
        run_client({**spec, "mode": "rtt", "count": 10}, 30)
        result = hold_tunnels({**spec, "count": size, "concurrency": 200}, peer, 180)
        if "error" in result:
            errors[f"{name} {size} tunnels"] = result["error"]
            return
        if result["errors"]:
            errors[f"{name} {size} tunnels"] = str(result["errors"])[:160]
        held = result["alive"]
        _add(bucket, f"held_{size}", held)
        if held:
            per = (result["rss_held_kib"] - result["rss_before_kib"]) / held
            _add(bucket, f"rss_{size}", per)
    finally:
        peer.stop()


def _section(
    samples: dict[str, dict[str, list[float]]],
    errors: dict[str, str],
    big: int,
    quick: bool,
    rounds: int,
    seconds: float,
) -> Section:
    """Turn the samples into the results table and the target checks."""
    fig = {
        name: {key: median(values) for key, values in bucket.items()}
        for name, bucket in samples.items()
    }
    stock, big_nginx = fig[NGINX_STOCK], fig[NGINX_64K]
    columns = ["peer", "upload MB/s", "echo MB/s", "echo vs nginx 64k", "echo vs stock"]
    columns += ["upload CPU s/GB", "echo CPU s/GB", "RTT p50 µs", "RTT p99 µs"]
    columns += ["500 upgrades p99 ms", "KiB/tunnel @1k"]
    columns += [f"KiB/tunnel @{big:,}", f"held of {big:,}"]
    rows = []
    for name in samples:
        f = fig[name]
        row = [name, fmt(f.get("upload")), fmt(f.get("echo"))]
        row += [
            ratio(f.get("echo"), big_nginx.get("echo")),
            ratio(f.get("echo"), stock.get("echo")),
        ]
        row += [fmt(f.get("upload_cpu"), 2), fmt(f.get("echo_cpu"), 2)]
        row += [fmt(_us(f.get("rtt_p50"))), fmt(_us(f.get("rtt_p99"))), fmt(f.get("upg_p99"), 1)]
        row += [fmt(f.get("rss_1000"), 1), fmt(f.get(f"rss_{big}"), 1), fmt(f.get(f"held_{big}"))]
        rows.append(row)
    g = fig[GATEWAY]
    section = Section(
        "Gateway: WebSocket proxying (64 KiB messages, one connection)", columns, rows
    )
    section.targets = _targets(g, stock, big_nginx, big)
    section.notes = [
        f"{rounds} rounds; in each, every measurement is taken of every peer in turn (rotated "
        f"order), {seconds:g} s per throughput figure; each figure is the median over rounds. "
        "Upload: bytes the upstream received per second (timed until it acknowledged the "
        "last byte). Echo: bytes echoed back per second with 1 MiB in flight.",
        "CPU s/GB: CPU time (user + system, /proc/PID/stat) of the proxy's process tree over "
        "the timed span of the throughput figure, divided by the payload moved (GB = 1e9 bytes; "
        "for echo the bytes echoed back, each of which crossed the proxy twice).",
        "RTT: sequential 64-byte messages through the proxy to the echo upstream and back. "
        "Upgrades: 500 WebSocket handshakes started at once, time of each to its 101.",
        "KiB/tunnel: growth of the proxy's resident memory (whole process tree) while holding N "
        "idle, working tunnels, divided by N; each N on a freshly started proxy.",
        "nginx runs with worker_connections at twice the descriptor limit, so the descriptor "
        "limit, not nginx's connection table, bounds the tunnels it holds (with both at 20,000 "
        "it stops near 9,400 with 'worker_connections are not enough').",
        "Every process (load client, proxy, upstream) shares the same 2 cores, so throughput is "
        "bounded by CPU and noisy while other work runs on the machine.",
    ]
    if big < 10_000:
        section.notes.append(
            "10,000 tunnels need over 20,000 descriptors in the proxy process; the hard "
            f"RLIMIT_NOFILE here is {big * 2 + 48:,} and cannot be raised without "
            f"CAP_SYS_RESOURCE, so the large point is {big:,} tunnels (the most any one-process "
            "proxy can hold here)."
        )
    if quick:
        section.notes.append("--quick: fewer, shorter rounds and only the 1,000-tunnel point.")
    spread = [
        f"{name} {max(values) / min(values):.2f}x"
        for name in samples
        if (values := samples[name].get("echo")) and min(values) > 0
    ]
    if spread:
        section.notes.append("Echo spread over rounds (max/min): " + ", ".join(spread) + ".")
    for name in samples:
        failed = sum(samples[name].get("upg_failed", []))
        if failed:
            section.notes.append(f"{name}: {failed:.0f} of the concurrent upgrades failed.")
    section.notes += [f"{key}: {message}" for key, message in errors.items()]
    return section


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1000


def _check(value: float | None, reference: float | None, factor: float, most: bool) -> str:
    """yes/no for ``value >= factor * reference`` (``<=`` when ``most``), or a dash."""
    if value is None or not reference:
        return verdict(None)
    return verdict(value <= factor * reference if most else value >= factor * reference)


def _targets(
    g: dict[str, float | None],
    stock: dict[str, float | None],
    big_nginx: dict[str, float | None],
    big: int,
) -> list[tuple[str, str, str]]:
    """The issue's targets, measured against this run's peers."""
    rtts = [v for v in (stock.get("rtt_p50"), big_nginx.get("rtt_p50")) if v is not None]
    nginx_rtt = min(rtts) if rtts else None
    targets = []
    for kind in ("echo", "upload"):
        value = g.get(kind)
        targets.append(
            (
                f"{kind} throughput >= 1.0x nginx 64k",
                ratio(value, big_nginx.get(kind)),
                _check(value, big_nginx.get(kind), 1.0, most=False),
            )
        )
        targets.append(
            (
                f"{kind} throughput >= 2x stock nginx",
                ratio(value, stock.get(kind)),
                _check(value, stock.get(kind), 2.0, most=False),
            )
        )
    cpu = g.get("upload_cpu")
    targets.append(
        (
            "upload CPU s/GB <= 1.0x nginx 64k",
            ratio(cpu, big_nginx.get("upload_cpu")),
            _check(cpu, big_nginx.get("upload_cpu"), 1.0, most=True),
        )
    )
    rtt = g.get("rtt_p50")
    targets.append(
        (
            "RTT p50 <= 1.1x nginx (the faster of the two)",
            ratio(rtt, nginx_rtt),
            _check(rtt, nginx_rtt, 1.1, most=True),
        )
    )
    for size in (1_000, big):
        per = g.get(f"rss_{size}")
        targets.append(
            (f"<= 4 KiB per idle tunnel @{size:,}", fmt(per, 1), _check(per, 4, 1, True))
        )
    held = g.get(f"held_{big}")
    targets.append((f"{big:,} idle tunnels held", fmt(held), _check(held, big, 1.0, most=False)))
    return targets
