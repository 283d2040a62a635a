"""Schemathesis against the controller's own OpenAPI document: no 5xx, every answer as described.

The whole controller (gateway, API on its Unix socket, bridge, banner driver) runs in a
background event loop for the module; schemathesis reads ``/api/openapi.json`` through the
gateway and sends generated requests, authenticated with the admin token, over real sockets.
Bounded: a handful of examples per operation, so the module runs in well under a minute.
``/login`` is left out (ten wrong tokens would rate-limit every later call; its behaviour is
proven in ``test_trespass.py``), and so is the SSE stream (a live one never ends). ``/healthz``
is checked too: the gateway answers it itself, with the document's JSON.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
import uvloop
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.case import Case

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from tests.banner_driver import BannerDriver
from tests.conftest import MS

T = TypeVar("T")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


class ControllerUnderTest:
    """A controller with the banner driver on its own uvloop thread, for blocking clients."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir)
        self.controller = Controller(config, driver=BannerDriver())
        self.call(self.controller.start())
        self.base_url = self.controller.url()
        self.headers = {"Authorization": f"Bearer {self.controller.admin_token}"}

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the controller's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20000 * MS)

    def close(self) -> None:
        """Stop the controller and the loop thread."""
        self.call(self.controller.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10000 * MS)
        self.loop.close()


@pytest.fixture(scope="module")
def cut() -> Iterator[ControllerUnderTest]:
    """The module's controller under test, on a private data dir."""
    with tempfile.TemporaryDirectory(prefix="rc-schema-") as data_dir:
        running = ControllerUnderTest(Path(data_dir))
        yield running
        running.close()


def operations(cut: ControllerUnderTest) -> list[Any]:
    """The operations of the served OpenAPI document, minus /login and the SSE stream."""
    schema: Any = schemathesis.openapi.from_url(f"{cut.base_url}/api/openapi.json")
    schema = schema.exclude(path="/login").exclude(path_regex=r".*/events$")
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_answers_as_documented(cut: ControllerUnderTest) -> None:
    """Generated requests to each operation never get a 5xx and match the documented schema."""
    tried: list[str] = []
    for operation in operations(cut):

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def answers_as_documented(case: Case[Any]) -> None:
            case.call_and_validate(
                base_url=cut.base_url, headers=cut.headers, checks=CHECKS, timeout=10
            )

        answers_as_documented()
        tried.append(operation.label)
    assert len(tried) >= 6, tried


def test_real_sessions_answer_as_documented(cut: ControllerUnderTest) -> None:
    """With a real session, each operation on it answers 2xx in the documented shape."""
    by_label = {operation.label: operation for operation in operations(cut)}
    create = by_label["POST /api/sessions"]
    created = create.Case(body={"provider": "shell"}).call_and_validate(
        base_url=cut.base_url, headers=cut.headers, checks=CHECKS, timeout=10
    )
    assert created.status_code == 201
    session_id = created.json()["id"]
    run = {"provider": "shell", "prompt": "echo schema"}
    started = (
        by_label["POST /api/runs"]
        .Case(body=run)
        .call_and_validate(base_url=cut.base_url, headers=cut.headers, checks=CHECKS, timeout=10)
    )
    assert started.status_code == 201
    run_id = started.json()["id"]
    order = sorted(by_label, key=lambda label: label.startswith("DELETE"))
    expected = {  # what a real session answers where success needs more than the session
        # nothing listens on port 1 inside the session: the relay says so, as documented
        "POST /api/sessions/{session_id}/callback": 502,
    }
    for label in order:
        operation = by_label[label]
        if label == create.label:
            case = operation.Case(body={"provider": "shell"})
        elif label == "POST /api/runs":
            case = operation.Case(body=run)
        elif "{run_id}" in operation.path:
            case = operation.Case(path_parameters={"run_id": run_id})
        elif "{provider}" in operation.path:
            case = operation.Case(path_parameters={"provider": "shell"})
        elif "{session_id}" not in operation.path:
            case = operation.Case()
        elif label.startswith("PATCH"):
            case = operation.Case(
                path_parameters={"session_id": session_id}, body={"label": "renamed"}
            )
        elif label.endswith("/callback"):
            case = operation.Case(
                path_parameters={"session_id": session_id},
                body={"url": "http://localhost:1/callback?code=c"},
            )
        else:
            case = operation.Case(path_parameters={"session_id": session_id})
        checks = [c for c in CHECKS if label not in expected or c is not not_a_server_error]
        response = case.call_and_validate(
            base_url=cut.base_url, headers=cut.headers, checks=checks, timeout=10
        )
        if label in expected:
            assert response.status_code == expected[label], (label, response.text)
        else:
            assert response.status_code < 400 or response.status_code == 409, (label, response.text)


def test_the_document_lists_the_contract_paths(cut: ControllerUnderTest) -> None:
    """The served OpenAPI document describes the session API the architecture promises."""
    loaded = schemathesis.openapi.from_url(f"{cut.base_url}/api/openapi.json")
    paths = set(loaded.raw_schema["paths"])
    for path in (
        "/api/providers",
        "/api/sessions",
        "/api/sessions/{session_id}",
        "/api/sessions/{session_id}/events",
        "/api/sessions/{session_id}/ticket",
        "/api/auth/session/{session_id}",
    ):
        assert path in paths, f"{path} is missing from the OpenAPI document"
