"""The one mapping from remote-cli's errors to HTTP answers and WebSocket close frames."""

from __future__ import annotations

import json

from remotecli.exceptions import (
    ClientError,
    MethodNotAllowed,
    MisdirectedRequest,
    NotAuthenticated,
    RemoteCliError,
    TooManyRequests,
    UpgradeRequired,
    UpstreamRefused,
    VncUnavailable,
    close_for,
    error_for_status,
    http_answer,
)


def test_http_answer_is_json_with_kind_and_message() -> None:
    """An error answers its status with a JSON body of its kind and its message, unchanged."""
    message = "upstream 127.0.0.1:4000 refused the connection; check that it is running — now"
    answer = http_answer(UpstreamRefused(message))
    assert answer.status == 502
    assert ("Content-Type", "application/json") in answer.headers
    assert json.loads(answer.body) == {"error": "refused", "message": message}
    assert message.encode() in answer.body  # not escaped: a check for the cause still finds it


def test_http_answer_adds_the_headers_an_error_calls_for() -> None:
    """401 names the Bearer scheme, retry_after becomes Retry-After, carried headers are kept."""
    assert ("WWW-Authenticate", 'Bearer realm="remotecli"') in http_answer(
        NotAuthenticated("log in")
    ).headers
    assert ("Retry-After", "7") in http_answer(TooManyRequests("slow", retry_after=7)).headers
    carried = UpgradeRequired("speak 13", headers=((b"Sec-WebSocket-Version", b"13"),))
    assert ("Sec-WebSocket-Version", "13") in http_answer(carried).headers


def test_close_for_gives_the_close_code_and_a_reason_that_fits() -> None:
    """An error closes with its close code and its message cut to a close frame's 123 bytes."""
    assert close_for(VncUnavailable("gone")) == (1011, "gone")
    code, reason = close_for(MisdirectedRequest("é" * 100))
    assert code == 1008
    assert reason == "é" * 61
    assert len(reason.encode()) <= 123


def test_error_for_status_finds_the_tree_class() -> None:
    """A framework's status becomes the error of the tree with that status, or a generic one."""
    assert isinstance(error_for_status(405, "no"), MethodNotAllowed)
    teapot = error_for_status(418, "short and stout")
    assert isinstance(teapot, ClientError)
    assert teapot.status == 418
    assert type(error_for_status(599, "odd")) is RemoteCliError
    assert error_for_status(599, "odd").status == 599
