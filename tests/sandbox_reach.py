"""What a session's sandbox on a cluster host can reach, run inside that host's network namespace.

``tests/e2e/test_cluster_sandbox_reach.py`` runs :func:`main` under ``nsenter --net`` in a
worker's namespace, as root, as the host's session actor runs its local driver. It lists the
TCP ports listening on the host's addresses (``ss -ltnpH``: the raylet, Ray's agents, the object
manager), opens a live :class:`SessionChannel` on that address, and adds the head's GCS. The
same probe (:data:`PROBE`, Debian's python3) then connects to every target twice over: from
this namespace as a plain process (each must answer, or the probe proves nothing), and from a
headless run of a real :class:`LocalDriver` sandbox, once per egress mode. It prints one
``RESULT`` line of JSON; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from remotecli.cluster.channel import SessionChannel, new_secret
from remotecli.drivers.base import SessionSpec
from remotecli.drivers.local import LocalDriver
from remotecli.sandbox.egress import DEFAULT_TABLE, EgressFilter

PYTHON = "/usr/bin/python3"
"""Debian's python3: the one the sandbox shows (its system directories), and the same outside."""

# Connects to every HOST:PORT argument at once; prints one JSON object, target -> "open",
# "refused", "unreachable", "timeout" or another errno name.
PROBE = textwrap.dedent(
    """
    import errno, json, socket, sys, threading
    timeout = float(sys.argv[1])
    results = {}
    def probe(target):
        host, _, port = target.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                results[target] = "open"
        except TimeoutError:
            results[target] = "timeout"
        except ConnectionRefusedError:
            results[target] = "refused"
        except OSError as exc:
            unreachable = (errno.ENETUNREACH, errno.EHOSTUNREACH)
            name = errno.errorcode.get(exc.errno or 0, str(exc))
            results[target] = "unreachable" if exc.errno in unreachable else name
    threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)
    """
)

_PROCESS = re.compile(r'users:\(\("([^"]+)"')


def listeners(address: str, alias: str) -> dict[str, str]:
    """Return ``host:port`` -> process name for each TCP listener reached at the host's addresses.

    A socket bound to ``address`` is reached there; one bound to a wildcard (``0.0.0.0``, ``*``,
    ``[::]``) at ``address`` and at ``alias`` too (a second address of the host, which pasta
    does not copy into the sandbox: only the firewall rule stands between them).
    """
    table = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    found: dict[str, str] = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        host, _, port = fields[3].rpartition(":")
        match = _PROCESS.search(line)
        name = match.group(1) if match else "?"
        if host in (address, "0.0.0.0", "*", "[::]"):
            found[f"{address}:{port}"] = name
        if host in ("0.0.0.0", "*", "[::]"):
            found[f"{alias}:{port}"] = name
    return found


def rejected_packets() -> int:
    """Return how many packets the egress rule's reject counters have counted here."""
    table = subprocess.run(
        ["nft", "list", "table", "inet", DEFAULT_TABLE],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", table))


async def probe(argv: list[str]) -> dict[str, str]:
    """Run a probe command outside any sandbox and return its outcomes."""
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    outcome: dict[str, str] = json.loads(stdout)
    return outcome


async def sandboxed(
    data_dir: Path, egress: str, argv: list[str]
) -> tuple[dict[str, str], dict[str, Any]]:
    """Run ``argv`` as a headless run of a LocalDriver with ``egress``; return outcomes and facts.

    The facts: the driver's egress and its reason, the run's exit status and errors, the
    session cgroups that existed before :meth:`LocalDriver.stop` and those left after it, and
    for ``open`` the packets the driver's firewall rule rejected.
    """
    driver = LocalDriver(data_dir / egress, egress=egress)
    session_id = f"reach-{egress}-{os.getpid()}"
    spec = SessionSpec(
        session_id=session_id,
        provider="shell",
        command=argv,
        workdir=data_dir / egress / "s" / session_id,
    )
    parents = driver.cgroups.parents if driver.cgroups is not None else ()
    try:
        run = await driver.start_run(spec, lambda _: None)
        output = b""
        while chunk := await run.read():
            output += chunk
        status = await run.wait()
        made = [str(p / session_id) for p in parents if (p / session_id).exists()]
    finally:
        await driver.stop(session_id)
    facts = {
        "egress": driver.egress,
        "reason": driver.egress_reason,
        "status": status,
        "errors": run.errors(),
        "cgroups_made": made,
        "cgroups_left": [str(p / session_id) for p in parents if (p / session_id).exists()],
        "workdir_left": spec.workdir.exists(),
    }
    if driver.egress == "open" and driver.uids is not None:
        facts["rejected"] = rejected_packets()
        # The rule lives in this namespace only; remove it rather than leave it to the netns.
        EgressFilter(DEFAULT_TABLE, driver.uids.first, driver.uids.last, ()).remove()
    outcome: dict[str, str] = json.loads(output) if output.strip() else {}
    return outcome, facts


async def main(
    data_dir: Path, address: str, alias: str, head_target: str, timeout: float
) -> dict[str, Any]:
    """Probe every target from outside the sandbox and from inside it, egress none and open."""
    labels = listeners(address, alias)
    channel = SessionChannel(new_secret(), str(data_dir / "no-vnc.sock"))
    channel_port = await channel.listen(address)
    labels[f"{address}:{channel_port}"] = "session channel"
    labels[head_target] = "head GCS"
    argv = [PYTHON, "-c", PROBE, str(timeout), *labels]
    try:
        outside = await probe(argv)
        inside: dict[str, dict[str, str]] = {}
        facts: dict[str, dict[str, Any]] = {}
        for egress in ("none", "open"):
            inside[egress], facts[egress] = await sandboxed(data_dir, egress, argv)
        seen = channel.refused  # every connection without the secret, counted when it closes
    finally:
        await channel.close()
    return {
        "targets": labels,
        "outside": outside,
        "inside": inside,
        "facts": facts,
        "channel_connections": seen,
    }


if __name__ == "__main__":
    data, worker, alias, head, seconds = sys.argv[1:6]
    result = asyncio.run(main(Path(data), worker, alias, head, float(seconds)))
    print("RESULT " + json.dumps(result), flush=True)
