"""Headless runs through the API: real sandboxes of the local driver, real uvicorn, the client.

The providers are the shell and the stand-in CLI of ``tests/standin/`` in its headless mode
(``standin-cli --print FORMAT``), which prints the real CLIs' formats a line at a time with
delays (``tests/standin/runs/README.md`` says where each format came from) and rotates its token
as a refresh does. What the stand-in leaves out: any model, any network (the runs have no
egress), and tool calls that really run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import prometheus_client
import pytest
import uvicorn

from remotecli.auth import hash_token
from remotecli.client import AsyncClient, Client, StreamEvent
from remotecli.config import PROMPT_FIELD, ControllerConfig, ProviderConfig
from remotecli.controller.app import create_app
from remotecli.controller.identity import Identity
from remotecli.controller.runs import CANCEL_REASON, EVENT_BYTES_MAX, OUTPUT_MAX, RESTART_REASON
from remotecli.controller.sessions import SessionManager
from remotecli.controller.signins import SecretKey, SignIns, new_key_material
from remotecli.controller.store import Store
from remotecli.drivers.base import Driver
from remotecli.drivers.local import LocalDriver
from remotecli.drivers.local_channels import sandbox_pids
from remotecli.exceptions import NotFound, TooManyRequests, Unprocessable
from remotecli.providers import Catalogue
from remotecli.runs import RunState, RunStep, period_bounds
from tests.conftest import MS

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="runs are sandboxed by bubblewrap as root: run scripts/install-system-deps.sh test",
)

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "standin" / "standin-cli"
SAMPLES = ROOT / "tests" / "standin" / "runs"
ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
SAMPLE_OF = {  # provider -> the sample it replays (tests/standin/runs/SAMPLE.jsonl)
    "standin-claude": "claude-stream-json",
    "standin-claude-partial": "claude-stream-json-partial",
    "standin-codex": "codex-json",
    "standin-gemini": "gemini-stream-json",
    "standin-text": "text",
}
EXPECTED = json.loads((ROOT / "tests" / "standin" / "runs" / "expected.json").read_text())
DELAY = 0.2
FIRST_TOKEN = "standin-first"
NOW = 1_790_000_000.0  # 2026-09-21, a Monday: inside a month, a week and a day


class Clock:
    """A clock the test moves by hand (the quota's periods)."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    config: ControllerConfig
    store: Store
    manager: SessionManager
    signins: SignIns
    alice: AsyncClient
    bob: AsyncClient
    clock: Clock

    def sign_in(self, provider: str, token: str = FIRST_TOKEN) -> None:
        """Keep a stand-in sign-in for alice, as a connected session would have."""
        credentials = json.dumps({"user": "user-alice", "token": token}).encode()
        self.signins.save("alice", provider, {".standin/credentials.json": credentials}, None)

    def kept_token(self, provider: str) -> str:
        kept = self.signins.load("alice", provider)
        assert kept is not None
        return str(json.loads(kept.files[".standin/credentials.json"])["token"])


def providers() -> tuple[ProviderConfig, ...]:
    standins = [
        ProviderConfig(
            name=name,
            command=(str(STANDIN),),
            keep=("~/.standin",),
            run=(str(STANDIN), "--print", sample, "--delay", str(DELAY), "--", PROMPT_FIELD),
            run_format=EXPECTED.get(f"{sample}.jsonl", {}).get("format", "text"),
        )
        for name, sample in SAMPLE_OF.items()
    ]
    slow = ProviderConfig(
        name="standin-slow",
        command=(str(STANDIN),),
        keep=("~/.standin",),
        run=(str(STANDIN), "--print", "text", "--delay", "5", "--", PROMPT_FIELD),
    )
    # A CLI whose JSON output is whatever its prompt prints: the attacker's own stdout.
    forger = ProviderConfig(
        name="forger",
        command=("bash",),
        run=("bash", "-c", "--", PROMPT_FIELD),
        run_format="codex-json",
    )
    return (*standins, slow, forger, ProviderConfig(name="no-headless", command=("bash",)))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    config = ControllerConfig(
        data_dir=tmp_path,
        providers=providers(),
        egress="none",
        session_ttl=0,
        idle_stop=0,
        reap_interval=3600,
        max_runs_per_user=2,
        runs_per_period=0,
    )
    async for built in start_world(tmp_path, config):
        yield built


async def start_world(
    tmp_path: Path, config: ControllerConfig, driver: Driver | None = None
) -> AsyncIterator[World]:
    """A controller's API on ``driver`` (the local driver, egress none, by default)."""
    store = Store.open(tmp_path / "store.sqlite3")
    store.add_token("alice", hash_token(ALICE), 1.0)
    store.add_token("bob", hash_token(BOB), 1.0)
    signins = SignIns(store, SecretKey(new_key_material(), "test"))
    if driver is None:
        driver = LocalDriver(tmp_path, egress="none")
    catalogue = Catalogue(config.providers, driver=driver)
    clock = Clock()
    manager = SessionManager(
        config,
        store,
        driver,
        catalogue,
        registry=prometheus_client.CollectorRegistry(),
        signins=signins,
    )
    manager.runs._clock = clock  # the quota's periods; sessions keep the real time
    await manager.start()
    identity = Identity.of_store(store, manager.tickets)
    app = create_app(manager, identity, dashboard=False)
    socket_path = tmp_path / "api.sock"
    server = uvicorn.Server(
        uvicorn.Config(app, uds=str(socket_path), lifespan="off", log_config=None, ws="none")
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5000 * MS):
        while not server.started:
            await asyncio.sleep(0)

    def client(token: str) -> AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
        return AsyncClient("http://controller", token, transport=transport, timeout=10_000 * MS)

    async with client(ALICE) as alice, client(BOB) as bob:
        yield World(config, store, manager, signins, alice, bob, clock)
    await manager.close()
    server.should_exit = True
    await task
    store.close()


async def collect(api: AsyncClient, run_id: str) -> list[StreamEvent]:
    async with asyncio.timeout(20_000 * MS):
        return [event async for event in api.events(run_id)]


def sample_answer(sample: str) -> tuple[str, list[dict[str, object]], dict[str, object] | None]:
    """What a sample's run must give, as its README states it (expected.json): its text, its
    tools and its last usage."""
    expected = EXPECTED[f"{sample}.jsonl"]
    usage = expected["usage"][-1] if expected["usage"] else None
    return expected["text"], expected["tools"], usage


# --- streaming -----------------------------------------------------------------------------------


async def test_a_shell_run_streams_its_lines_while_it_runs(world: World) -> None:
    """A shell run's first line arrives while the command still runs; the stored output is the
    streamed text, and the run ends done with exit code 0."""
    run = await world.alice.create_run("shell", "for i in 1 2 3; do echo line$i; sleep 0.5; done")
    assert run["state"] in ("queued", "running")
    assert run["id"].startswith("run-")
    events: list[StreamEvent] = []
    async with asyncio.timeout(20_000 * MS):
        async for event in world.alice.events(run["id"]):
            if not events:
                assert event.type == "text"
                assert event.data["text"].startswith("line1")
                during = await world.alice.run(run["id"])
                assert during["state"] == "running"
                assert during["exit_code"] is None
            events.append(event)
    assert events[-1].type == "done"
    assert events[-1].data["exit_code"] == 0
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    text = "".join(e.data["text"] for e in events if e.type == "text")
    assert text == "line1\nline2\nline3\n"
    ended = await world.alice.run(run["id"])
    assert ended["state"] == "done"
    assert ended["output"] == text
    assert ended["exit_code"] == 0
    assert [r["id"] for r in await world.alice.runs()] == [run["id"]]


@pytest.mark.parametrize(
    "provider", ["standin-claude", "standin-claude-partial", "standin-codex", "standin-gemini"]
)
async def test_each_format_streams_as_the_shared_events(world: World, provider: str) -> None:
    """A CLI printing a real JSON format a line at a time: text arrives before the CLI ended,
    and the run's text, tools and usage are the sample's, stored as streamed."""
    world.sign_in(provider)
    run = await world.alice.create_run(provider, "what is in this directory?")
    events: list[StreamEvent] = []
    async with asyncio.timeout(30_000 * MS):
        async for event in world.alice.events(run["id"]):
            if event.type == "text" and not any(e.type == "text" for e in events):
                assert (await world.alice.run(run["id"]))["state"] == "running"
            events.append(event)
    text, tools, usage = sample_answer(SAMPLE_OF[provider])
    assert events[-1].type == "done", events[-1]
    assert "".join(e.data["text"] for e in events if e.type == "text") == text
    assert [e.data for e in events if e.type == "tool"] == tools
    assert [e.data for e in events if e.type == "usage"][-1:] == ([usage] if usage else [])
    ended = await world.alice.run(run["id"])
    assert ended["output"] == text
    if usage is not None:
        assert ended["usage"] == usage


async def test_a_run_saves_the_sign_in_it_refreshed(world: World) -> None:
    """The run starts with the kept sign-in, and the token the CLI rotated is kept after it."""
    world.sign_in("standin-text", FIRST_TOKEN)
    run = await world.alice.create_run("standin-text", "hello")
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "done"
    assert "".join(e.data["text"] for e in events if e.type == "text") == "you asked: hello\n"
    expected = "standin-" + hashlib.sha256(f"rotate:{FIRST_TOKEN}".encode()).hexdigest()
    assert world.kept_token("standin-text") == expected


async def test_a_run_without_a_sign_in_fails_with_the_cli_s_words(world: World) -> None:
    """Not connected, the CLI's own message and exit status are the run's reason."""
    run = await world.alice.create_run("standin-text", "hello")
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "error"
    reason = events[-1].data["reason"]
    assert "exited with status 1" in reason
    assert "not signed in" in reason
    assert events[-1].data["exit_code"] == 1
    assert (await world.alice.run(run["id"]))["state"] == "failed"


@pytest.mark.parametrize("provider", ["standin-claude", "standin-codex", "standin-gemini"])
async def test_an_error_the_cli_reports_in_its_format_fails_the_run(
    world: World, provider: str
) -> None:
    """A CLI that reports an error in its JSON output (and exits 1) ends the run failed, with
    that error and its exit status in the reason."""
    world.sign_in(provider)
    run = await world.alice.create_run(provider, "fail")
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "error"
    expected = EXPECTED[f"{SAMPLE_OF[provider]}-error.jsonl"]["error"]
    assert expected
    assert expected in events[-1].data["reason"]
    assert "exited with status 1" in events[-1].data["reason"]
    assert (await world.alice.run(run["id"]))["state"] == "failed"


async def test_a_prompt_that_looks_like_an_option_is_the_prompt(world: World) -> None:
    """A prompt starting with ``-`` reaches the CLI whole, as its prompt, never as an option."""
    world.sign_in("standin-text")
    prompt = "--delay 99 -- $(id) `id` ; rm -rf ~"
    run = await world.alice.create_run("standin-text", prompt)
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "done"
    assert "".join(e.data["text"] for e in events if e.type == "text") == f"you asked: {prompt}\n"


async def test_last_event_id_resumes_after_it(world: World) -> None:
    """A stream asked again with Last-Event-ID gives the events after it, numbered the same."""
    run = await world.alice.create_run("shell", "echo a; sleep 0.3; echo b; sleep 0.3; echo c")
    events = await collect(world.alice, run["id"])
    assert len(events) >= 3
    async with asyncio.timeout(10_000 * MS):
        later = [e async for e in world.alice.events(run["id"], after=2)]
    assert later == events[2:]


# --- ending a run --------------------------------------------------------------------------------


async def test_cancel_ends_the_processes_and_is_idempotent(world: World) -> None:
    """DELETE ends a running run's processes, records cancelled, and says so again after."""
    run = await world.alice.create_run("shell", "echo started; sleep 60")
    async with asyncio.timeout(10_000 * MS):
        async for event in world.alice.events(run["id"]):
            assert event.type == "text"
            break
    pids = sandbox_pids(world.config.data_dir / "runs" / run["id"])
    assert pids
    cancelled = await world.alice.cancel_run(run["id"])
    assert cancelled["state"] == "cancelled"
    assert cancelled["reason"] == CANCEL_REASON
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not (world.config.data_dir / "runs" / run["id"]).exists()
    assert (await world.alice.cancel_run(run["id"]))["state"] == "cancelled"
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "error"
    assert events[-1].data["reason"] == CANCEL_REASON


async def test_a_timeout_ends_the_run_with_an_error(world: World) -> None:
    """A run past its timeout_s is ended and fails with an error naming the timeout."""
    run = await world.alice.create_run("shell", "sleep 60", timeout_s=1)
    began = time.monotonic()
    events = await collect(world.alice, run["id"])
    assert time.monotonic() - began < 30
    assert events[-1].type == "error"
    assert "timed out after 1 s" in events[-1].data["reason"]
    assert (await world.alice.run(run["id"]))["state"] == "failed"


async def test_an_answer_past_the_limit_ends_the_run(world: World) -> None:
    """A CLI that floods its output is ended once the answer passes the bound, named."""
    run = await world.alice.create_run("shell", f"head -c {2 * OUTPUT_MAX} /dev/zero | tr '\\0' x")
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "error"
    assert f"{OUTPUT_MAX // 1024} KiB" in events[-1].data["reason"]
    stored = await world.alice.run(run["id"])
    assert len(stored["output"]) <= OUTPUT_MAX


async def test_shutdown_and_restart_settle_running_runs(tmp_path: Path) -> None:
    """A run going at shutdown ends failed; one the store still holds as running after a crash
    is failed by the next start, and its sandbox's leftovers are removed."""
    config = ControllerConfig(data_dir=tmp_path, egress="none", runs_per_period=0)
    async for world in start_world(tmp_path, config):
        run = await world.alice.create_run("shell", "sleep 60")
        async with asyncio.timeout(10_000 * MS):
            while (await world.alice.run(run["id"]))["state"] != "running":
                await asyncio.sleep(0.02)
        crashed = world.store.create_run("run-leftover", "alice", "shell", "x", 60, NOW)
        world.store.apply_run(crashed.id, RunStep.START, NOW)
    store = Store.open(tmp_path / "store.sqlite3")
    shut = store.run(run["id"])
    assert shut.state is RunState.FAILED
    assert "shut down" in (shut.reason or "")
    assert store.run("run-leftover").state is RunState.RUNNING
    store.close()
    async for world in start_world(tmp_path, config):
        assert world.store.run("run-leftover").state is RunState.FAILED
        assert world.store.run("run-leftover").reason == RESTART_REASON


async def test_removing_a_user_cancels_their_runs_and_keeps_nothing(world: World) -> None:
    """A removed user's running run is cancelled, and the sign-in it refreshed is not kept
    again (removing the user dropped it)."""
    world.sign_in("standin-slow")
    run = await world.alice.create_run("standin-slow", "hello")
    async with asyncio.timeout(10_000 * MS):
        async for event in world.alice.events(run["id"]):
            assert event.type == "text"
            break
    assert world.store.remove_user("alice", time.time())
    await world.manager.end_removed_users()
    ended = world.store.run(run["id"])
    assert ended.state is RunState.CANCELLED
    assert ended.reason == "its user was removed"
    assert world.signins.load("alice", "standin-slow") is None


async def test_a_forged_huge_token_count_is_not_taken(world: World) -> None:
    """Token counts past 2**53 are not usage: the run ends done and is stored, and its owner
    can start the next one (no run is left holding a place)."""
    line = json.dumps(
        {"type": "turn.completed", "usage": {"input_tokens": 2**63, "output_tokens": 1}}
    )
    for _ in range(3):  # more than max_runs_per_user: each must end and free its place
        run = await world.alice.create_run("forger", f"echo '{line}'")
        events = await collect(world.alice, run["id"])
        assert events[-1].type == "done"
        assert [e for e in events if e.type == "usage"] == []
        ended = await world.alice.run(run["id"])
        assert ended["state"] == "done"
        assert ended["usage"] is None


async def test_events_past_their_byte_budget_end_the_run(world: World) -> None:
    """Tool events of 16 KiB each, past the events' byte budget: the run fails naming it, and
    what is stored stays within the budget."""
    line = '{"type":"item.completed","item":{"id":"i%s","type":"command_execution","command":"%s"}}'
    script = (
        "c=$(head -c 16000 /dev/zero | tr '\\0' x); i=0; "
        f'while :; do i=$((i+1)); printf \'{line}\\n\' "$i" "$c"; done'
    )
    run = await world.alice.create_run("forger", script)
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "error", events[-1]
    assert f"{EVENT_BYTES_MAX // 1024**2} MiB" in events[-1].data["reason"]
    stored = world.store.run(run["id"])
    assert stored.events is not None
    assert len(stored.events) <= EVENT_BYTES_MAX + 64 * 1024
    listed = world.store.runs("alice")
    assert [r.events for r in listed] == [None]


async def test_a_cancel_while_a_run_settles_does_not_strand_it(tmp_path: Path) -> None:
    """A cancel that comes after the command ended, while the sandbox is being removed, leaves
    the run ended as it ended (done), its sandbox gone and nothing left live."""
    gate = asyncio.Event()
    stopping = asyncio.Event()

    class SlowToStop(LocalDriver):
        async def stop(self, session_id: str) -> None:
            stopping.set()
            await gate.wait()
            await super().stop(session_id)

    config = ControllerConfig(data_dir=tmp_path, egress="none", runs_per_period=0)
    async for world in start_world(tmp_path, config, SlowToStop(tmp_path, egress="none")):
        run = await world.alice.create_run("shell", "echo quick")
        async with asyncio.timeout(10_000 * MS):
            await stopping.wait()
            cancelling = asyncio.create_task(world.alice.cancel_run(run["id"]))
            await asyncio.sleep(0.2)
            assert not cancelling.done()  # it waits for the run's end, which waits for stop
            gate.set()
            ended = await cancelling
        assert ended["state"] == "done"
        assert ended["output"] == "quick\n"
        assert not (tmp_path / "runs" / run["id"]).exists()
        assert world.manager.runs._live == {}


async def test_a_last_event_id_that_is_not_a_number_replays_everything(world: World) -> None:
    """A Last-Event-ID of non-ASCII digits (``²``) or garbage is taken as none, never a 500."""
    run = await world.alice.create_run("shell", "echo one")
    events = await collect(world.alice, run["id"])
    for value in ("\u00b2", "abc", "-1", "9" * 30):
        response = await world.alice._http.get(
            f"/api/runs/{run['id']}/events", headers={b"Last-Event-ID": value.encode("latin-1")}
        )
        assert response.status_code == 200, value
        assert response.text.count("event: ") == len(events)


# --- who may do what -----------------------------------------------------------------------------


async def test_another_users_run_is_404(world: World) -> None:
    """Bob cannot see, follow or cancel alice's run, nor find it in his list."""
    run = await world.alice.create_run("shell", "sleep 5")
    for call in (
        world.bob.run(run["id"]),
        world.bob.cancel_run(run["id"]),
        collect(world.bob, run["id"]),
    ):
        with pytest.raises(NotFound):
            await call
    assert await world.bob.runs() == []
    assert (await world.alice.run(run["id"]))["state"] in ("queued", "running")
    await world.alice.cancel_run(run["id"])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"provider": "shell", "prompt": "  "}, "empty"),
        ({"provider": "shell", "prompt": "a\u0000b"}, "U+0000"),
        ({"provider": "shell", "prompt": "x", "timeout_s": 3601}, "timeout_s"),
        ({"provider": "no-headless", "prompt": "x"}, "no headless command"),
        ({"provider": "nope", "prompt": "x"}, "no provider named"),
        ({"provider": "shell", "prompt": "x", "extra": 1}, "extra"),
    ],
)
async def test_bad_runs_are_422_with_the_cause(
    world: World, body: dict[str, object], words: str
) -> None:
    """A run that cannot be is refused with 422 and a message naming why."""
    response = await world.alice._http.post("/api/runs", json=body)
    assert response.status_code == 422, response.text
    assert words in response.json()["message"]
    assert await world.alice.runs() == []


async def test_runs_at_once_are_limited_per_user(world: World) -> None:
    """A third run at once is 429 with Retry-After and the limit named; others may still run."""
    first = await world.alice.create_run("shell", "sleep 30")
    second = await world.alice.create_run("shell", "sleep 30")
    with pytest.raises(TooManyRequests) as refused:
        await world.alice.create_run("shell", "echo three")
    assert "max_runs_per_user" in refused.value.message
    assert refused.value.data["retry_after"] == 5
    bobs = await world.bob.create_run("shell", "echo bob")
    assert (await collect(world.bob, bobs["id"]))[-1].type == "done"
    for run in (first, second):
        await world.alice.cancel_run(run["id"])
    third = await world.alice.create_run("shell", "echo three")
    assert (await collect(world.alice, third["id"]))[-1].type == "done"


async def test_the_run_quota_is_429_until_the_period_ends(tmp_path: Path) -> None:
    """Past runs_per_period a run is 429 whose Retry-After is the period's end; the next
    period allows runs again, and GET /api/usage counts them."""
    config = ControllerConfig(
        data_dir=tmp_path, egress="none", runs_per_period=2, quota_period="day"
    )
    async for world in start_world(tmp_path, config):
        for _ in range(2):
            run = await world.alice.create_run("shell", "true")
            await collect(world.alice, run["id"])
        world.clock.now = NOW + 3600
        with pytest.raises(TooManyRequests) as refused:
            await world.alice.create_run("shell", "true")
        _, end = period_bounds("day", world.clock.now)
        assert refused.value.data["retry_after"] == int(end - world.clock.now)
        assert "runs_per_period" in refused.value.message
        usage = await world.alice.usage()
        assert usage["runs"] == 2
        assert usage["limits"]["runs_per_period"] == 2
        assert usage["period_end"].startswith("2026-09-22T00:00:00")
        assert (await world.bob.usage())["runs"] == 0
        world.clock.now = end + 1
        run = await world.alice.create_run("shell", "true")
        assert (await collect(world.alice, run["id"]))[-1].type == "done"


async def test_the_token_quota_counts_reported_usage(tmp_path: Path) -> None:
    """Tokens a CLI reported count against tokens_per_period: past it, 429 naming it."""
    _, _, usage = sample_answer("claude-stream-json")
    assert usage is not None
    used = int(str(usage["input_tokens"])) + int(str(usage["output_tokens"]))
    config = ControllerConfig(
        data_dir=tmp_path,
        egress="none",
        providers=providers(),
        runs_per_period=0,
        tokens_per_period=used,
    )
    async for world in start_world(tmp_path, config):
        world.sign_in("standin-claude")
        run = await world.alice.create_run("standin-claude", "hi")
        await collect(world.alice, run["id"])
        report = await world.alice.usage()
        assert report["input_tokens"] + report["output_tokens"] == used
        with pytest.raises(TooManyRequests) as refused:
            await world.alice.create_run("standin-claude", "again")
        assert "tokens_per_period" in refused.value.message


async def test_an_uninstalled_headless_program_is_422_with_its_hint(tmp_path: Path) -> None:
    """A provider whose headless program is missing is refused with its install hint."""
    missing = ProviderConfig(
        name="ghost",
        command=("ghost-cli",),
        install_hint="install ghost-cli from its site",
        run=("ghost-cli", "-p", PROMPT_FIELD),
    )
    config = replace(ControllerConfig(data_dir=tmp_path, egress="none"), providers=(missing,))
    async for world in start_world(tmp_path, config):
        with pytest.raises(Unprocessable) as refused:
            await world.alice.create_run("ghost", "x")
        assert "install ghost-cli from its site" in refused.value.message


async def test_the_blocking_client_runs_and_follows_too(world: World, tmp_path: Path) -> None:
    """The blocking Client (the one the docs show) starts a run and iterates its events."""
    socket_path = tmp_path / "api.sock"

    def use() -> tuple[list[StreamEvent], dict[str, object]]:
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with Client("http://controller", ALICE, transport=transport) as api:
            assert [p["name"] for p in api.providers()][:1] == ["shell"]
            run = api.create_run("shell", "echo from the blocking client")
            events = list(api.events(run["id"]))
            return events, api.run(run["id"])

    events, run = await asyncio.to_thread(use)
    assert events[-1].type == "done"
    assert run["output"] == "from the blocking client\n"
