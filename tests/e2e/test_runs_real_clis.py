"""The real provider CLIs in headless runs, offline: what they print is read as the API promises.

Claude Code 2.1.197 and Gemini CLI 0.61.0 run here in the local driver's sandbox with no
network and no sign-in. Neither can answer a prompt without its servers, but both start, speak
their own headless format and end with their own error, fast: so the run's command line, the
format reader and the failure path are proven on the real programs. Codex CLI is left out: with
no network it keeps waiting for one ("Reconnecting... waiting for network") for minutes, which
only a run's timeout ends (that path is proven with the shell in tests/test_runs_api.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from remotecli.config import ControllerConfig
from tests.test_runs_api import World, collect, start_world

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or os.geteuid() != 0,
        reason="runs are sandboxed by bubblewrap as root: run scripts/install-system-deps.sh",
    ),
]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    config = ControllerConfig(data_dir=tmp_path, egress="none", runs_per_period=0)
    async for built in start_world(tmp_path, config):
        yield built


async def available(world: World, provider: str) -> None:
    """Skip, saying why, when the CLI is not installed here (npm could not fetch it)."""
    listed = {p["name"]: p for p in await world.alice.providers()}
    if not listed[provider]["available"]:
        pytest.skip(f"{provider} is not installed here: {listed[provider]['hint']}")


async def test_claude_code_not_signed_in_fails_with_its_own_words(world: World) -> None:
    """Real Claude Code, signed out and offline: its stream-json is read (its answer text is
    the sign-in message) and the run fails with the CLI's own error and exit status."""
    await available(world, "claude-code")
    run = await world.alice.create_run("claude-code", "--version and then hello")
    events = await collect(world.alice, run["id"])
    final = events[-1]
    assert final.type == "error", events
    assert "Not logged in" in final.data["reason"]
    assert final.data["exit_code"] == 1
    text = "".join(e.data["text"] for e in events if e.type == "text")
    assert "Not logged in" in text
    stored = await world.alice.run(run["id"])
    assert stored["state"] == "failed"
    assert stored["output"] == text


async def test_gemini_cli_not_signed_in_fails_with_its_own_words(world: World) -> None:
    """Real Gemini CLI with no sign-in: the run fails with its exit status and its message,
    read from its standard error."""
    await available(world, "gemini-cli")
    run = await world.alice.create_run("gemini-cli", "-p hello")
    events = await collect(world.alice, run["id"])
    final = events[-1]
    assert final.type == "error", events
    assert final.data["exit_code"] == 41
    assert "Please set an Auth method" in final.data["reason"]
