"""What a headless run's CLI prints, read into one event shape for every provider: no I/O.

Theory of operation. A headless run (``POST /api/runs``) starts a provider's non-interactive
mode in a sandbox and streams what it prints to the user as :class:`RunEvent` s of three types:

- ``text`` ``{"text": str}``: a piece of the answer, as soon as the CLI gives it. All the
  ``text`` events of a run, concatenated, are the whole answer. Where the answer comes in
  separate messages (before and after a tool call), a blank line (``"\\n\\n"``) is put in front
  of the next message's first piece unless the text so far already ends with a newline, as the
  CLIs do in their own text output.
- ``tool`` ``{"name": str, "input": object}``: the CLI reports that the model uses a tool.
  ``input`` is a JSON object of at most :data:`TOOL_INPUT_MAX` bytes, nested at most
  :data:`TOOL_INPUT_DEPTH` deep; a bigger one is replaced by ``{"truncated": true, "preview":
  str}`` (the start of its JSON text).
- ``usage`` ``{"input_tokens": int, "output_tokens": int}``: the run's totals so far, as the CLI
  counts them (so the last one is the run's usage). ``input_tokens`` counts every token the
  model read, cached or not: Claude Code reports the cache apart and it is added back, Codex
  and Gemini count the cache inside their input already. ``output_tokens`` is the CLI's own.

One parser per :data:`RUN_FORMATS` entry (:func:`parser_for`), fed the standard output's bytes
as they arrive (:meth:`OutputParser.feed`, any chunking) and told of its end
(:meth:`OutputParser.end`). The JSON formats are JSON Lines: a line is at most
:data:`LINE_MAX` bytes (a longer one is skipped whole, never buffered beyond the cap), is
decoded as UTF-8 with replacement, and is ignored unless it is a JSON object; fields of the
wrong type are ignored. The bytes are the sandboxed user's, so nothing here raises on them.

``parser.error`` is the error the CLI itself reported in its format, in at most
:data:`ERROR_MAX` characters, once it is known to have ended the run: Claude Code's ``result``
with ``is_error``; Codex's ``turn.failed``; Gemini's ``result`` with status ``error``. Codex
and Gemini also print ``error`` lines that they recover from (Codex's "Reconnecting... 2/5",
Gemini's warnings): the last of those becomes ``parser.error`` only when the output ends
without a successful turn or result after it.

The shapes were read in the versions we install (``docs/runs.md`` says where):

- ``claude-stream-json``: ``claude -p PROMPT --output-format stream-json --verbose`` of Claude
  Code 2.1.197 (``--verbose`` is required with ``stream-json``), optionally with
  ``--include-partial-messages``. Text comes from ``stream_event`` lines' ``text_delta`` s when
  the CLI sends them, else from ``assistant`` messages' ``text`` blocks; never both for one
  message (the CLI sends an ``assistant`` line per content block after that block's deltas, with
  the ``message.id`` of the ``message_start``). Text of subagents (lines with a
  ``parent_tool_use_id``) is not the answer and is left out; their tool uses are kept. Tools are
  ``tool_use`` blocks; usage is the ``result`` line's ``usage`` (``input_tokens`` +
  ``cache_creation_input_tokens`` + ``cache_read_input_tokens``, and ``output_tokens``).
- ``codex-json``: ``codex exec --json PROMPT`` of Codex CLI 0.171.0. Text is each completed
  ``agent_message`` item. Tools are items: ``command_execution`` (name ``shell``, input
  ``{"command": str}``), ``mcp_tool_call`` (name ``mcp__SERVER__TOOL`` as Claude Code names MCP
  tools, input its ``arguments``), ``web_search`` (``{"query": str}``), ``file_change`` (name
  ``apply_patch``, input ``{"changes": [{"path", "kind"}]}``) and ``collab_tool_call`` (name
  its ``tool``), each once, when it starts or else when it completes. Usage is
  ``turn.completed``'s, which Codex fills with the thread's running total (so it is taken as
  it is, never summed).
- ``gemini-stream-json``: ``gemini -p PROMPT --output-format stream-json`` of Gemini CLI 0.61.0.
  Text is ``message`` lines of role ``assistant`` (the ``user`` line echoes the prompt and is
  left out); tools are ``tool_use`` lines (``tool_name``, ``parameters``); usage is the
  ``result`` line's ``stats`` (``input_tokens`` counts the cached tokens too).
- ``text``: the bytes as UTF-8 text, each chunk at once (a character split between chunks
  waits for its end); no tools, no usage, no error.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Protocol

RUN_FORMATS = ("claude-stream-json", "codex-json", "gemini-stream-json", "text")
"""The output formats a headless run's command may be read in."""

LINE_MAX = 1024 * 1024
"""The longest JSON line read, in bytes; a longer line is skipped whole."""
TOOL_INPUT_MAX = 16 * 1024
"""The largest tool input passed on, in bytes of its JSON text."""
TOOL_INPUT_DEPTH = 32
"""The deepest nesting of a tool input passed on (objects and arrays)."""
TOOL_PREVIEW_CHARS = 1024
"""How much of a tool input's JSON text a truncated input keeps as its ``preview``."""
ERROR_MAX = 500
"""The longest ``parser.error``, in characters."""
_TOOL_NAME_MAX = 200
"""The longest tool name passed on, in characters (real ones are under 100)."""
_MESSAGE_IDS_MAX = 1024
"""Message and item ids remembered (a run has far fewer; the set is then reset)."""
ID_MAX = 256
"""Characters of a message or item id; a longer one is no id (memory stays bounded)."""
TOKENS_MAX = 2**53
"""The largest token count taken (JavaScript's largest exact integer; SQLite stores it)."""

_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class RunEvent:
    """One event of a headless run's stream: ``text``, ``tool`` or ``usage`` (module docstring)."""

    type: str
    data: dict[str, object]


class OutputParser(Protocol):
    """Reads one run's standard output in one format; see the module docstring."""

    error: str | None
    """The error the CLI reported in its output, once known (read it after :meth:`end`)."""

    def feed(self, data: bytes) -> list[RunEvent]:
        """Take the next bytes of the output (any chunk); return the events they complete."""
        ...

    def end(self) -> list[RunEvent]:
        """Take the end of the output; return the events of what was left, and settle ``error``."""
        ...


def parser_for(run_format: str) -> OutputParser:
    """Return a new parser for ``run_format``; raise ValueError for a name not in RUN_FORMATS."""
    parsers: dict[str, type[OutputParser]] = {
        "claude-stream-json": ClaudeStreamJsonParser,
        "codex-json": CodexJsonParser,
        "gemini-stream-json": GeminiStreamJsonParser,
        "text": TextParser,
    }
    try:
        return parsers[run_format]()
    except KeyError:
        known = ", ".join(RUN_FORMATS)
        raise ValueError(f"unknown run format {run_format!r}: use one of {known}") from None


# -- reading hostile values -------------------------------------------------------------------


def _clean(text: str) -> str:
    """Return ``text`` without lone surrogates (JSON's ``\\ud800``), which UTF-8 cannot carry."""
    return _SURROGATES.sub("\ufffd", text)


def _short(message: str | None, default: str) -> str:
    """Return ``message`` (or ``default`` when it is blank) clean, stripped, within ERROR_MAX."""
    text = _clean(message or "").strip() or default
    if len(text) > ERROR_MAX:
        text = text[: ERROR_MAX - 1] + "…"
    return text


def _field_str(obj: dict[str, object], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _field_id(obj: dict[str, object], key: str) -> str | None:
    """Return ``obj[key]`` when it is a string of at most :data:`ID_MAX` characters."""
    value = _field_str(obj, key)
    return value if value is not None and len(value) <= ID_MAX else None


def _field_dict(obj: dict[str, object], key: str) -> dict[str, object] | None:
    value = obj.get(key)
    return value if isinstance(value, dict) else None


def _field_list(obj: dict[str, object], key: str) -> list[object]:
    value = obj.get(key)
    return value if isinstance(value, list) else []


def _field_count(obj: dict[str, object], key: str) -> int | None:
    """Return ``obj[key]`` when it is an int from 0 to :data:`TOKENS_MAX` (not a bool, not a
    float), else None."""
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TOKENS_MAX:
        return value
    return None


def _depth(value: object) -> int:
    """Return how deeply ``value`` nests objects and arrays (0 for a scalar), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _tool_input(value: object) -> dict[str, object]:
    """Return a tool's input as a bounded JSON object (module docstring); never raises."""
    if not isinstance(value, dict):
        return {}
    try:
        encoded = _clean(json.dumps(value, ensure_ascii=False))
    except (ValueError, RecursionError):  # nested beyond what json can write back
        return {"truncated": True, "preview": ""}
    if len(encoded.encode()) > TOOL_INPUT_MAX or _depth(value) > TOOL_INPUT_DEPTH:
        return {"truncated": True, "preview": encoded[:TOOL_PREVIEW_CHARS]}
    bounded: dict[str, object] = json.loads(encoded)  # a copy without lone surrogates
    return bounded


def _tool(name: str, value: object) -> RunEvent:
    return RunEvent("tool", {"name": _clean(name)[:_TOOL_NAME_MAX], "input": _tool_input(value)})


def _usage(input_tokens: int, output_tokens: int) -> RunEvent:
    return RunEvent("usage", {"input_tokens": input_tokens, "output_tokens": output_tokens})


# -- bytes to lines and text ------------------------------------------------------------------


class _LineSplitter:
    """Cuts bytes into lines of at most LINE_MAX bytes; a longer line is dropped whole."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skipping = False  # inside a line already over LINE_MAX

    def feed(self, data: bytes) -> list[bytes]:
        """Return the lines ``data`` completes (without their ``\\n``)."""
        lines: list[bytes] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            elif len(self._buffer) + (end - start) <= LINE_MAX:
                self._buffer += data[start:end]
                lines.append(bytes(self._buffer))
            self._buffer.clear()
            start = end + 1
        if not self._skipping:
            if len(self._buffer) + (len(data) - start) > LINE_MAX:
                self._buffer.clear()
                self._skipping = True
            else:
                self._buffer += data[start:]
        return lines

    def end(self) -> list[bytes]:
        """Return the last line when the output did not end with a newline."""
        line = bytes(self._buffer)
        self._buffer.clear()
        return [line] if line and not self._skipping else []


class TextParser:
    """The ``text`` format: the output is the answer, decoded as UTF-8 as it comes."""

    def __init__(self) -> None:
        self.error: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> list[RunEvent]:
        """Return the text of ``data`` at once (less a character split at its end)."""
        return self._text(self._decoder.decode(data))

    def end(self) -> list[RunEvent]:
        """Return what was held of a split character (as U+FFFD: the output ended inside it)."""
        return self._text(self._decoder.decode(b"", final=True))

    @staticmethod
    def _text(text: str) -> list[RunEvent]:
        return [RunEvent("text", {"text": text})] if text else []


# -- the JSON Lines formats -------------------------------------------------------------------


class _JsonLinesParser:
    """What the JSON Lines formats share: lines to objects, and joining the answer's text."""

    def __init__(self) -> None:
        self.error: str | None = None
        self._lines = _LineSplitter()
        self._last_text = ""  # the last text event's text: does the answer end with a newline?
        self._text_message: object = None  # which message the last text came from
        self._notice: str | None = None  # an error line the CLI may still recover from

    def feed(self, data: bytes) -> list[RunEvent]:
        """Return the events of the lines ``data`` completes."""
        events: list[RunEvent] = []
        for line in self._lines.feed(data):
            events += self._line(line)
        return events

    def end(self) -> list[RunEvent]:
        """Return the events of a last line without newline; settle ``error``."""
        events: list[RunEvent] = []
        for line in self._lines.end():
            events += self._line(line)
        if self.error is None and self._notice is not None:
            self.error = self._notice
        return events

    def _line(self, line: bytes) -> list[RunEvent]:
        try:
            obj = json.loads(line.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            return []
        if not isinstance(obj, dict):
            return []
        return self._object(obj)

    def _object(self, obj: dict[str, object]) -> list[RunEvent]:
        raise NotImplementedError

    def _text(self, text: str, message: object) -> list[RunEvent]:
        """Return a text event for ``text`` of ``message``, after a blank line if it is new."""
        if not text:
            return []
        text = _clean(text)
        if message != self._text_message and self._last_text and not self._last_text.endswith("\n"):
            text = "\n\n" + text
        self._text_message = message
        self._last_text = text
        return [RunEvent("text", {"text": text})]


class ClaudeStreamJsonParser(_JsonLinesParser):
    """Claude Code's ``--output-format stream-json --verbose`` (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._message_id: str | None = None  # of the last stream_event message_start
        self._streamed: set[str | None] = set()  # message ids whose text came as deltas

    def _object(self, obj: dict[str, object]) -> list[RunEvent]:
        kind = obj.get("type")
        if kind == "stream_event":
            return self._stream_event(obj)
        if kind == "assistant":
            return self._assistant(obj)
        if kind == "result":
            return self._result(obj)
        return []

    def _stream_event(self, obj: dict[str, object]) -> list[RunEvent]:
        event = _field_dict(obj, "event")
        if event is None or obj.get("parent_tool_use_id") is not None:
            return []
        if event.get("type") == "message_start":
            message = _field_dict(event, "message")
            self._message_id = _field_id(message, "id") if message is not None else None
            return []
        delta = _field_dict(event, "delta")
        if event.get("type") != "content_block_delta" or delta is None:
            return []
        text = _field_str(delta, "text")
        if delta.get("type") != "text_delta" or text is None:
            return []
        if len(self._streamed) >= _MESSAGE_IDS_MAX:
            self._streamed.clear()
        self._streamed.add(self._message_id)
        return self._text(text, ("message", self._message_id))

    def _assistant(self, obj: dict[str, object]) -> list[RunEvent]:
        message = _field_dict(obj, "message")
        if message is None:
            return []
        message_id = _field_id(message, "id")
        answer = obj.get("parent_tool_use_id") is None and message_id not in self._streamed
        events: list[RunEvent] = []
        for block in _field_list(message, "content"):
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            text = _field_str(block, "text")
            name = _field_str(block, "name")
            if kind == "text" and text is not None and answer:
                events += self._text(text, ("message", message_id))
            elif kind == "tool_use" and name is not None:
                events.append(_tool(name, block.get("input")))
        return events

    def _result(self, obj: dict[str, object]) -> list[RunEvent]:
        subtype = _field_str(obj, "subtype") or ""
        if obj.get("is_error") is True or subtype.startswith("error"):
            errors = [e for e in _field_list(obj, "errors") if isinstance(e, str)]
            message = _field_str(obj, "result") or "; ".join(errors) or subtype
            self.error = _short(message, "Claude Code reported an error")
        usage = _field_dict(obj, "usage")
        if usage is None:
            return []
        fresh = _field_count(usage, "input_tokens")
        output = _field_count(usage, "output_tokens")
        if fresh is None or output is None:
            return []
        written = _field_count(usage, "cache_creation_input_tokens") or 0
        read = _field_count(usage, "cache_read_input_tokens") or 0
        return [_usage(fresh + written + read, output)]


class CodexJsonParser(_JsonLinesParser):
    """Codex CLI's ``exec --json`` thread events (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._reported: set[str] = set()  # ids of the items already reported (text or tool)

    def _object(self, obj: dict[str, object]) -> list[RunEvent]:
        kind = obj.get("type")
        if kind in ("item.started", "item.updated", "item.completed"):
            item = _field_dict(obj, "item")
            return [] if item is None else self._item(item, completed=kind == "item.completed")
        if kind == "turn.completed":
            self._notice = None
            usage = _field_dict(obj, "usage")
            if usage is None:
                return []
            input_tokens = _field_count(usage, "input_tokens")
            output_tokens = _field_count(usage, "output_tokens")
            if input_tokens is None or output_tokens is None:
                return []
            return [_usage(input_tokens, output_tokens)]
        if kind == "turn.failed":
            error = _field_dict(obj, "error")
            message = _field_str(error, "message") if error is not None else None
            self.error = _short(message or self._notice, "Codex reported that the turn failed")
        elif kind == "error":
            message = _field_str(obj, "message")
            self._notice = _short(message, "Codex reported an error")
        return []

    def _item(self, item: dict[str, object], *, completed: bool) -> list[RunEvent]:
        item_id = _field_id(item, "id")
        kind = item.get("type")
        if item_id is None or item_id in self._reported:
            return []
        if kind == "agent_message":
            text = _field_str(item, "text")
            if not completed or not text:
                return []
            self._report(item_id)
            return self._text(text, ("item", item_id))
        tool = self._tool(item, kind, completed=completed)
        if tool is None:
            return []
        self._report(item_id)
        return [tool]

    def _report(self, item_id: str) -> None:
        """Remember ``item_id`` as reported, in a bounded set."""
        if len(self._reported) >= _MESSAGE_IDS_MAX:
            self._reported.clear()
        self._reported.add(item_id)

    @staticmethod
    def _tool(item: dict[str, object], kind: object, *, completed: bool) -> RunEvent | None:
        """Return the tool event of a tool item; None until the item says what it does."""
        if kind == "command_execution":
            command = _field_str(item, "command")
            return None if command is None else _tool("shell", {"command": command})
        if kind == "mcp_tool_call":
            server = _field_str(item, "server")
            name = _field_str(item, "tool")
            if server is None or name is None:
                return None
            return _tool(f"mcp__{server}__{name}", item.get("arguments"))
        if not completed:  # a search's query and a patch's changes are known at its end
            return None
        if kind == "web_search":
            query = _field_str(item, "query")
            return None if query is None else _tool("web_search", {"query": query})
        if kind == "file_change":
            changes = [
                {"path": change.get("path"), "kind": change.get("kind")}
                for change in _field_list(item, "changes")
                if isinstance(change, dict)
            ]
            return _tool("apply_patch", {"changes": changes})
        if kind == "collab_tool_call":
            name = _field_str(item, "tool")
            prompt = _field_str(item, "prompt")
            if name is None:
                return None
            return _tool(name, {} if prompt is None else {"prompt": prompt})
        return None


class GeminiStreamJsonParser(_JsonLinesParser):
    """Gemini CLI's ``--output-format stream-json`` (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._turn = 0  # counts tool uses: the text after one is a new message

    def _object(self, obj: dict[str, object]) -> list[RunEvent]:
        kind = obj.get("type")
        if kind == "message":
            text = _field_str(obj, "content")
            if obj.get("role") != "assistant" or text is None:
                return []
            return self._text(text, ("turn", self._turn))
        if kind == "tool_use":
            name = _field_str(obj, "tool_name")
            if name is None:
                return []
            self._turn += 1
            return [_tool(name, obj.get("parameters"))]
        if kind == "error":
            message = _field_str(obj, "message")
            if obj.get("severity") == "error" and message is not None:
                self._notice = _short(message, "Gemini CLI reported an error")
            return []
        if kind == "result":
            return self._result(obj)
        return []

    def _result(self, obj: dict[str, object]) -> list[RunEvent]:
        if obj.get("status") == "error":
            error = _field_dict(obj, "error")
            message = _field_str(error, "message") if error is not None else None
            self.error = _short(message or self._notice, "Gemini CLI reported an error")
        else:
            self._notice = None
        stats = _field_dict(obj, "stats")
        if stats is None:
            return []
        input_tokens = _field_count(stats, "input_tokens")
        output_tokens = _field_count(stats, "output_tokens")
        if input_tokens is None or output_tokens is None:
            return []
        return [_usage(input_tokens, output_tokens)]
