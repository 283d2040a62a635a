"""Ray cluster figures: start time, memory per node and per session, time to declare a host dead.

Builds the e2e tests' cluster (``tests/ray_cluster.py``: a head and two workers, each in its
own network and PID namespaces, token auth on, dashboard off) once per health-check setting,
places sessions, then fails worker w1 either by killing all its processes (``kill``) or by
cutting its link (``cut``: processes alive, no answer) and times how long a Ray driver waits
until the node table says dead and the session actors die. Needs root, ``ip`` and ray.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from bench.report import Section

DRIVER = """
import json, pathlib, time
from remotecli.cluster import placement, watch
placement.connect(ADDRESS)
signals = pathlib.Path(SIGNALS)
started = time.monotonic()
placed = [placement.place_session(f"b{i}") for i in range(3)]
placing = time.monotonic() - started
(signals / "placed").write_text("")
while not (signals / "failed").exists():
    time.sleep(0.02)
failed_at = float((signals / "failed").read_text())
lost = [p for p in placed if p.host == "w1"]
reason = watch.wait_session(lost[0])
print("RESULT " + json.dumps({"placing": placing, "lost": time.time() - failed_at,
                              "reason": reason}), flush=True)
"""


def _node_memory(holder_pid: int) -> tuple[int, float, float]:
    """Processes, PSS and RSS (MiB) in the PID namespace ``holder_pid``'s child is init of."""
    child = Path(f"/proc/{holder_pid}/task/{holder_pid}/children").read_text().split()[0]
    namespace = os.readlink(f"/proc/{child}/ns/pid")
    count, pss, rss = 0, 0, 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns/pid") != namespace:
                continue
            fields = dict(
                line.split(":", 1) for line in (proc / "smaps_rollup").read_text().splitlines()[1:]
            )
        except OSError:
            continue
        count += 1
        pss += int(fields["Pss"].split()[0])
        rss += int(fields["Rss"].split()[0])
    return count, pss / 1024, rss / 1024


def _actor_memory() -> list[tuple[float, float]]:
    """PSS and RSS (MiB) of every session actor's worker process."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"SessionActor" in (proc / "cmdline").read_bytes():
                fields = dict(
                    line.split(":", 1)
                    for line in (proc / "smaps_rollup").read_text().splitlines()[1:]
                )
                found.append(
                    (int(fields["Pss"].split()[0]) / 1024, int(fields["Rss"].split()[0]) / 1024)
                )
        except OSError:
            continue
    return found


def run(quick: bool, workdir: Path) -> list[Section]:
    """Measure a tuned and (unless quick) a default cluster, each with both kinds of failure."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return [Section("Ray cluster", skipped="needs root and iproute2 (network namespaces)")]
    try:
        from tests.ray_cluster import ray_cluster
    except ImportError as exc:
        return [Section("Ray cluster", skipped=f"needs ray (pip install -e '.[cluster]'): {exc}")]
    from remotecli.cluster.nodes import HEALTH_CHECK

    settings: list[tuple[str, dict[str, int] | None]] = [("tuned", None)]
    if not quick:
        settings.append(("Ray's defaults", {}))
    rows: list[list[str]] = []
    memory = Section("Ray cluster: memory", ["process group", "processes", "PSS MiB", "RSS MiB"])
    for label, config in settings:
        for how in ("kill", "cut"):
            root = workdir / f"{len(rows)}"
            started = time.monotonic()
            with ray_cluster(root, system_config=config, prefix=f"rb{os.getpid() % 10000}") as c:
                up = time.monotonic() - started
                nodes = [node.name for node in [c.head, *c.workers]]
                before = [
                    _node_memory(node.process.pid)
                    for node in [c.head, *c.workers]
                    if node.process is not None
                ]
                signals = root / "signals"
                signals.mkdir()
                code = f"ADDRESS = {c.address!r}\nSIGNALS = {str(signals)!r}\n{DRIVER}"
                driver = c.popen_python(code)
                while not (signals / "placed").exists():
                    if driver.poll() is not None:
                        raise RuntimeError(driver.communicate()[1][-2000:])
                    time.sleep(0.05)
                if not memory.rows:
                    for node, (count, pss, rss) in zip(nodes, before, strict=True):
                        memory.rows.append([node, str(count), f"{pss:.0f}", f"{rss:.0f}"])
                    for pss, rss in _actor_memory()[:1]:
                        memory.rows.append(["one session actor", "1", f"{pss:.0f}", f"{rss:.0f}"])
                worker = c.workers[0]
                if how == "kill":
                    worker.kill()
                else:
                    c.network.cut(worker.name)
                (signals / "failed").write_text(str(time.time()))
                stdout, stderr = driver.communicate(timeout=300)
                if "RESULT " not in stdout:
                    raise RuntimeError(stderr[-2000:])
                result = json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])
            rows.append(
                [
                    label,
                    how,
                    f"{up:.1f}",
                    f"{result['placing']:.2f}",
                    f"{result['lost']:.1f}",
                    result["reason"],
                ]
            )
    figures = Section(
        "Ray cluster: start, placement, host loss",
        [
            "health checks",
            "failure",
            "3 nodes up s",
            "3 sessions placed s",
            "lost after s",
            "reason",
        ],
        rows,
        notes=[
            f"tuned: {json.dumps(HEALTH_CHECK)} on the head's --system-config",
            "Ray's defaults: initial delay 5000 ms, period 3000 ms, timeout 10000 ms, threshold 5",
            "memory: each node's own PID namespace, including the `ray start --block` process "
            "that holds it (~105 MiB RSS; a real host's `ray start` exits after starting), "
            "measured before any session; each session adds one actor process",
        ],
    )
    return [figures, memory]
