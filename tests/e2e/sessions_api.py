"""Session steps the end-to-end tests share, spoken through the HTTP API."""

from __future__ import annotations

import asyncio
import json

import httpx


async def create_ready_session(api: httpx.AsyncClient, timeout: float) -> str:
    """Create a shell session and return its id once its SSE stream says ``ready``."""
    created = await api.post("/api/sessions", json={"provider": "shell"})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    async with asyncio.timeout(timeout):
        async with api.stream("GET", f"/api/sessions/{session_id}/events") as events:
            async for line in events.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line.removeprefix("data:"))
                assert event.get("state") not in ("failed", "stopped"), event
                if event.get("state") == "ready":
                    return session_id
    raise AssertionError(f"the event stream of {session_id} ended before ready")
