"""A controller and an API client in one process, creating sessions when told to.

``bench/cluster.py`` runs it once with the cluster driver (inside the test cluster's controller
namespace, where the cluster's addresses exist) and once or more with the local driver (on this
host), in the same run, so both are timed by the same code. It prints ``{"up": true}`` once its
controller serves, then answers each command read from stdin with one line of JSON on stdout:

- ``time``: create a ``shell`` session through ``POST /api/sessions`` and time it until the
  session's event stream (``GET /api/sessions/{id}/events``) first says ``ready``, as
  ``tests/e2e/sessions_api.py`` counts it; then delete it and wait until it is ``stopped``
  (not timed), so the next one finds a free slot. Answers ``{"seconds": S}`` or ``{"error": E}``.
- ``hold``: create one and leave it ready; answers ``{"held": ID}``.
- ``memory``: PSS and RSS (MiB) of this process and its descendants, and how many processes
  that is: ``{"pss": P, "rss": R, "processes": N}``.
- ``release``: delete the held sessions and wait until they are stopped; ``{"released": N}``.

End of input closes the controller (which stops whatever still runs) and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller

TIMEOUT = 120.0


def _say(answer: dict[str, Any]) -> None:
    print(json.dumps(answer), flush=True)


async def _ready(api: httpx.AsyncClient) -> str:
    """Create a shell session and return its id once its event stream says ``ready``."""
    created = await api.post("/api/sessions", json={"provider": "shell"})
    if created.status_code != 201:
        raise RuntimeError(f"POST /api/sessions answered {created.status_code}: {created.text}")
    session_id: str = created.json()["id"]
    async with api.stream("GET", f"/api/sessions/{session_id}/events") as events:
        async for line in events.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line.removeprefix("data:"))
            state = event.get("state")
            if state in ("failed", "stopped"):
                raise RuntimeError(f"session {session_id} {state}: {event.get('reason')}")
            if state == "ready":
                return session_id
    raise RuntimeError(f"the event stream of {session_id} ended before ready")


async def _stop(api: httpx.AsyncClient, session_id: str) -> None:
    """Delete the session and wait until it has stopped (or failed)."""
    await api.delete(f"/api/sessions/{session_id}")
    while (await api.get(f"/api/sessions/{session_id}")).json()["state"] not in (
        "stopped",
        "failed",
    ):
        await asyncio.sleep(0.05)


def _memory() -> dict[str, float]:
    """PSS and RSS (MiB) of this process and every descendant, and their number."""
    pids, pss, rss, count = [os.getpid()], 0, 0, 0
    while pids:
        pid = pids.pop()
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in rollup)
        count += 1
        pss += int(fields["Pss"].split()[0])
        rss += int(fields["Rss"].split()[0])
    return {"pss": pss / 1024, "rss": rss / 1024, "processes": count}


async def _serve_commands(api: httpx.AsyncClient) -> None:
    held: list[str] = []
    while command := (await asyncio.to_thread(sys.stdin.readline)).strip():
        try:
            async with asyncio.timeout(TIMEOUT):
                if command == "time":
                    began = time.perf_counter()
                    session_id = await _ready(api)
                    seconds = time.perf_counter() - began
                    await _stop(api, session_id)
                    _say({"seconds": seconds})
                elif command == "hold":
                    held.append(await _ready(api))
                    _say({"held": held[-1]})
                elif command == "memory":
                    _say(_memory())
                elif command == "release":
                    for session_id in held:
                        await _stop(api, session_id)
                    _say({"released": len(held)})
                    held.clear()
                else:
                    _say({"error": f"unknown command {command!r}"})
        except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
            _say({"error": f"{type(exc).__name__}: {exc}"[:300]})


async def _main(config: ControllerConfig) -> None:
    controller = Controller(config)
    await controller.start()
    try:
        headers = {"Authorization": f"Bearer {controller.admin_token}"}
        async with httpx.AsyncClient(
            base_url=controller.url(), headers=headers, timeout=TIMEOUT
        ) as api:
            _say({"up": True})
            await _serve_commands(api)
    finally:
        await controller.close()


def main() -> None:
    """Start the controller the arguments describe and serve commands until end of input."""
    parser = argparse.ArgumentParser(prog="python -m bench.readyprobe")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--driver", choices=("local", "cluster"), default="local")
    parser.add_argument("--egress", choices=("open", "none"), default="open")
    parser.add_argument("--cluster-address")
    parser.add_argument("--cluster-token-file", type=Path)
    parser.add_argument("--cluster-tls-dir", type=Path)
    args = parser.parse_args()
    config = ControllerConfig(
        listen=("127.0.0.1", 0),
        data_dir=args.data_dir,
        driver=args.driver,
        egress=args.egress,
        cluster_address=args.cluster_address,
        cluster_token_file=args.cluster_token_file,
        cluster_tls_dir=args.cluster_tls_dir,
        create_rate=None,  # one user creates them all, as fast as it can
        log_level="warning",
    )
    asyncio.run(_main(config))


if __name__ == "__main__":
    main()
