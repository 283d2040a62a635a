"""Sessions benchmark: how long `remotecli up` with the local driver takes to make a session ready.

It starts `remotecli up` on a fresh data dir (its own process, admin token from
``REMOTECLI_TOKEN``), then through the HTTP API: creates ``shell`` sessions one after another,
each timed from the ``POST /api/sessions`` to the moment ``GET /api/sessions/{id}`` first says
``ready`` (polled every 20 ms, which bounds the resolution), and deleted before the next; then
creates a batch at the same moment and times each the same way. Ready means the driver read an
RFB banner from the session's VNC server, so this is the time to a usable display.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.processes import Peer, free_port, raise_fd_limit
from bench.report import Section, fmt, verdict

_POLL = 0.02
_READY_TIMEOUT = 60.0


def _remotecli() -> str:
    return str(Path(sys.executable).parent / "remotecli")


def _missing() -> str | None:
    """Why `remotecli up` with the local driver cannot run here, or None."""
    import subprocess

    done = subprocess.run(
        [_remotecli(), "up", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    if done.returncode != 0:
        return "`remotecli up` is not built yet"
    for program in ("Xvnc", "tmux", "xterm"):
        if shutil.which(program) is None:
            return f"{program} is not installed (run `make test` once to install it)"
    return None


async def _until_ready(client: httpx.AsyncClient, session_id: str, start: float) -> float:
    """Poll the session until ready; return seconds since ``start``. Raise on failure or timeout."""
    deadline = start + _READY_TIMEOUT
    while time.perf_counter() < deadline:
        answer = await client.get(f"/api/sessions/{session_id}")
        state = answer.json().get("state")
        if state == "ready":
            return time.perf_counter() - start
        if state in ("failed", "stopped"):
            reason = answer.json().get("reason") or answer.json().get("error") or state
            raise RuntimeError(f"session {session_id} {state}: {reason}")
        await asyncio.sleep(_POLL)
    raise TimeoutError(f"session {session_id} not ready within {_READY_TIMEOUT:.0f} s")


async def _create_and_time(client: httpx.AsyncClient) -> tuple[str | None, float | str]:
    """Create one shell session; return its id and time to ready (or the error text)."""
    start = time.perf_counter()
    answer = await client.post("/api/sessions", json={"provider": "shell"})
    if answer.status_code != 201:
        return None, f"POST /api/sessions answered {answer.status_code}: {answer.text[:160]}"
    session_id = answer.json()["id"]
    try:
        return session_id, await _until_ready(client, session_id, start)
    except (RuntimeError, TimeoutError) as exc:
        return session_id, str(exc)


async def _delete(client: httpx.AsyncClient, session_ids: list[str | None]) -> None:
    await asyncio.gather(
        *(client.delete(f"/api/sessions/{sid}") for sid in session_ids if sid is not None),
        return_exceptions=True,
    )


async def _measure(port: int, token: str, sequential: int, batch: int) -> dict[str, Any]:
    """Sequential sessions, then one batch created at once; times and errors."""
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}"
    seq: list[float] = []
    together: list[float] = []
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        providers = (await client.get("/api/providers")).json()
        shell = [p for p in providers if isinstance(p, dict) and p.get("name") == "shell"]
        if not shell or not shell[0].get("available", False):
            return {"skipped": "the shell provider is not available"}
        for _ in range(sequential):
            session_id, outcome = await _create_and_time(client)
            (seq.append(outcome) if isinstance(outcome, float) else errors.append(outcome))
            await _delete(client, [session_id])
        outcomes = await asyncio.gather(*(_create_and_time(client) for _ in range(batch)))
        for _, outcome in outcomes:
            (together.append(outcome) if isinstance(outcome, float) else errors.append(outcome))
        memory = _session_memory()
        await _delete(client, [sid for sid, _ in outcomes])
    return {"sequential": seq, "batch": together, "errors": errors, "memory": memory}


def _session_memory() -> dict[str, float] | None:
    """PSS (MiB) per ready session: the sandbox's own processes (bubblewrap and pasta) and all.

    A session's processes all run as its own host uid (3000000 and up): PSS splits shared pages
    between them, so the sums add up without counting a library twice.
    """
    from remotecli.sandbox.uids import UID_BASE, UID_COUNT

    per_uid: dict[int, dict[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            rollup = Path(f"/proc/{entry}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        if not UID_BASE <= uid < UID_BASE + UID_COUNT:
            continue
        pss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        totals = per_uid.setdefault(uid, {"sandbox": 0.0, "session": 0.0})
        totals["session"] += pss / 1024
        if fields["Name"].strip().split(".")[0] in ("bwrap", "pasta", "passt"):
            totals["sandbox"] += pss / 1024
    if not per_uid:
        return None
    count = len(per_uid)
    return {
        "sessions": float(count),
        "sandbox": sum(t["sandbox"] for t in per_uid.values()) / count,
        "session": sum(t["session"] for t in per_uid.values()) / count,
    }


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(quick: bool, workdir: Path) -> list[Section]:
    """Run the sessions benchmark; return its section."""
    raise_fd_limit()
    title = "Sessions: create to ready with the local driver"
    why = _missing()
    if why is not None:
        return [Section(title, skipped=why)]
    sequential, batch = (5, 5) if quick else (20, 10)
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "REMOTECLI_TOKEN": token,
        "REMOTECLI_MAX_SESSIONS_PER_USER": "20",
        "REMOTECLI_CREATE_RATE": "off",  # one user creates them all, as fast as it can
    }
    argv = [_remotecli(), "up", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(workdir / "data"), "--driver", "local"]
    peer = Peer("remotecli-up", argv, workdir, port, env=env)
    try:
        peer.start(timeout=60)
        result = asyncio.run(_measure(port, token, sequential, batch))
    except (RuntimeError, httpx.HTTPError) as exc:
        return [Section(title, skipped=f"`remotecli up` did not serve: {str(exc)[:200]}")]
    finally:
        peer.stop(grace=20)
    if "skipped" in result:
        return [Section(title, skipped=result["skipped"])]
    seq, together = result["sequential"], result["batch"]
    columns = ["run", "sessions ready", "p50 ms", "p95 ms", "max ms"]
    rows = [
        [
            name,
            f"{len(samples)} of {count}",
            fmt(_ms(statistics.median(samples) if samples else None)),
            fmt(_ms(_pct(samples, 0.95))),
            fmt(_ms(max(samples) if samples else None)),
        ]
        for name, samples, count in (
            ("one after another", seq, sequential),
            (f"{batch} created at once", together, batch),
        )
    ]
    section = Section(title, columns, rows)
    p50 = statistics.median(seq) if seq else None
    met = verdict(None if p50 is None else p50 <= 0.5)
    section.targets = [("p50 <= 0.5 s (one after another)", f"{fmt(_ms(p50))} ms", met)]
    memory = result.get("memory")
    if memory is not None:
        section.rows.append(
            [
                f"memory per session ({memory['sessions']:.0f} ready)",
                f"sandbox {memory['sandbox']:.1f} MiB PSS",
                f"whole session {memory['session']:.1f} MiB PSS",
                "",
                "",
            ]
        )
        section.notes.append(
            "Memory: PSS of each ready session's processes, found by its own host uid; "
            "'sandbox' counts bubblewrap's two processes and pasta (user-mode networking), "
            "'whole session' adds Xvnc, the window manager, tmux, xterm, the text terminal's "
            "server and the shell."
        )
    else:
        section.notes.append("Memory: no session ran under its own uid (the sandbox needs root).")
    section.notes = [
        "Time from POST /api/sessions to the first GET that reports `ready` (the driver has read "
        f"the VNC server's RFB banner); polled every {_POLL * 1000:.0f} ms. Each sequential "
        "session is deleted before the next is created.",
    ]
    if quick:
        section.notes.append(f"--quick: {sequential} sequential sessions and {batch} at once.")
    section.notes += [f"error: {message}" for message in result["errors"][:5]]
    return [section]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
