"""A controller whose cluster hosts run microVMs, in the test cluster's controller namespace.

``tests/e2e/test_qemu_sessions_on_cluster.py`` runs :func:`main` there: a controller as
``remotecli up`` runs it (gateway, API, bridge; SQLite) with ``driver = "cluster"`` and
``cluster_host_driver = "qemu"``, driven through its HTTP API and the gateway's WebSocket paths
as a browser would. It prints one ``RESULT`` line of JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from remotecli.client import AsyncClient
from remotecli.cluster import placement
from remotecli.controller.server import Controller
from remotecli.drivers.qemu_machine import guest_hostname
from tests.cluster_controller import (
    admin_api,
    controller_config,
    report_of,
    state_of,
    stop_all,
    typed_in_text_view,
    viewer_init,
)
from tests.conftest import MS
from tests.e2e.sessions_api import create_ready_session
from tests.ray_cluster import processes_naming

START_TIMEOUT = 300_000 * MS
"""A first session may wait for its host to make the shell's template (minutes under TCG)."""
TIMEOUT = 60_000 * MS


def qemus_of(session_id: str) -> list[tuple[int, str]]:
    """The QEMU processes of a session (its files are under ``.../s/ID/`` on its host)."""
    return [
        found
        for found in processes_naming(f"/s/{session_id}/")
        if "qemu-system" in found[1].split(" ", 1)[0]
    ]


async def headless(controller: Controller) -> dict[str, Any]:
    """``POST /api/runs`` of the shell on a microVM host: what streamed and how it ended."""
    async with AsyncClient(controller.url(), controller.admin_token, timeout=TIMEOUT) as client:
        run = await client.create_run("shell", "echo run-$((6 * 7)) on $(uname -n)")
        events = []
        async with asyncio.timeout(START_TIMEOUT):
            async for event in client.events(run["id"]):
                events.append([event.type, event.data])
        state = (await client.run(run["id"]))["state"]
    return {"id": run["id"], "guest": guest_hostname(run["id"]), "events": events, "state": state}


async def run(address: str, token_file: Path, data_dir: Path) -> dict[str, Any]:
    config = controller_config(
        address, token_file, data_dir, None, cluster_host_driver="qemu", egress="none"
    )
    controller = Controller(config)
    await controller.start()
    result: dict[str, Any] = {}
    try:
        base = controller.url()
        async with admin_api(controller) as api:
            began = time.monotonic()
            ids = [await create_ready_session(api, START_TIMEOUT)]
            result["first_ready_s"] = time.monotonic() - began
            began = time.monotonic()
            ids.append(await create_ready_session(api, START_TIMEOUT))
            result["second_ready_s"] = time.monotonic() - began
            placed = {sid: await asyncio.to_thread(placement.find_session, sid) for sid in ids}
            result["hosts"] = {sid: p.host for sid, p in placed.items() if p is not None}
            result["passwords"] = [
                p is not None and p.vnc_password is not None for p in placed.values()
            ]
            reports = [await asyncio.to_thread(report_of, sid) for sid in ids]
            result["drivers"] = [report.get("driver") for report in reports]
            result["network"] = [report.get("network") for report in reports]
            result["api_hosts"] = [(await state_of(api, sid))["host"] for sid in ids]
            result["inits"] = [await viewer_init(base, api, sid) for sid in ids]
            guest = guest_hostname(ids[0])  # the VM's, never the worker's
            result["typed"] = await typed_in_text_view(
                base, api, ids[0], "echo vm-$((6 * 7))-ok on $(uname -n)", f"vm-42-ok on {guest}"
            )
            result["guest"] = guest
            result["run"] = await headless(controller)
            result["qemus"] = {sid: len(qemus_of(sid)) for sid in ids}
            await stop_all(api, ids)
            async with asyncio.timeout(TIMEOUT):
                while any(qemus_of(sid) for sid in ids):
                    await asyncio.sleep(0.1)
            result["states"] = [(await state_of(api, sid))["state"] for sid in ids]
            result["ids"] = ids
            result["actors_left"] = [
                sid for sid in [*ids, result["run"]["id"]] if placement.find_session(sid)
            ]
    finally:
        await controller.close()
    return result


def main() -> None:
    address, token_file, data_dir = sys.argv[1:4]
    result = asyncio.run(run(address, Path(token_file), Path(data_dir)))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
