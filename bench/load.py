"""Load: thousands of WebSocket tunnels through gateway and bridge, and a burst of sessions.

``run(quick)`` starts a controller in its own process (``python -m bench.load serve``: the real
gateway, API and VNC bridge, with an echo driver whose "VNC endpoint" sends an RFB banner and
then echoes every byte), and from this process, on loopback only:

1. opens ``tunnels`` WebSockets (2,000; quick: 300) to one session's ``/api/sessions/{id}/vnc``
   with the login cookie and the same Origin, at most 200 handshakes at a time; each reads the
   banner and echoes 4 KiB, then, with all of them open at once, 4 KiB more (data flowing
   through every tunnel at the same time); then closes them all; and does it all a second time
   (memory kept after the first round may be the allocator's; a second round must not add);
2. creates sessions at 20 per second for ``seconds`` (30; quick: 3), then deletes them all.

It reports errors by kind, the controller's resident memory and open file descriptors before,
at the peak and after everything closed, and handshake and creation latencies. ``measure``
returns the figures as dicts; ``run`` renders them as a :class:`bench.report.Section`.
Every wait is bounded; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from bench.report import Section, fmt

ECHO_BYTES = 4096
HANDSHAKE_CONCURRENCY = 200
CREATE_RATE = 20.0  # sessions per second


# --- the controller process --------------------------------------------------------------------


class EchoDriver:
    """A driver whose sessions are TCP servers that send an RFB banner, then echo every byte.

    Honest about what it leaves out: no display, no sandbox, no processes; it exists so the
    gateway and bridge can be loaded without thousands of x11vnc clients.
    """

    name = "echo"
    can_adopt = False  # recover() knows no session

    def __init__(self) -> None:
        self._servers: dict[str, asyncio.Server] = {}
        self._ended: dict[str, asyncio.Future[str]] = {}

    def isolation(self) -> None:
        return None

    def hosts(self) -> None:
        """Nothing: the echo sessions run in this process."""

    def preparing(self, command: Any) -> None:
        return None

    async def collect(self, session_id: str, paths: Any) -> dict[str, bytes]:
        return {}

    async def tty_endpoint(self, session_id: str) -> Any:
        from remotecli.exceptions import DriverError

        raise DriverError("the echo driver's sessions have no text terminal")

    async def connect_loopback(self, session_id: str, port: int, *, address: str = "") -> Any:
        from remotecli.exceptions import DriverError

        raise DriverError("the echo driver's sessions have no loopback of their own")

    def can_run(self, command: Any) -> tuple[str, ...] | str:
        """Say every program can run: the echo server never runs one."""
        return tuple(command)

    async def start(self, spec: Any, progress: Any) -> Any:
        """Listen on 127.0.0.1:0 for this session and return the endpoint."""
        from remotecli.drivers.base import VncEndpoint

        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self._servers[spec.session_id] = server
        self._ended[spec.session_id] = asyncio.get_running_loop().create_future()
        progress("echo endpoint listening")
        return VncEndpoint(host="127.0.0.1", port=server.sockets[0].getsockname()[1])

    async def start_run(self, spec: Any, progress: Any) -> Any:
        from remotecli.exceptions import DriverError

        raise DriverError("the echo driver runs no command, so no headless run")

    async def wait(self, session_id: str) -> str:
        """Return once the session was stopped."""
        ended = self._ended.get(session_id)
        return "no such session" if ended is None else await asyncio.shield(ended)

    async def stop(self, session_id: str) -> None:
        """Close the session's server; idempotent."""
        server = self._servers.pop(session_id, None)
        if server is not None:
            server.close()
        ended = self._ended.pop(session_id, None)
        if ended is not None and not ended.done():
            ended.set_result("stopped")

    async def recover(self, session_id: str, workdir: Path) -> None:
        """Nothing survives a restart."""

    async def close(self) -> None:
        """Stop every session."""
        for session_id in list(self._servers):
            await self.stop(session_id)

    async def prepare(self) -> None:
        """Nothing to prepare."""

    def detach(self, session_id: str) -> bool:
        """Refuse: these sessions end with the controller."""
        return False

    async def hibernate(self, session_id: str) -> bool:
        """Refuse: these sessions cannot be saved to disk."""
        return False

    async def resume(self, session_id: str, workdir: Path, progress: Any) -> Any:
        """Refuse: nothing is ever hibernated here."""
        from remotecli.exceptions import DriverError

        raise DriverError("this benchmark's driver cannot hibernate", session_id=session_id)

    async def recover_hibernated(self, session_id: str, workdir: Path) -> bool:
        """Nothing is ever hibernated here."""
        return False

    @staticmethod
    async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


async def serve(data_dir: Path) -> None:
    """Run a controller with the echo driver; print ``URL TOKEN``; stop when stdin closes."""
    from remotecli.config import ControllerConfig
    from remotecli.controller.server import Controller
    from remotecli.logs import configure_logging

    configure_logging("console", "warning", sys.stderr)

    config = ControllerConfig(
        listen=("127.0.0.1", 0),
        data_dir=data_dir,
        max_sessions=100_000,
        max_sessions_per_user=100_000,
        create_rate=None,  # the burst of creations is what is measured
        log_level="warning",
    )
    controller = Controller(config, driver=EchoDriver())
    await controller.start()
    print("LOAD-READY", controller.url(), controller.admin_token, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await controller.close()


# --- measuring -----------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _count(errors: dict[str, int], exc: BaseException) -> None:
    kind = type(exc).__name__
    errors[kind] = errors.get(kind, 0) + 1


async def _settle(pid: int, fds_before: int, seconds: float) -> None:
    """Wait until the controller's fd count is back near ``fds_before`` (or ``seconds`` pass)."""
    deadline = time.monotonic() + seconds
    while _fds(pid) > fds_before + 8 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _tunnels(base: str, token: str, pid: int, count: int) -> dict[str, Any]:
    """Open ``count`` tunnels to one session, echo through all of them at once, close them."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as browser:
        login = await browser.get("/login", params={"token": token})  # as a browser signs in
        cookie = login.headers["set-cookie"].split(";", 1)[0]
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        session = (await client.post("/api/sessions", json={"provider": "shell"})).json()
        for _ in range(200):
            if (await client.get(f"/api/sessions/{session['id']}")).json()["state"] == "ready":
                break
            await asyncio.sleep(0.05)
    url = base.replace("http://", "ws://") + session["vnc_path"]
    rss_before, fds_before = _rss_kib(pid), _fds(pid)
    limit = asyncio.Semaphore(HANDSHAKE_CONCURRENCY)
    errors: dict[str, int] = {}
    handshakes: list[float] = []
    payload = os.urandom(ECHO_BYTES)

    async def echo(ws: ClientConnection) -> None:
        await ws.send(payload)
        received = 0
        while received < ECHO_BYTES:
            received += len(await ws.recv())

    async def open_one() -> ClientConnection | None:
        async with limit:
            began = time.monotonic()
            try:
                ws = await connect(
                    url,
                    origin=base,  # type: ignore[arg-type]
                    additional_headers={"Cookie": cookie},
                    open_timeout=30,
                    max_size=None,
                )
                handshakes.append(time.monotonic() - began)
                assert (await asyncio.wait_for(ws.recv(), 30))[:4] == b"RFB "
                await asyncio.wait_for(echo(ws), 30)
            except Exception as exc:
                _count(errors, exc)
                return None
            return ws

    began = time.monotonic()
    opened = [ws for ws in await asyncio.gather(*(open_one() for _ in range(count))) if ws]
    open_seconds = time.monotonic() - began
    rounds = await asyncio.gather(
        *(asyncio.wait_for(echo(ws), 60) for ws in opened), return_exceptions=True
    )
    for result in rounds:
        if isinstance(result, BaseException):
            _count(errors, result)
    rss_peak, fds_peak = _rss_kib(pid), _fds(pid)
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    await _settle(pid, fds_before, 15)
    return {
        "phase": "tunnels",
        "tunnels": count,
        "opened": len(opened),
        "echoed_all_at_once": sum(1 for r in rounds if r is None),
        "errors": errors,
        "open_seconds": round(open_seconds, 2),
        "handshake_p50_ms": round((_pct(handshakes, 0.5) or 0) * 1000, 1),
        "handshake_p99_ms": round((_pct(handshakes, 0.99) or 0) * 1000, 1),
        "rss_kib": (rss_before, rss_peak, _rss_kib(pid)),
        "fds": (fds_before, fds_peak, _fds(pid)),
    }


async def _creations(base: str, token: str, pid: int, seconds: float) -> dict[str, Any]:
    """Create sessions at CREATE_RATE per second for ``seconds``, then delete them all."""
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=30, limits=limits
    ) as client:
        rss_before, fds_before = _rss_kib(pid), _fds(pid)
        errors: dict[str, int] = {}
        latencies: list[float] = []
        created: list[str] = []
        total = round(seconds * CREATE_RATE)

        async def create(index: int, start: float) -> None:
            await asyncio.sleep(max(0.0, start + index / CREATE_RATE - time.monotonic()))
            began = time.monotonic()
            try:
                response = await client.post("/api/sessions", json={"provider": "shell"})
            except httpx.HTTPError as exc:
                _count(errors, exc)
                return
            latencies.append(time.monotonic() - began)
            if response.status_code == 201:
                created.append(response.json()["id"])
            else:
                key = f"HTTP {response.status_code}"
                errors[key] = errors.get(key, 0) + 1

        start = time.monotonic()
        await asyncio.gather(*(create(i, start) for i in range(total)))
        elapsed = time.monotonic() - start
        rss_peak, fds_peak = _rss_kib(pid), _fds(pid)
        delete_limit = asyncio.Semaphore(20)

        async def delete(session_id: str) -> None:
            async with delete_limit:
                try:
                    response = await client.delete(f"/api/sessions/{session_id}")
                except httpx.HTTPError as exc:
                    _count(errors, exc)
                    return
                if response.status_code != 200:
                    key = f"DELETE {response.status_code}"
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(delete(s) for s in created))
    await _settle(pid, fds_before, 15)
    return {
        "phase": "creations",
        "requested": total,
        "created": len(created),
        "rate_per_s": round(total / elapsed, 1) if elapsed else None,
        "errors": errors,
        "create_p50_ms": round((_pct(latencies, 0.5) or 0) * 1000, 1),
        "create_p99_ms": round((_pct(latencies, 0.99) or 0) * 1000, 1),
        "rss_kib": (rss_before, rss_peak, _rss_kib(pid)),
        "fds": (fds_before, fds_peak, _fds(pid)),
    }


async def _measure(quick: bool, tunnels: int | None, seconds: float | None) -> list[dict[str, Any]]:
    count = tunnels if tunnels is not None else (300 if quick else 2000)
    burst = seconds if seconds is not None else (3.0 if quick else 30.0)
    with tempfile.TemporaryDirectory(prefix="rc-load-") as data_dir:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.load", "serve", data_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert process.stdout is not None
            line = ""
            while not line.startswith("LOAD-READY"):
                line = await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(None, process.stdout.readline), 60
                )
                if not line:
                    raise RuntimeError("the load controller exited before it was ready")
            _, base, token = line.split()
            # Twice: growth in the first round may be the allocator keeping freed memory; a
            # second round of the same size that does not grow further shows there is no leak.
            results = [await _tunnels(base, token, process.pid, count) for _ in range(2)]
            results.append(await _creations(base, token, process.pid, burst))
        finally:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    return results


def measure(
    quick: bool, *, tunnels: int | None = None, seconds: float | None = None
) -> list[dict[str, Any]]:
    """Run both phases (see the module docstring) and return one dict of figures per phase."""
    from bench.processes import raise_fd_limit

    raise_fd_limit()
    return asyncio.run(_measure(quick, tunnels, seconds))


def run(quick: bool) -> list[Section]:
    """The benchmark entry for ``python -m bench``: both phases as one Markdown section."""
    results = measure(quick)
    rows = []
    for result in results:
        rss, fds = result["rss_kib"], result["fds"]
        done = result.get("opened", result.get("created"))
        asked = result.get("tunnels", result.get("requested"))
        rows.append(
            [
                result["phase"],
                f"{done}/{asked}",
                ", ".join(f"{k}: {v}" for k, v in result["errors"].items()) or "none",
                " → ".join(fmt(v / 1024, 1) for v in rss),
                " → ".join(str(v) for v in fds),
            ]
        )
    notes = [
        f"tunnels: opened in {r['open_seconds']} s, {HANDSHAKE_CONCURRENCY} handshakes at a "
        f"time; handshake p50 {r['handshake_p50_ms']} ms, p99 {r['handshake_p99_ms']} ms; "
        f"{r['echoed_all_at_once']} echoed 4 KiB while all were open"
        for r in results
        if r["phase"] == "tunnels"
    ]
    notes += [
        f"creations: {r['rate_per_s']}/s; POST p50 {r['create_p50_ms']} ms, "
        f"p99 {r['create_p99_ms']} ms; all deleted afterwards"
        for r in results
        if r["phase"] == "creations"
    ]
    notes.append("reproduce: .venv/bin/python -m bench.load [--quick] (see docs/reliability.md)")
    return [
        Section(
            "Load: tunnels through gateway and bridge, and session creations",
            columns=["phase", "done", "errors", "RSS MiB before → peak → after", "fds"],
            rows=rows,
            notes=notes,
        )
    ]


def _main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        import uvloop

        uvloop.run(serve(Path(sys.argv[2])))
        return
    quick = "--quick" in sys.argv
    for result in measure(quick):
        print(result)


if __name__ == "__main__":
    _main()
