"""The dashboard reads the API as /api/openapi.json describes it, and nothing it does not.

The dashboard's ``api.js`` declares the fields it reads (``API_FIELDS``) and the SSE event names
it listens to (``EVENT_NAMES``); these tests check the declaration against the OpenAPI document
of a real controller, and check the pages' JavaScript against the declaration: every field read
from a variable holding an API answer, and every API call, must be in it. That covers connecting
a provider too: the providers' ``connected`` fields, forgetting a connection, a session's
``open_url`` and its ``open-url`` event, and relaying the sign-in callback; and Ask, the headless
runs: ``/api/runs`` and ``/api/usage``, and the events of a run's stream (``RUN_EVENTS``) as the
stream's own OpenAPI description lists them. The text view's WebSocket is not in the OpenAPI
document (no WebSocket is): its path (``TTY_PATH``) is checked against docs/api.md and the path
the controller's bridge serves.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from remotecli.controller.events import SessionEvent
from tests.banner_driver import banner_controller
from tests.conftest import MS

STATIC = Path(__file__).resolve().parents[1] / "src/remotecli/dashboard/static"
PAGES = (
    "api.js",
    "app.js",
    "elements.js",
    "sessions.js",
    "viewer.js",
    "terminal.js",
    "reconnect.js",
    "runs.js",
    "hosts.js",
)
API_DOC = Path(__file__).resolve().parents[1] / "docs/api.md"

# The variable names the pages hold each kind of API answer in (see API_FIELDS in api.js).
READERS = {
    "problem": "ErrorOut",
    "provider": "ProviderOut",
    "session": "SessionOut",
    "current": "SessionOut",
    "ticket": "TicketOut",
    "callback": "CallbackOut",
    "sse": "events",
    "me": "MeOut",
    "run": "RunOut",
    "tokens": "UsageCountOut",
    "period": "UsageOut",
    "limits": "LimitsOut",
    "ready": "ReadyOut",
    "host": "HostOut",
}
# The variables the pages hold the data of each event of a run's stream in (RUN_EVENTS in api.js).
RUN_EVENT_READERS = {
    "said": "text",
    "toolUse": "tool",
    "tokens": "usage",
    "finish": "done",
    "fault": "error",
}
RUN_EVENTS_PATH = "/api/runs/{run_id}/events"

# What each call the dashboard makes answers, as (array of?, schema) in the OpenAPI document;
# schema None: an empty 204.
CALLS: dict[tuple[str, str], tuple[bool, str | None]] = {
    ("get", "/api/providers"): (True, "ProviderOut"),
    ("delete", "/api/providers/{provider}/connection"): (False, None),
    ("get", "/api/sessions"): (True, "SessionOut"),
    ("post", "/api/sessions"): (False, "SessionOut"),
    ("get", "/api/sessions/{session_id}"): (False, "SessionOut"),
    ("delete", "/api/sessions/{session_id}"): (False, "SessionOut"),
    ("post", "/api/sessions/{session_id}/ticket"): (False, "TicketOut"),
    ("post", "/api/sessions/{session_id}/callback"): (False, "CallbackOut"),
    ("patch", "/api/sessions/{session_id}"): (False, "SessionOut"),
    ("get", "/api/me"): (False, "MeOut"),
    ("post", "/api/logout"): (False, None),
    ("get", "/api/runs"): (True, "RunOut"),
    ("post", "/api/runs"): (False, "RunOut"),
    ("get", "/api/runs/{run_id}"): (False, "RunOut"),
    ("delete", "/api/runs/{run_id}"): (False, "RunOut"),
    ("get", "/api/usage"): (False, "UsageOut"),
    ("get", "/readyz"): (False, "ReadyOut"),
}


def _path_template(path: str) -> str:
    """``/api/providers/${...provider.name...}`` → ``/api/providers/{provider}``; a run's id
    (``run.id``, ``runId``, ``shown.id``) → ``{run_id}``; a session id (``session.id``,
    ``sessionId``, ``this.sessionId``) → ``{session_id}``."""

    def parameter(match: re.Match[str]) -> str:
        if re.search(r"\bprovider\b", match.group(1)):
            return "{provider}"
        if path.startswith("/api/runs/"):
            return "{run_id}"
        return "{session_id}"

    return re.sub(r"\$\{([^}]*)\}", parameter, path)


def _source(name: str) -> str:
    return (STATIC / name).read_text()


def _constant(name: str) -> Any:
    """Return ``export const NAME = ...;`` of api.js, a JSON-like literal, as Python data."""
    match = re.search(rf"export const {name} = (.*?);\n", _source("api.js"), re.DOTALL)
    assert match is not None, f"api.js exports no {name}"
    literal = re.sub(r"(\w+):", r'"\1":', match.group(1))  # quote the object keys
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", literal))  # and drop trailing commas


def _schema_ref(schema: dict[str, Any]) -> str:
    return str(schema["$ref"]).rsplit("/", 1)[-1]


@pytest.fixture
async def openapi(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """The OpenAPI document a real controller serves through its gateway."""
    async with (
        banner_controller(tmp_path / "data") as controller,
        httpx.AsyncClient(base_url=controller.url(), timeout=5000 * MS) as client,
    ):
        response = await client.get("/api/openapi.json")
        assert response.status_code == 200
        yield response.json()


async def test_declared_fields_exist_in_the_schemas(openapi: dict[str, Any]) -> None:
    """Every field API_FIELDS says the dashboard reads is a property of that OpenAPI schema."""
    schemas = openapi["components"]["schemas"]
    declared: dict[str, list[str]] = _constant("API_FIELDS")
    for schema, fields in declared.items():
        if schema == "events":
            known = {field.name for field in dataclasses.fields(SessionEvent)}
        else:
            known = set(schemas[schema]["properties"])
        assert set(fields) <= known, f"{schema} has no {sorted(set(fields) - known)}"


async def test_calls_answer_the_declared_shapes(openapi: dict[str, Any]) -> None:
    """Each call the pages make exists and answers a documented schema (lists as arrays)."""
    made = set()
    for name in PAGES:
        for method, path in re.findall(r'api\("(\w+)", [`"]([^`"]+)[`"]', _source(name)):
            made.add((method.lower(), _path_template(path)))
    assert made == set(CALLS)
    for (method, path), (is_array, schema) in CALLS.items():
        responses = openapi["paths"][path][method]["responses"]
        ok = next(status for status in responses if status.startswith("2"))
        if schema is None:
            assert ok == "204", f"{method} {path}"
            continue
        body = responses[ok]["content"]["application/json"]["schema"]
        if is_array:
            assert body["type"] == "array", f"{method} {path}"
            body = body["items"]
        assert _schema_ref(body) == schema, f"{method} {path}"
    assert _constant("API_FIELDS")["ErrorOut"] == ["message"]
    assert set(openapi["components"]["schemas"]["ErrorOut"]["required"]) == {"error", "message"}


def test_pages_read_only_declared_fields() -> None:
    """Every field the pages read from an API answer (or a run's event) is one declared."""
    declared: dict[str, list[str]] = _constant("API_FIELDS")
    run_events: dict[str, list[str]] = _constant("RUN_EVENTS")
    pattern = re.compile(rf"\b({'|'.join(READERS | RUN_EVENT_READERS)})\??\.(\w+)")
    read: set[tuple[str, str]] = set()
    for name in PAGES:
        for variable, field in pattern.findall(_source(name)):
            if variable in READERS:
                read.add((READERS[variable], field))
            if variable in RUN_EVENT_READERS:
                read.add((f"event {RUN_EVENT_READERS[variable]}", field))
    assert read, "no API field reads found: did the variable names change?"
    assert {schema for schema, _ in read} >= {"RunOut", "UsageOut", "event text", "event done"}
    known = declared | {f"event {name}": fields for name, fields in run_events.items()}
    # `tokens` holds both a run's usage (UsageCountOut) and its usage event: the same fields.
    assert run_events["usage"] == declared["UsageCountOut"]
    undeclared = {(schema, field) for schema, field in read if field not in known[schema]}
    assert undeclared == set()


def test_event_names_are_the_ones_the_stream_sends() -> None:
    """The dashboard listens to exactly the SSE event names the controller sends."""
    sent = typing.get_args(typing.get_type_hints(SessionEvent)["type"])
    assert sorted(_constant("EVENT_NAMES")) == sorted(sent)
    assert "open-url" in sent
    assert re.search(r"for \(const name of EVENT_NAMES\)", _source("api.js"))


async def test_connecting_a_provider_is_read_as_documented(openapi: dict[str, Any]) -> None:
    """The fields behind Connected, the sign-in link and the callback's answer are all read."""
    declared: dict[str, list[str]] = _constant("API_FIELDS")
    assert {"connected", "connected_at", "updated_at"} <= set(declared["ProviderOut"])
    assert "open_url" in declared["SessionOut"]
    assert "url" in declared["events"]
    assert set(declared["CallbackOut"]) == {"status", "body"}
    schemas = openapi["components"]["schemas"]
    body = openapi["paths"]["/api/sessions/{session_id}/callback"]["post"]["requestBody"]
    request = schemas[_schema_ref(body["content"]["application/json"]["schema"])]
    assert set(request["properties"]) == {"url"}  # what the page posts: {url}
    assert re.search(r"\{\s*url,?\s*\}", _source("app.js"))
    for field in ("connected_at", "updated_at"):
        assert schemas["ProviderOut"]["properties"][field]["anyOf"][0]["format"] == "date-time"


def test_the_text_view_opens_the_documented_tty_path() -> None:
    """TTY_PATH is the WebSocket docs/api.md documents and the controller's bridge serves."""
    if importlib.util.find_spec("remotecli.controller.tty_bridge") is None:
        pytest.skip("the bridge serves no text view yet (remotecli.controller.tty_bridge)")
    served = importlib.import_module("remotecli.controller.tty_bridge").TTY_PATH
    path: str = _constant("TTY_PATH")
    assert path == "/api/sessions/{id}/tty"
    assert served.fullmatch(path.replace("{id}", "Jf-NV5Ar9ffvUNb-"))
    documented = API_DOC.read_text()
    if "/tty" not in documented:
        pytest.skip("docs/api.md does not document the text view's WebSocket yet")
    assert f"`{path}`" in documented or f"WebSocket `{path}`" in documented
    # the page opens it with the desktop's ticket, and offers the documented subprotocol
    assert re.search(r"ttyPath\(sessionId, ticket\)", _source("terminal.js"))
    assert re.search(r'\[\s*"tty",?\s*\]', _source("terminal.js"))


async def test_run_events_are_the_ones_the_stream_documents(openapi: dict[str, Any]) -> None:
    """RUN_EVENTS names the events a run's stream sends, each with the data fields it lists."""
    operation = openapi["paths"][RUN_EVENTS_PATH]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    # The stream's description lists each event as ``name`` ``{"field", ...}``.
    documented = {
        name: re.findall(r'"(\w+)"', fields)
        for name, fields in re.findall(r"``([a-z]+)`` ``\{([^}]*)\}``", operation["description"])
    }
    assert _constant("RUN_EVENTS") == documented
    # the page follows the stream the run names (events_path), listening to each of them
    assert "events_path" in _constant("API_FIELDS")["RunOut"]
    assert re.search(r"for \(const name of Object\.keys\(RUN_EVENTS\)\)", _source("api.js"))
    assert re.search(r"followRun\(\s*run\.events_path", _source("runs.js"))


async def test_asking_posts_what_the_api_takes(openapi: dict[str, Any]) -> None:
    """Ask posts {provider, prompt} to POST /api/runs, fields its request schema has."""
    schemas = openapi["components"]["schemas"]
    body = openapi["paths"]["/api/runs"]["post"]["requestBody"]
    request = schemas[_schema_ref(body["content"]["application/json"]["schema"])]
    assert {"provider", "prompt"} <= set(request["properties"])
    assert set(request["required"]) <= {"provider", "prompt"}
    assert re.search(r'api\("POST", "/api/runs", \{ provider, prompt \}\)', _source("runs.js"))
    states = set(schemas["RunOut"]["properties"]["state"].get("enum", []))
    if not states:  # an enum of its own
        states = set(schemas[_schema_ref(schemas["RunOut"]["properties"]["state"])]["enum"])
    final = re.search(r"RUN_FINAL_STATES = new Set\((\[[^\]]*\])\)", _source("api.js"))
    assert final is not None
    assert set(json.loads(final.group(1))) == states - {"queued", "running"}
