"""A controller with the cluster driver, run inside the test cluster's controller namespace.

``tests/e2e/test_cluster_driver.py`` runs :func:`main` there (the cluster's addresses exist
only in its namespaces): the controller as ``remotecli up`` runs it (gateway, API, bridge),
driven through its HTTP API and the gateway's WebSocket path, as a browser would. It writes
``placed`` in ``signals`` once its sessions run, waits for the test to write ``failed`` (after
killing a worker), and prints one ``RESULT`` line of JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ray
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from remotecli.client import AsyncClient
from remotecli.cluster import placement
from remotecli.cluster.channel import preamble
from remotecli.cluster.channel_tls import client_context
from remotecli.config import ControllerConfig, ProviderConfig
from remotecli.controller.identity import ADMIN_USER
from remotecli.controller.server import Controller
from remotecli.exceptions import ClusterError
from tests.conftest import MS
from tests.e2e.sessions_api import create_ready_session
from tests.rfb_viewer import RfbViewer

TIMEOUT = 60_000 * MS
ADMIN_TOKEN = "cluster-admin-token-" + "0" * 24
SHARED_SESSIONS = 6
SESSION_MEMORY = 1536 * 1024**2
TAKEOVER_AFTER = 15.0
"""The shortest ``controller_takeover_after`` allowed (three heartbeats)."""
LOOPBACK_PORT = 8765
"""Where the text view starts a web server on a session's loopback (the callback relay's)."""
KEEPER = "keeper"
KEPT = b'{"token": "kept-before"}'
KEEPER_COMMAND = (
    "sh",
    "-c",
    "cp ~/.standin/credentials.json ~/.standin/seen.json && "
    "printf refreshed > ~/.standin/token && exec sleep 3600",
)
"""A provider that keeps ``~/.standin``: it copies the sign-in it started with and adds a file,
as a CLI refreshing its token would."""
KEEPER_RUN = (
    "sh",
    "-c",
    'echo first; sleep 1; cat ~/.standin/token; echo; echo "$0"; '
    "printf run-refreshed > ~/.standin/token",
    "{prompt}",
)
"""Its headless command: a line, a pause, the token the kept sign-in brought, the prompt; then
it rotates the token, as a CLI would during a run."""


def channel_socket(host: str, port: int, cert: str | None) -> socket.socket:
    """Connect to a channel: inside TLS pinning ``cert``, or plain TCP when it is None."""
    sock = socket.create_connection((host, port), timeout=10)
    return sock if cert is None else client_context(cert).wrap_socket(sock)


def raw_answer(host: str, port: int, first: bytes | None, cert: str | None = None) -> bytes:
    """Connect to a channel, send ``first`` (or nothing), and return all it sends back."""
    with channel_socket(host, port, cert) as sock:
        if first is not None:
            sock.sendall(first)
        sock.settimeout(8)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except TimeoutError:
            received += b"<no close>"
        return received


async def viewer_init(base: str, api: httpx.AsyncClient, session_id: str) -> list[int]:
    """Open the gateway's VNC path with a ticket and return ServerInit's framebuffer size."""
    ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
    url = f"ws{base.removeprefix('http')}/api/sessions/{session_id}/vnc?ticket={ticket}"
    async with connect(url, subprotocols=[Subprotocol("binary")], max_size=None) as ws:

        async def receive() -> bytes:
            data = await ws.recv()
            assert isinstance(data, bytes)
            return data

        init = await asyncio.wait_for(RfbViewer(receive, ws.send).handshake(), TIMEOUT)
        return [init.width, init.height]


async def typed_in_text_view(
    base: str, api: httpx.AsyncClient, session_id: str, command: str, expect: str
) -> str:
    """Open the session's text view at the gateway ``base``, type ``command`` and Return, and
    return ``expect`` once the terminal showed it."""
    ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
    url = f"ws{base.removeprefix('http')}/api/sessions/{session_id}/tty?ticket={ticket}"
    async with connect(url, subprotocols=[Subprotocol("tty")], max_size=None) as ws:
        await ws.send(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
        await ws.send(f"{command}\r".encode())
        seen = b""
        async with asyncio.timeout(TIMEOUT):
            while expect.encode() not in seen:
                message = await ws.recv()
                seen += message if isinstance(message, bytes) else message.encode()
    return expect


async def callback(api: httpx.AsyncClient, session_id: str) -> list[Any]:
    """Relay a sign-in callback to ``localhost:LOOPBACK_PORT`` in the session: status, answer."""
    url = f"http://localhost:{LOOPBACK_PORT}/"
    answer = await api.post(f"/api/sessions/{session_id}/callback", json={"url": url})
    return [answer.status_code, answer.json()]


async def text_view_and_loopback(
    base: str, api: httpx.AsyncClient, session_id: str
) -> dict[str, Any]:
    """Run a command typed into the session's text view, then start a web server on the
    session's loopback from it and relay a sign-in callback to that.

    Returns what the terminal showed, and the callback relay's answers before the server
    listens and once it does.
    """
    result: dict[str, Any] = {}
    result["text"] = await typed_in_text_view(
        base, api, session_id, "echo tty-$((6 * 7))-ok", "tty-42-ok"
    )
    result["before"] = await callback(api, session_id)
    server = f"/usr/bin/python3 -m http.server {LOOPBACK_PORT} --bind 127.0.0.1"
    started = f"cd ~ && ({server} >/dev/null 2>&1 &) && echo server-$((1 + 1))"
    await typed_in_text_view(base, api, session_id, started, "server-2")
    async with asyncio.timeout(TIMEOUT):
        while (after := await callback(api, session_id))[0] != 200:
            await asyncio.sleep(0.1)
    result["after"] = after[1]
    return result


async def state_of(api: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.get(f"/api/sessions/{session_id}")).json()
    return body


def actor(session_id: str) -> Any:
    """The session's Ray actor, by name."""
    return ray.get_actor(placement.actor_name(session_id), namespace=placement.NAMESPACE)


def report_of(session_id: str) -> dict[str, Any]:
    """What the session's actor reported when it started."""
    report: dict[str, Any] = ray.get(actor(session_id).start_report.remote())
    return report


async def hosts_when(
    api: httpx.AsyncClient, done: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    """Poll /readyz's hosts (by name) until ``done`` says so; the last seen after 15 s."""
    deadline = time.monotonic() + 15_000 * MS
    while True:
        hosts = {h["name"]: h for h in (await api.get("/readyz")).json().get("hosts", [])}
        if done(hosts) or time.monotonic() > deadline:
            return hosts
        await asyncio.sleep(0.2)


async def stop_all(api: httpx.AsyncClient, ids: list[str]) -> None:
    """Delete the sessions and wait until each is stopped."""
    for sid in ids:
        await api.delete(f"/api/sessions/{sid}")
    async with asyncio.timeout(TIMEOUT):
        for sid in ids:
            while (await state_of(api, sid))["state"] not in ("stopped", "failed"):
                await asyncio.sleep(0.05)


def admin_api(controller: Controller) -> httpx.AsyncClient:
    """An HTTP client of ``controller``'s API as its admin."""
    headers = {"Authorization": f"Bearer {controller.admin_token}"}
    return httpx.AsyncClient(base_url=controller.url(), headers=headers, timeout=TIMEOUT)


def controller_config(
    address: str, token_file: Path, data_dir: Path, store_url: str | None, **extra: Any
) -> ControllerConfig:
    """A controller with the cluster driver, on ``store_url`` (None: SQLite in ``data_dir``);
    a silent one's sessions are taken over after :data:`TAKEOVER_AFTER`. With Ray's TLS on,
    its certificate is ``REMOTECLI_CLUSTER_TLS_DIR``'s, as ``remotecli up`` would read it
    (the harness also set Ray's variables: this program imports Ray before the config)."""
    tls_dir = os.environ.get("REMOTECLI_CLUSTER_TLS_DIR")
    return ControllerConfig(
        cluster_tls_dir=Path(tls_dir) if tls_dir else None,
        listen=("127.0.0.1", 0),
        data_dir=data_dir,
        driver="cluster",
        cluster_address=address,
        cluster_token_file=token_file,
        create_rate=None,
        max_sessions=16,  # a user alone may hold 16 // 2 = 8 (the fair share)
        max_sessions_per_user=8,
        store_url=store_url,
        admin_token=ADMIN_TOKEN,
        providers=(ProviderConfig(KEEPER, KEEPER_COMMAND, keep=("~/.standin",), run=KEEPER_RUN),),
        controller_takeover_after=TAKEOVER_AFTER,
        session_memory=SESSION_MEMORY,  # the hosts' sessions get the controller's limits
        session_processes=512,
        session_cpus=0.5,
        **extra,
    )


async def taken_over(
    controller: Controller, api: httpx.AsyncClient, session_id: str, silent: str
) -> dict[str, Any]:
    """Wait until ``controller`` adopted ``session_id`` from ``silent`` (a controller gone
    quiet); type into it through this controller's gateway, read the file back, delete it here;
    say what held and how long after the silent one's last heartbeat it was adopted."""
    store, manager = controller.store, controller.manager
    assert store is not None
    assert manager is not None
    last_beat = store.controllers()[silent]
    async with asyncio.timeout(TAKEOVER_AFTER + TIMEOUT):
        while (record := store.session(session_id)).controller != manager.controller_id:
            await asyncio.sleep(0.2)
    result: dict[str, Any] = {
        "seconds": time.time() - last_beat,
        "state": record.state.value,
        "init": await typed_through(
            controller.url(), api, session_id, f"echo taken-{session_id} > ~/typed"
        ),
    }
    async with asyncio.timeout(TIMEOUT):
        while b"taken-" not in (held := await manager.driver.collect(session_id, ["~/typed"])).get(
            "typed", b""
        ):
            await asyncio.sleep(0.1)
    result["typed"] = held["typed"].decode().strip()
    result["stopped"] = (await api.delete(f"/api/sessions/{session_id}")).json()["state"]
    return result


async def typed_through(base: str, api: httpx.AsyncClient, session_id: str, text: str) -> list[int]:
    """Open the VNC path at the gateway ``base``, shake hands, type ``text`` and Return."""
    ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
    url = f"ws{base.removeprefix('http')}/api/sessions/{session_id}/vnc?ticket={ticket}"
    async with connect(url, subprotocols=[Subprotocol("binary")], max_size=None) as ws:

        async def receive() -> bytes:
            data = await ws.recv()
            assert isinstance(data, bytes)
            return data

        viewer = RfbViewer(receive, ws.send)
        init = await asyncio.wait_for(viewer.handshake(), TIMEOUT)
        await viewer.wait_non_blank(TIMEOUT)  # the terminal is drawn: keys reach the shell
        await viewer.type(text + "\n")
        await asyncio.wait_for(viewer.framebuffer_update(), TIMEOUT)  # the keys were processed
        return [init.width, init.height]


async def shared(controllers: list[Controller], apis: list[httpx.AsyncClient]) -> dict[str, Any]:
    """Two controllers on one database: six sessions, made alternately at each; each viewed and
    typed into through the *other* controller's gateway, then deleted there too."""
    owners: dict[str, int] = {}
    for index in range(SHARED_SESSIONS):
        owners[await create_ready_session(apis[index % 2], TIMEOUT)] = index % 2
    placed = {sid: await asyncio.to_thread(placement.find_session, sid) for sid in owners}
    result: dict[str, Any] = {
        "hosts": {sid: p.host if p is not None else None for sid, p in placed.items()},
        "controllers": {
            sid: controllers[0].store.session(sid).controller if controllers[0].store else None
            for sid in owners
        },
        "inits": {},
        "typed": {},
    }

    for sid, mine in owners.items():
        other = 1 - mine
        text = f"echo typed-{sid} > ~/typed"
        result["inits"][sid] = await typed_through(controllers[other].url(), apis[other], sid, text)
    made_at_first = next(sid for sid, mine in owners.items() if mine == 0)
    result["text_elsewhere"] = await typed_in_text_view(
        controllers[1].url(), apis[1], made_at_first, "echo elsewhere-$((2 + 3))", "elsewhere-5"
    )
    result["callback_elsewhere"] = await callback(apis[1], made_at_first)
    for sid, mine in owners.items():
        manager = controllers[mine].manager
        assert manager is not None
        async with asyncio.timeout(TIMEOUT):
            while not (held := await manager.driver.collect(sid, ["~/typed"])).get("typed"):
                await asyncio.sleep(0.1)
        result["typed"][sid] = held["typed"].decode().strip()

    stopped = {}
    for sid, mine in owners.items():
        answer = await apis[1 - mine].delete(f"/api/sessions/{sid}")
        stopped[sid] = answer.json()["state"]
    result["stopped_elsewhere"] = stopped
    return result


async def run(
    address: str, token_file: Path, data_dir: Path, signals: Path, store_url: str | None
) -> dict[str, Any]:
    config = controller_config(address, token_file, data_dir, store_url)
    controller = Controller(config)
    await controller.start()
    result: dict[str, Any] = {}
    try:
        base = controller.url()
        async with admin_api(controller) as api:
            result["signin"] = await kept_signin(controller, api)
            result["run"] = await headless_run(controller)
            if store_url is not None:
                second = Controller(
                    controller_config(
                        address,
                        token_file,
                        data_dir.with_name("ctl-b"),
                        store_url,
                        on_shutdown="keep",  # its sessions outlive it: the first takes them
                    )
                )
                await second.start()
                closed = False
                try:
                    async with admin_api(second) as other:
                        result["shared"] = await shared([controller, second], [api, other])
                        left = await create_ready_session(other, TIMEOUT)
                    doomed, doomed_session, doomed_run, doomed_id = await start_doomed(
                        address, token_file, data_dir.with_name("ctl-c"), store_url
                    )
                    await second.close()
                    closed = True
                    doomed.kill()  # SIGKILL: no shutdown, its Ray driver dies with it
                    await doomed.wait()
                    assert second.manager is not None
                    silent = second.manager.controller_id
                    assert silent is not None
                    (
                        result["takeover"],
                        result["killed_takeover"],
                        result["killed_run"],
                    ) = await asyncio.gather(
                        taken_over(controller, api, left, silent),
                        taken_over(controller, api, doomed_session, doomed_id),
                        run_taken_over(controller, doomed_run),
                    )
                    result["killed_run"]["lost"] = doomed_id
                    result["takeover"]["session"] = left
                    result["killed_takeover"]["session"] = doomed_session
                finally:
                    if not closed:
                        await second.close()
            began = time.monotonic()
            first = await create_ready_session(api, TIMEOUT)
            result["create_to_ready"] = [time.monotonic() - began]
            ids = [first]
            for _ in range(3):  # one more than a host has slots: both are used
                began = time.monotonic()
                ids.append(await create_ready_session(api, TIMEOUT))
                result["create_to_ready"].append(time.monotonic() - began)
            placed = {sid: await asyncio.to_thread(placement.find_session, sid) for sid in ids}
            result["hosts"] = {sid: p.host for sid, p in placed.items() if p is not None}
            result["local_seconds"] = [p.local_seconds for p in placed.values() if p is not None]
            reports: list[dict[str, Any]] = [await asyncio.to_thread(report_of, sid) for sid in ids]
            result["sandbox"] = sorted({str(report.get("sandbox")) for report in reports})
            result["limits"] = [report.get("limits") for report in reports]
            result["network"] = [report.get("network") for report in reports]
            result["inits"] = [await viewer_init(base, api, sid) for sid in ids]
            result["tty"] = await text_view_and_loopback(base, api, first)
            some = next(p for p in placed.values() if p is not None)
            assert some.channel_secret is not None
            cert = some.channel_cert
            result["channel_tls"] = cert is not None
            wrong = "0" * 64 + "\n"
            nothing = await asyncio.to_thread(raw_answer, some.node_ip, some.port, None, cert)
            result["no_secret"] = nothing.decode("latin-1")
            result["wrong_secret"] = await asyncio.to_thread(
                raw_answer, some.node_ip, some.port, wrong.encode(), cert
            )
            result["wrong_secret"] = result["wrong_secret"].decode("latin-1")
            right = preamble(some.channel_secret)
            result["right_secret_plain_tcp"] = (
                await asyncio.to_thread(raw_answer, some.node_ip, some.port, right)
            ).decode("latin-1")
            banner = await asyncio.to_thread(
                raw_answer_banner, some.node_ip, some.port, right, cert
            )
            result["right_secret"] = banner
            placed_ids = set(ids)
            result["readyz"] = await hosts_when(
                api,
                lambda hosts: {s for h in hosts.values() for s in h["sessions"]} == placed_ids,
            )
            scraped = (await api.get("/metrics")).text.splitlines()
            result["metrics"] = [line for line in scraped if line.startswith("remotecli_host_")]
            result["api_hosts"] = {sid: (await state_of(api, sid))["host"] for sid in ids}
            assert controller.manager is not None
            store = controller.manager.store
            result["store_hosts"] = {sid: store.session(sid).host for sid in ids}
            (signals / "placed").write_text(json.dumps(result["hosts"]))
            while not (signals / "failed").exists():
                await asyncio.sleep(0.05)
            failed_at = float((signals / "failed").read_text())
            lost = {sid for sid, host in result["hosts"].items() if host == "w1"}
            result["lost"] = {}
            deadline = time.monotonic() + TIMEOUT
            while len(result["lost"]) < len(lost) and time.monotonic() < deadline:
                for sid in lost - set(result["lost"]):
                    body = await state_of(api, sid)
                    if body["state"] == "failed":
                        result["lost"][sid] = [body["reason"], time.time() - failed_at]
                await asyncio.sleep(0.1)
            result["readyz_after_loss"] = await hosts_when(
                api, lambda hosts: not hosts.get("w1", {}).get("up", True)
            )
            # w2's slots may all be taken by the survivors: end them, then place a new one.
            survivors = [sid for sid in ids if sid not in lost]
            await stop_all(api, survivors)
            began = time.monotonic()
            after = await create_ready_session(api, TIMEOUT)
            result["after_seconds"] = time.monotonic() - began
            found = await asyncio.to_thread(placement.find_session, after)
            result["after_host"] = found.host if found is not None else None
            result["after_init"] = await viewer_init(base, api, after)
            await stop_all(api, [after])
            result["states"] = {sid: (await state_of(api, sid))["state"] for sid in [*ids, after]}
            result["left"] = sorted(placement.ACTOR_PREFIX + s for s in [*ids, after])
            result["left"] = [
                name
                for name in await asyncio.to_thread(ray.util.list_named_actors)
                if name in result["left"]
            ]
    finally:
        await controller.close()
    return result


async def kept_signin(controller: Controller, api: httpx.AsyncClient) -> dict[str, Any]:
    """Keep a sign-in, run a session of its provider on the cluster, end it; say what moved.

    Returns the files the session's HOME held while it ran (read over its channel, as the
    keeper does), and the kept sign-in's version and files after the session ended.
    """
    signins = controller.signins
    assert signins is not None
    signins.save(ADMIN_USER, KEEPER, {".standin/credentials.json": KEPT}, None)
    created = await api.post("/api/sessions", json={"provider": KEEPER})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    async with asyncio.timeout(TIMEOUT):
        while (body := await state_of(api, session_id))["state"] != "ready":
            assert body["state"] not in ("failed", "stopped"), body
            await asyncio.sleep(0.05)
        driver = controller.manager.driver if controller.manager is not None else None
        assert driver is not None
        while b"refreshed" not in (held := await driver.collect(session_id, ["~/.standin"])).get(
            ".standin/token", b""
        ):
            await asyncio.sleep(0.1)
    await stop_all(api, [session_id])
    kept = signins.load(ADMIN_USER, KEEPER)
    assert kept is not None
    return {
        "held": {path: data.decode() for path, data in sorted(held.items())},
        "version": kept.version,
        "kept": {path: data.decode() for path, data in sorted(kept.files.items())},
    }


async def headless_run(controller: Controller) -> dict[str, Any]:
    """``POST /api/runs`` of the keeper's provider (after :func:`kept_signin`); follow its
    events; say what streamed, how it ended, what sign-in is kept after, and whether its actor
    is gone."""
    signins = controller.signins
    assert signins is not None
    async with AsyncClient(controller.url(), controller.admin_token, timeout=TIMEOUT) as client:
        began = time.monotonic()
        run = await client.create_run(KEEPER, "second")
        events = []
        first_text = None
        async with asyncio.timeout(TIMEOUT):
            async for event in client.events(run["id"]):
                events.append([event.type, event.data])
                if event.type == "text" and first_text is None:
                    first_text = time.monotonic() - began
        state = (await client.run(run["id"]))["state"]
    kept = signins.load(ADMIN_USER, KEEPER)
    assert kept is not None
    try:
        await asyncio.to_thread(placement.wait_until_gone, run["id"])
        gone = True
    except ClusterError:
        gone = False
    return {
        "events": events,
        "state": state,
        "version": kept.version,
        "kept_token": kept.files.get(".standin/token", b"").decode(),
        "actor_gone": gone,
        "first_text_s": first_text,
    }


async def start_doomed(
    address: str, token_file: Path, data_dir: Path, store_url: str
) -> tuple[asyncio.subprocess.Process, str, str, str]:
    """Start a third controller on the same store in its own process (:func:`doomed`); return
    the process, the session and the run it made and its controller id, once its session is
    ready and its run streams."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir.parent / "ctl-c.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.cluster_controller",
            "--doomed",
            address,
            str(token_file),
            str(data_dir),
            store_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    line = b""
    async with asyncio.timeout(TIMEOUT):
        while not line.startswith(b"READY "):  # its log lines come first
            line = await process.stdout.readline()
            if not line:
                raise AssertionError("the third controller ended before its session was ready")
    _, session_id, run_id, controller_id = line.decode().split()
    return process, session_id, run_id, controller_id


async def doomed(address: str, token_file: Path, data_dir: Path, store_url: str) -> None:
    """The third controller's program: start, make a ready session and a run that has begun
    its output and goes on, print ``READY SESSION RUN CONTROLLER``, then wait to be killed (the
    test kills it with SIGKILL)."""
    controller = Controller(controller_config(address, token_file, data_dir, store_url))
    await controller.start()
    async with admin_api(controller) as api:
        session_id = await create_ready_session(api, TIMEOUT)
    async with AsyncClient(controller.url(), controller.admin_token, timeout=TIMEOUT) as client:
        run = await client.create_run("shell", "echo started; exec sleep 600")
        async with asyncio.timeout(TIMEOUT):
            async for event in client.events(run["id"]):
                if event.type == "text":
                    break
    assert controller.manager is not None
    print(f"READY {session_id} {run['id']} {controller.manager.controller_id}", flush=True)
    await asyncio.Event().wait()


async def run_taken_over(controller: Controller, run_id: str) -> dict[str, Any]:
    """Wait until ``controller`` ended a killed controller's run; say how, and whether its
    actor (its slot) is gone."""
    store = controller.store
    assert store is not None
    async with asyncio.timeout(TAKEOVER_AFTER + TIMEOUT):
        while (record := store.run(run_id)).state.value in ("queued", "running"):
            await asyncio.sleep(0.2)
    try:
        await asyncio.to_thread(placement.wait_until_gone, run_id)
        gone = True
    except ClusterError:
        gone = False
    return {
        "state": record.state.value,
        "reason": record.reason,
        "controller": record.controller,
        "actor_gone": gone,
    }


def raw_answer_banner(host: str, port: int, first: bytes, cert: str | None) -> str:
    """Connect with the right secret and return the first 12 bytes: the VNC server's banner."""
    with channel_socket(host, port, cert) as sock:
        sock.sendall(first)
        received = b""
        while len(received) < 12:
            chunk = sock.recv(12 - len(received))
            if not chunk:
                break
            received += chunk
        return received.decode("latin-1")


def main() -> None:
    if sys.argv[1] == "--doomed":
        address, token_file, data_dir, database = sys.argv[2:6]
        asyncio.run(doomed(address, Path(token_file), Path(data_dir), database))
        return
    address, token_file, data_dir, signals = sys.argv[1:5]
    store_url = sys.argv[5] if len(sys.argv) > 5 else None
    result = asyncio.run(run(address, Path(token_file), Path(data_dir), Path(signals), store_url))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
