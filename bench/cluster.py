"""Ray cluster figures: create to ready against the embedded default, memory per host, host loss.

Builds the e2e tests' cluster (``tests/ray_cluster.py``: a head and two workers, each in its
own network and PID namespaces, token auth on, dashboard off). On one cluster, a controller with
the cluster driver runs in the controller's namespace and the embedded default (the local
driver) on this host, both in the same run (``bench/readyprobe.py``, the same code timing
both): shell sessions are created through each one's HTTP API in interleaved rounds, each
deleted after ready, and every node's memory is read before any session and with one. Then,
once per health-check setting, it places sessions and fails worker w1 either by killing all
its processes (``kill``) or by cutting its link (``cut``: processes alive, no answer) and times
how long a Ray driver waits until the node table says dead and the session actors die. Needs
root, ``ip``, ray and the local driver's programs; teardown is checked with
``tests.ray_cluster.leftovers``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import Section, fmt, percentile, ratio

if TYPE_CHECKING:
    from tests.ray_cluster import Cluster

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


@dataclass
class Memory:
    """Processes, PSS and RSS (MiB) of a node's PID namespace, and of the process holding it."""

    processes: int
    pss: float
    rss: float
    holder_pss: float
    holder_rss: float
    names: list[str] = field(default_factory=list)


def _rollup(proc: Path) -> tuple[float, float]:
    """PSS and RSS (MiB) of one process, from ``smaps_rollup``; raise OSError when it is gone."""
    fields = dict(
        line.split(":", 1) for line in (proc / "smaps_rollup").read_text().splitlines()[1:]
    )
    return int(fields["Pss"].split()[0]) / 1024, int(fields["Rss"].split()[0]) / 1024


def _namespace_init(holder_pid: int) -> int:
    """The pid (here) of the init of the PID namespace ``unshare`` process ``holder_pid`` made."""
    return int(Path(f"/proc/{holder_pid}/task/{holder_pid}/children").read_text().split()[0])


def _node_memory(holder_pid: int) -> Memory:
    """Memory of every process in the PID namespace that ``holder_pid``'s child is init of.

    That child is the node's ``ray start --block``, counted apart as the holder: a real host's
    ``ray start`` exits once the node runs.
    """
    init = _namespace_init(holder_pid)
    namespace = os.readlink(f"/proc/{init}/ns/pid")
    memory = Memory(0, 0.0, 0.0, 0.0, 0.0)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns/pid") != namespace:
                continue
            pss, rss = _rollup(proc)
        except OSError:
            continue
        memory.processes += 1
        with contextlib.suppress(OSError):
            memory.names.append((proc / "comm").read_text().strip())
        memory.pss += pss
        memory.rss += rss
        if int(proc.name) == init:
            memory.holder_pss, memory.holder_rss = pss, rss
    return memory


def _actor_memory() -> list[tuple[int, float, float]]:
    """Pid, PSS and RSS (MiB) of every session actor's Ray worker process."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"SessionActor" in (proc / "cmdline").read_bytes():
                found.append((int(proc.name), *_rollup(proc)))
        except OSError:
            continue
    return found


class Probe:
    """A ``bench.readyprobe`` process: one controller, told what to do one line at a time."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.label = label
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env
            )
        self.log = log
        self._buffer = b""

    def answer(self, timeout: float = 180) -> dict[str, Any]:
        """The next line of JSON it prints (other lines, such as Ray's, are skipped)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    answer = json.loads(line)
                    if isinstance(answer, dict):
                        return answer
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
            chunk = os.read(self.process.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                tail = self.log.read_text(errors="replace")[-1500:]
                why = "exited" if ready else f"did not answer within {timeout:.0f} s"
                raise RuntimeError(f"the {self.label} controller {why}: {tail}")
            self._buffer += chunk

    def ask(self, command: str, timeout: float = 180) -> dict[str, Any]:
        """Send one command and return its answer."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()
        return self.answer(timeout)

    def close(self) -> None:
        """End its input (the controller stops its sessions and exits); kill it if it hangs."""
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _missing_for_sessions() -> str | None:
    """Why the local driver cannot run sessions here, or None."""
    for program in ("Xvnc", "xterm", "tmux", "bwrap", "unshare", "nsenter"):
        if shutil.which(program) is None:
            return f"{program} is not installed (run `make test` once to install it)"
    return None


def _mib(memory: Memory, label: str) -> list[str]:
    return [
        label,
        str(memory.processes),
        f"{memory.pss:.0f}",
        f"{memory.rss:.0f}",
        f"{memory.pss - memory.holder_pss:.0f}",
        f"{memory.rss - memory.holder_rss:.0f}",
    ]


def _ready_row(label: str, samples: list[float], count: int) -> list[str]:
    return [
        label,
        f"{len(samples)} of {count}",
        fmt(_ms(percentile(samples, 0.5))),
        fmt(_ms(percentile(samples, 0.9))),
        fmt(_ms(max(samples) if samples else None)),
    ]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _left_behind(prefix: str, workdir: Path) -> list[str]:
    """What a cluster (``prefix``) or a probe (its data dir under ``workdir``) left behind."""
    from tests.ray_cluster import leftovers, processes_naming

    left = leftovers(prefix)
    left += [f"process {pid}: {cmd[:120]}" for pid, cmd in processes_naming(str(workdir))]
    if left:
        print(f"bench.cluster: left behind: {left}", file=sys.stderr, flush=True)
    return left


def _teardown_note(left: list[str]) -> str:
    if not left:
        return "teardown: nothing left (tests.ray_cluster.leftovers: no namespace, link or process)"
    return f"teardown LEFT: {'; '.join(left)[:500]}"


def _cluster_probe(cluster: Cluster, label: str, workdir: Path) -> Probe:
    """A controller with the cluster driver in the cluster's controller namespace (egress
    none: the test network has no way out), over Ray's TLS when the cluster has it."""
    argv = ["ip", "netns", "exec", cluster.controller_netns, sys.executable, "-m"]
    argv += ["bench.readyprobe", "--driver", "cluster", "--cluster-address", cluster.address]
    argv += ["--cluster-token-file", str(cluster.token_path), "--egress", "none"]
    argv += ["--data-dir", str(cluster.root / "ctl")]
    if "controller" in cluster.tls_dirs:
        argv += ["--cluster-tls-dir", str(cluster.tls_dirs["controller"])]
    return Probe(label, argv, cluster.env(token=False), workdir / f"{label}.log")


def _start_probes(cluster: Cluster, workdir: Path) -> list[Probe]:
    """The cluster controller (in the controller's namespace), then the embedded ones (here)."""
    argv = [sys.executable, "-m", "bench.readyprobe"]
    probes = [_cluster_probe(cluster, "cluster", workdir)]
    here = dict(os.environ, PYTHONPATH=cluster.env()["PYTHONPATH"])
    for egress in ("none", "open"):
        local = [*argv, "--driver", "local", "--egress", egress]
        local += ["--data-dir", str(workdir / f"local-{egress}")]
        probes.append(Probe(f"embedded ({egress})", local, here, workdir / f"{egress}.log"))
    return probes


def _time_rounds(probes: list[Probe], rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Create to ready, one session of each probe per round, in a rotated order."""
    times: dict[str, list[float]] = {probe.label: [] for probe in probes}
    errors: list[str] = []
    for index in range(rounds):
        turn = index % len(probes)
        for probe in probes[turn:] + probes[:turn]:
            answer = probe.ask("time")
            if "seconds" in answer:
                times[probe.label].append(float(answer["seconds"]))
            else:
                errors.append(f"{probe.label}: {answer.get('error')}")
    return times, errors


def _memory_with_a_session(cluster: Cluster, probe: Probe, notes: list[str]) -> list[list[str]]:
    """Rows for the worker that runs one held session, and for that session's actor process.

    Names the processes the session added to its node's namespace in ``notes``.
    """
    assert cluster.workers[0].process is not None
    idle = Counter(_node_memory(cluster.workers[0].process.pid).names)
    held = probe.ask("hold")
    if "held" not in held:
        raise RuntimeError(f"the cluster did not hold a session: {held.get('error')}")
    rows = []
    for pid, pss, rss in _actor_memory():
        for node in cluster.workers:
            assert node.process is not None
            space = os.readlink(f"/proc/{_namespace_init(node.process.pid)}/ns/pid")
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/pid") == space:
                    node_memory = _node_memory(node.process.pid)
                    rows.append(_mib(node_memory, f"{node.name}, one session"))
                    added = sorted((Counter(node_memory.names) - idle).elements())
                    notes.append(f"{node.name}'s processes with one session: idle + {added}")
                    actor = Memory(1, pss, rss, 0.0, 0.0)
                    rows.append(_mib(actor, "one session actor's Ray worker process"))
    probe.ask("release")
    return rows


def _time_under_tls(rounds: int, workdir: Path) -> tuple[list[float], list[str], str]:
    """Create to ready on a second cluster whose Ray traffic is under TLS: the times, errors
    and what its teardown left."""
    from tests.ray_cluster import ray_cluster

    prefix = f"rt{os.getpid() % 10000}"
    root = Path("/tmp") / prefix
    times: dict[str, list[float]] = {}
    errors: list[str] = []
    try:
        with ray_cluster(root, workers=2, slots=2, prefix=prefix, tls=True) as cluster:
            probe = _cluster_probe(cluster, "cluster, Ray TLS", workdir)
            try:
                probe.answer()
                times, errors = _time_rounds([probe], rounds)
            finally:
                probe.close()
    finally:
        left = _left_behind(prefix, workdir)
    return times.get("cluster, Ray TLS", []), errors, _teardown_note(left)


def _sessions(quick: bool, workdir: Path) -> list[Section]:
    """Create to ready through the cluster driver and the embedded default; memory per host."""
    from tests.ray_cluster import ray_cluster

    title = "Ray cluster: create to ready, cluster driver against the embedded default"
    memory_title = "Ray cluster: memory each host spends on Ray"
    why = _missing_for_sessions()
    if why is not None:
        return [Section(title, skipped=why), Section(memory_title, skipped=why)]
    rounds = 5 if quick else 8
    prefix = f"rs{os.getpid() % 10000}"
    root = Path("/tmp") / prefix  # short: the hosts' Unix socket paths must fit
    columns = ["node", "processes", "PSS MiB", "RSS MiB"]
    memory = Section(memory_title, [*columns, "PSS without holder", "RSS without holder"])
    started = time.monotonic()
    try:
        with ray_cluster(root, workers=2, slots=2, prefix=prefix) as cluster:
            up = time.monotonic() - started
            for node in [cluster.head, *cluster.workers]:
                assert node.process is not None
                label = f"{node.name}, no session"
                memory.rows.append(_mib(_node_memory(node.process.pid), label))
            probes: list[Probe] = []
            try:
                probes += _start_probes(cluster, workdir)
                for probe in probes:
                    probe.answer()
                times, errors = _time_rounds(probes, rounds)
                controllers = {probe.label: probe.ask("memory") for probe in probes[:2]}
                memory.rows += _memory_with_a_session(cluster, probes[0], memory.notes)
            finally:
                for probe in probes:
                    probe.close()
            for label, figures in controllers.items():
                count = int(figures["processes"])
                process = Memory(count, figures["pss"], figures["rss"], 0.0, 0.0)
                memory.rows.append(_mib(process, f"controller process, {label}"))
    finally:
        left = _left_behind(prefix, workdir)
    tls_times, tls_errors, tls_left = _time_under_tls(rounds, workdir)
    errors += [f"Ray TLS: {message}" for message in tls_errors]
    section = Section(title, ["controller", "sessions ready", "p50 ms", "p90 ms", "max ms"])
    cluster_times = times.get("cluster", [])
    embedded = times.get("embedded (none)", [])
    default = times.get("embedded (open)", [])
    section.rows = [
        _ready_row("cluster driver: head + 2 workers", cluster_times, rounds),
        _ready_row("embedded, local driver, egress none (as the hosts run it)", embedded, rounds),
        _ready_row("embedded, local driver, egress open (the default)", default, rounds),
        [
            "cluster / embedded (egress none)",
            "",
            ratio(percentile(cluster_times, 0.5), percentile(embedded, 0.5)),
            ratio(percentile(cluster_times, 0.9), percentile(embedded, 0.9)),
            ratio(max(cluster_times, default=None), max(embedded, default=None)),
        ],
        _ready_row("cluster driver, Ray's traffic under TLS (another cluster)", tls_times, rounds),
        [
            "cluster, Ray TLS / cluster, plain",
            "",
            ratio(percentile(tls_times, 0.5), percentile(cluster_times, 0.5)),
            ratio(percentile(tls_times, 0.9), percentile(cluster_times, 0.9)),
            ratio(max(tls_times, default=None), max(cluster_times, default=None)),
        ],
    ]
    section.notes = [
        f"{rounds} shell sessions per controller, in interleaved rounds, each timed from "
        "POST /api/sessions to its event stream's first `ready` (the driver read the VNC "
        "server's RFB banner; for the cluster, the host's local driver inside the session's "
        "actor, with the session's channel open), then deleted and stopped before the next; "
        "the same code (`bench/readyprobe.py`, controller and client in one process) times "
        "every controller.",
        f"cluster: head (no slots) and 2 workers of 2 slots, up in {up:.1f} s; its controller "
        "runs in the cluster's controller namespace, the embedded ones on this host.",
        _teardown_note(left),
        "Ray TLS: the same head and 2 workers, started afterwards with every Ray process "
        "under TLS (`cluster tls-ca`, `tls-cert`, `--tls-dir`), timed by its own controller; "
        + tls_left,
    ]
    section.notes += [f"error: {message}" for message in errors[:5]]
    memory.notes[:0] = [
        "Each node's own PID namespace (processes and PSS/RSS summed), read before any session "
        "and again with one session held on the cluster; 'without holder' leaves out the "
        "`ray start --block` that holds the namespace (a real host's `ray start` exits once "
        "the node runs). A session's own processes (Xvnc, tmux, xterm, under bubblewrap) are "
        "in a nested PID namespace and are not counted: they are the same with either driver.",
        "controller process: PSS/RSS of the controller process (and any child) after its "
        "timed sessions, none running, on the controller's host; the cluster one is a Ray "
        "driver (Ray imported, connected to the GCS), the embedded one runs the local driver.",
    ]
    return [section, memory]


def run(quick: bool, workdir: Path) -> list[Section]:
    """Sessions on one cluster against the embedded default; then host loss, tuned (and unless
    quick, Ray's defaults), each with both kinds of failure."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return [Section("Ray cluster", skipped="needs root and iproute2 (network namespaces)")]
    try:
        from tests.ray_cluster import ray_cluster
    except ImportError as exc:
        return [Section("Ray cluster", skipped=f"needs ray (pip install -e '.[cluster]'): {exc}")]
    from remotecli.cluster.nodes import HEALTH_CHECK

    sections = _sessions(quick, workdir)

    settings: list[tuple[str, dict[str, int] | None]] = [("tuned", None)]
    if not quick:
        settings.append(("Ray's defaults", {}))
    rows: list[list[str]] = []
    prefix = f"rb{os.getpid() % 10000}"
    for label, config in settings:
        for how in ("kill", "cut"):
            root = workdir / f"{len(rows)}"
            started = time.monotonic()
            with ray_cluster(root, system_config=config, prefix=prefix) as c:
                up = time.monotonic() - started
                signals = root / "signals"
                signals.mkdir()
                code = f"ADDRESS = {c.address!r}\nSIGNALS = {str(signals)!r}\n{DRIVER}"
                driver = c.popen_python(code)
                while not (signals / "placed").exists():
                    if driver.poll() is not None:
                        raise RuntimeError(driver.communicate()[1][-2000:])
                    time.sleep(0.05)
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
            _teardown_note(_left_behind(prefix, workdir)),
        ],
    )
    return [*sections, figures]
