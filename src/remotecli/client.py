"""A small Python client of remote-cli's API, on httpx: providers, sessions, headless runs.

::

    from remotecli.client import Client

    with Client("https://cli.example.org", token="...") as api:
        run = api.create_run("shell", "uname -a")  # or a connected CLI, on a prompt
        for event in api.events(run["id"]):
            if event.type == "text":
                print(event.data["text"], end="", flush=True)
        print(api.run(run["id"])["state"])

:class:`AsyncClient` has the same methods, awaited (``async for event in api.events(...)``).
Every answer is the API's JSON (``docs/api.md``); an error answer raises the
:mod:`remotecli.exceptions` error of its status (``NotFound``, ``TooManyRequests`` with
``retry_after`` in its ``data``, ...), carrying the API's message. A run's event stream is read
with :class:`EventStreamParser`; when the connection drops before the final event, the
iterator reconnects with ``Last-Event-ID`` (at most :data:`RECONNECTS` times in a row), so no
event is lost or repeated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from remotecli.exceptions import RemoteCliError, error_for_status

RECONNECTS = 3
"""Times in a row an event stream is resumed after its connection dropped."""
FINAL_EVENTS = ("done", "error")


@dataclass(frozen=True)
class StreamEvent:
    """One Server-Sent Event of a run: ``id`` (its number), ``type`` and its JSON ``data``."""

    id: int
    type: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.type in FINAL_EVENTS


class EventStreamParser:
    """Reads ``text/event-stream`` lines (the WHATWG HTML standard, 9.2) into events.

    Feed it each line without its end of line (:meth:`feed_line`); it returns an event when a
    blank line ends one. Comments (``:``) and unknown fields are skipped, as the standard says.
    """

    def __init__(self) -> None:
        self.last_id = 0
        self._type = ""
        self._data: list[str] = []
        self._id: int | None = None

    def feed_line(self, line: str) -> StreamEvent | None:
        """Take one line; return the event it completes, if any."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and value.isdigit():
            self._id = int(value)
        return None

    def _dispatch(self) -> StreamEvent | None:
        kind, data, number = self._type or "message", self._data, self._id
        self._type, self._data, self._id = "", [], None
        if not data:
            return None
        if number is not None:
            self.last_id = number
        try:
            payload = json.loads("\n".join(data))
        except ValueError:
            payload = {"raw": "\n".join(data)}
        if not isinstance(payload, dict):
            payload = {"value": payload}
        return StreamEvent(self.last_id, kind, payload)


def _raise_for(response: httpx.Response) -> None:
    """Raise the remote-cli error an error answer stands for, with the API's own message."""
    if response.is_success:
        return
    try:
        body = response.json()
        message = str(body.get("message") or body)
    except ValueError:
        message = response.text[:500] or response.reason_phrase
    data: dict[str, object] = {}
    retry = response.headers.get("retry-after", "")
    if retry.isdigit():
        data["retry_after"] = int(retry)
    raise error_for_status(response.status_code, message, **data)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _run_body(provider: str, prompt: str, timeout_s: float | None) -> dict[str, object]:
    body: dict[str, object] = {"provider": provider, "prompt": prompt}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    return body


class Client:
    """The API over a blocking httpx client; use it as a context manager, or :meth:`close`.

    ``base_url`` is the gateway's (``http://127.0.0.1:8080``); ``token`` a user's API token.
    ``transport`` and ``timeout`` are httpx's (streams wait for events without a read timeout).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(token), transport=transport, timeout=timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _call(self, method: str, path: str, body: object = None) -> Any:
        response = self._http.request(method, path, json=body)
        _raise_for(response)
        return None if response.status_code == 204 else response.json()

    def me(self) -> dict[str, Any]:
        """Return who this client is signed in as."""
        return dict(self._call("GET", "/api/me"))

    def providers(self) -> list[dict[str, Any]]:
        """Return the providers, whether each is installed and connected."""
        return list(self._call("GET", "/api/providers"))

    def sessions(self) -> list[dict[str, Any]]:
        """Return your sessions, newest first."""
        return list(self._call("GET", "/api/sessions"))

    def create_session(self, provider: str, label: str | None = None) -> dict[str, Any]:
        """Create a session of ``provider``; it starts in the background."""
        return dict(self._call("POST", "/api/sessions", {"provider": provider, "label": label}))

    def session(self, session_id: str) -> dict[str, Any]:
        """Return one of your sessions."""
        return dict(self._call("GET", f"/api/sessions/{session_id}"))

    def delete_session(self, session_id: str) -> dict[str, Any]:
        """Stop one of your sessions; returns it once stopped."""
        return dict(self._call("DELETE", f"/api/sessions/{session_id}"))

    def create_run(
        self, provider: str, prompt: str, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Start a headless run of ``provider`` on ``prompt``; follow it with :meth:`events`."""
        return dict(self._call("POST", "/api/runs", _run_body(provider, prompt, timeout_s)))

    def runs(self) -> list[dict[str, Any]]:
        """Return your latest runs, newest first."""
        return list(self._call("GET", "/api/runs"))

    def run(self, run_id: str) -> dict[str, Any]:
        """Return one of your runs with its output so far."""
        return dict(self._call("GET", f"/api/runs/{run_id}"))

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        """Cancel one of your runs (idempotent); returns it once ended."""
        return dict(self._call("DELETE", f"/api/runs/{run_id}"))

    def usage(self) -> dict[str, Any]:
        """Return what your runs used this period, and your limits."""
        return dict(self._call("GET", "/api/usage"))

    def events(self, run_id: str, after: int = 0) -> Iterator[StreamEvent]:
        """Yield the run's events after number ``after``, as they come, up to the final one."""
        parser = EventStreamParser()
        parser.last_id = after
        drops = 0
        while True:
            headers = {"Last-Event-ID": str(parser.last_id)} if parser.last_id else {}
            try:
                with self._http.stream(
                    "GET", f"/api/runs/{run_id}/events", headers=headers, timeout=None
                ) as response:
                    if not response.is_success:
                        response.read()
                        _raise_for(response)
                    for line in response.iter_lines():
                        event = parser.feed_line(line)
                        if event is not None:
                            drops = 0
                            yield event
                            if event.final:
                                return
            except httpx.TransportError as exc:
                drops += 1
                if drops > RECONNECTS:
                    raise RemoteCliError(
                        f"the event stream of {run_id} kept dropping: {exc}"
                    ) from exc
                continue
            return  # the server ended the stream: nothing more will come


class AsyncClient:
    """:class:`Client`'s methods over an asyncio httpx client (``async with``, awaited)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(token), transport=transport, timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: object = None) -> Any:
        response = await self._http.request(method, path, json=body)
        _raise_for(response)
        return None if response.status_code == 204 else response.json()

    async def me(self) -> dict[str, Any]:
        """Return who this client is signed in as."""
        return dict(await self._call("GET", "/api/me"))

    async def providers(self) -> list[dict[str, Any]]:
        """Return the providers, whether each is installed and connected."""
        return list(await self._call("GET", "/api/providers"))

    async def sessions(self) -> list[dict[str, Any]]:
        """Return your sessions, newest first."""
        return list(await self._call("GET", "/api/sessions"))

    async def create_session(self, provider: str, label: str | None = None) -> dict[str, Any]:
        """Create a session of ``provider``; it starts in the background."""
        body = {"provider": provider, "label": label}
        return dict(await self._call("POST", "/api/sessions", body))

    async def session(self, session_id: str) -> dict[str, Any]:
        """Return one of your sessions."""
        return dict(await self._call("GET", f"/api/sessions/{session_id}"))

    async def delete_session(self, session_id: str) -> dict[str, Any]:
        """Stop one of your sessions; returns it once stopped."""
        return dict(await self._call("DELETE", f"/api/sessions/{session_id}"))

    async def create_run(
        self, provider: str, prompt: str, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Start a headless run of ``provider`` on ``prompt``; follow it with :meth:`events`."""
        body = _run_body(provider, prompt, timeout_s)
        return dict(await self._call("POST", "/api/runs", body))

    async def runs(self) -> list[dict[str, Any]]:
        """Return your latest runs, newest first."""
        return list(await self._call("GET", "/api/runs"))

    async def run(self, run_id: str) -> dict[str, Any]:
        """Return one of your runs with its output so far."""
        return dict(await self._call("GET", f"/api/runs/{run_id}"))

    async def cancel_run(self, run_id: str) -> dict[str, Any]:
        """Cancel one of your runs (idempotent); returns it once ended."""
        return dict(await self._call("DELETE", f"/api/runs/{run_id}"))

    async def usage(self) -> dict[str, Any]:
        """Return what your runs used this period, and your limits."""
        return dict(await self._call("GET", "/api/usage"))

    async def events(self, run_id: str, after: int = 0) -> AsyncIterator[StreamEvent]:
        """Yield the run's events after number ``after``, as they come, up to the final one."""
        parser = EventStreamParser()
        parser.last_id = after
        drops = 0
        while True:
            headers = {"Last-Event-ID": str(parser.last_id)} if parser.last_id else {}
            try:
                async with self._http.stream(
                    "GET", f"/api/runs/{run_id}/events", headers=headers, timeout=None
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        _raise_for(response)
                    async for line in response.aiter_lines():
                        event = parser.feed_line(line)
                        if event is not None:
                            drops = 0
                            yield event
                            if event.final:
                                return
            except httpx.TransportError as exc:
                drops += 1
                if drops > RECONNECTS:
                    raise RemoteCliError(
                        f"the event stream of {run_id} kept dropping: {exc}"
                    ) from exc
                continue
            return
