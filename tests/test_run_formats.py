"""Headless runs' output formats (remotecli.run_formats): sample outputs and hostile bytes, fed.

The samples in ``tests/standin/runs`` and what each must give (``expected.json``) are described in
that directory's README.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remotecli.run_formats import (
    ERROR_MAX,
    ID_MAX,
    LINE_MAX,
    RUN_FORMATS,
    TOOL_INPUT_DEPTH,
    TOOL_INPUT_MAX,
    TOOL_PREVIEW_CHARS,
    CodexJsonParser,
    OutputParser,
    RunEvent,
    parser_for,
)

RUNS = Path(__file__).parent / "standin" / "runs"
EXPECTED: dict[str, dict[str, Any]] = json.loads(
    (RUNS / "expected.json").read_text(encoding="utf-8")
)
ANSWER = "I'll count the lines in README.md.\n\nREADME.md has 42 lines — the last one is blank."
JSON_FORMATS = [name for name in RUN_FORMATS if name != "text"]


def parse(run_format: str, *chunks: bytes) -> tuple[list[RunEvent], OutputParser]:
    """Feed ``chunks`` to a new parser, then end it; return all events and the parser."""
    parser = parser_for(run_format)
    events: list[RunEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.end()
    return events, parser


def lines(*objects: object) -> bytes:
    return b"".join(json.dumps(obj).encode() + b"\n" for obj in objects)


def text_of(events: list[RunEvent]) -> str:
    return "".join(str(event.data["text"]) for event in events if event.type == "text")


def of_type(events: list[RunEvent], kind: str) -> list[dict[str, object]]:
    return [event.data for event in events if event.type == kind]


def assistant(content: object, message_id: str = "msg_1", parent: str | None = None) -> object:
    message = {"id": message_id, "role": "assistant", "content": content}
    return {"type": "assistant", "message": message, "parent_tool_use_id": parent}


def claude_tool(tool_input: object) -> object:
    return assistant([{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": tool_input}])


# -- the samples ------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", sorted(EXPECTED))
def test_sample_gives_its_answer_tools_usage_and_error(sample: str) -> None:
    """Each sample read whole gives exactly the text, tools, usage and error in expected.json."""
    expected = EXPECTED[sample]
    events, parser = parse(expected["format"], (RUNS / sample).read_bytes())
    assert text_of(events) == expected["text"]
    assert of_type(events, "tool") == expected["tools"]
    assert of_type(events, "usage") == expected["usage"]
    assert parser.error == expected["error"]


@pytest.mark.parametrize("sample", sorted(EXPECTED))
def test_sample_fed_one_byte_at_a_time_gives_the_same_events(sample: str) -> None:
    """Chunking does not matter: one byte per feed gives the same events and error as whole."""
    expected = EXPECTED[sample]
    data = (RUNS / sample).read_bytes()
    whole, whole_parser = parse(expected["format"], data)
    bytewise, bytewise_parser = parse(expected["format"], *(bytes([b]) for b in data))
    assert bytewise == whole
    assert bytewise_parser.error == whole_parser.error


def test_successful_samples_all_give_the_same_documented_answer() -> None:
    """The four successful samples answer with the text the README states, for replay tests."""
    answers = {name: e["text"] for name, e in EXPECTED.items() if e["error"] is None}
    assert len(answers) == 4
    assert set(answers.values()) == {ANSWER}
    assert "README.md has 42 lines" in (RUNS / "README.md").read_text(encoding="utf-8")


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@settings(max_examples=60, deadline=None)
def test_any_chunking_of_a_sample_gives_the_same_events(cuts: list[int]) -> None:
    """Cutting the partial-messages sample anywhere gives the same events as reading it whole."""
    data = (RUNS / "claude-stream-json-partial.jsonl").read_bytes()
    points = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert parse("claude-stream-json", *chunks)[0] == parse("claude-stream-json", data)[0]


# -- Claude Code ------------------------------------------------------------------------------


def test_claude_partial_messages_give_the_text_from_deltas_only() -> None:
    """With --include-partial-messages the text comes from the deltas, not again from the blocks."""
    events, _ = parse(
        "claude-stream-json", (RUNS / "claude-stream-json-partial.jsonl").read_bytes()
    )
    pieces = [event.data["text"] for event in events if event.type == "text"]
    assert pieces == [
        "I'll count",
        " the lines in",
        " README.md.",
        "\n\nREADME.md has",
        " 42 lines —",
        " the last one is blank.",
    ]


def test_claude_message_without_deltas_still_gives_its_text() -> None:
    """A message the CLI made up without a stream (an API error) is shown even in partial mode."""
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}
    events, _ = parse(
        "claude-stream-json",
        lines(
            {"type": "stream_event", "event": {"type": "message_start", "message": {"id": "m1"}}},
            {"type": "stream_event", "event": delta},
            assistant([{"type": "text", "text": "Hi"}], "m1"),
            assistant([{"type": "text", "text": "API Error: overloaded"}], "synthetic-2"),
        ),
    )
    assert text_of(events) == "Hi\n\nAPI Error: overloaded"


def test_claude_subagent_text_is_left_out_but_its_tools_are_kept() -> None:
    """Lines with a parent_tool_use_id (a subagent's) give tools but no answer text."""
    blocks = [
        {"type": "text", "text": "subagent musing"},
        {"type": "tool_use", "name": "Grep", "input": {"pattern": "x"}},
    ]
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "inner"}}
    events, _ = parse(
        "claude-stream-json",
        lines(
            assistant(blocks, "m9", parent="toolu_1"),
            {"type": "stream_event", "event": delta, "parent_tool_use_id": "toolu_1"},
            assistant([{"type": "text", "text": "Done."}], "m10"),
        ),
    )
    assert text_of(events) == "Done."
    assert of_type(events, "tool") == [{"name": "Grep", "input": {"pattern": "x"}}]


def test_claude_result_error_subtype_gives_its_errors() -> None:
    """A result of subtype error_* without result text reports its errors list, joined."""
    result = {
        "type": "result",
        "subtype": "error_max_turns",
        "is_error": True,
        "errors": ["Reached maximum number of turns (3)"],
        "usage": {"input_tokens": 10, "output_tokens": 2, "cache_read_input_tokens": 5},
    }
    events, parser = parse("claude-stream-json", lines(result))
    assert parser.error == "Reached maximum number of turns (3)"
    assert of_type(events, "usage") == [{"input_tokens": 15, "output_tokens": 2}]


def test_claude_run_without_result_reports_no_error() -> None:
    """Output that ends before any result has no CLI-reported error (the exit status tells)."""
    _, parser = parse("claude-stream-json", lines(assistant([{"type": "text", "text": "Hi"}])))
    assert parser.error is None


# -- Codex CLI --------------------------------------------------------------------------------


def codex_item(kind: str, item: Mapping[str, object], item_id: str = "item_1") -> object:
    return {"type": kind, "item": {"id": item_id, **item}}


def test_codex_tool_items_map_to_tools_once_each() -> None:
    """MCP calls, web searches and patches become tools named as documented, once per item."""
    mcp = {"type": "mcp_tool_call", "server": "docs", "tool": "search", "arguments": {"q": "x"}}
    search = {"type": "web_search", "id": "ws_1", "query": "", "action": {"type": "other"}}
    patch = {"type": "file_change", "changes": [{"path": "a.py", "kind": "update", "diff": "@@"}]}
    events, _ = parse(
        "codex-json",
        lines(
            codex_item("item.started", {**mcp, "status": "in_progress"}, "item_1"),
            codex_item("item.completed", {**mcp, "status": "completed"}, "item_1"),
            codex_item("item.started", search, "item_2"),
            codex_item("item.completed", {**search, "query": "codex exec json"}, "item_2"),
            codex_item("item.updated", {**patch, "status": "in_progress"}, "item_3"),
            codex_item("item.completed", {**patch, "status": "completed"}, "item_3"),
        ),
    )
    assert of_type(events, "tool") == [
        {"name": "mcp__docs__search", "input": {"q": "x"}},
        {"name": "web_search", "input": {"query": "codex exec json"}},
        {"name": "apply_patch", "input": {"changes": [{"path": "a.py", "kind": "update"}]}},
    ]


def test_codex_usage_is_taken_as_reported_not_summed() -> None:
    """Each turn.completed's usage (Codex's running thread total) is passed on as it is."""
    usage_1 = {"input_tokens": 100, "cached_input_tokens": 80, "output_tokens": 10}
    usage_2 = {"input_tokens": 250, "cached_input_tokens": 200, "output_tokens": 30}
    events, _ = parse(
        "codex-json",
        lines(
            {"type": "turn.completed", "usage": usage_1},
            {"type": "turn.completed", "usage": usage_2},
        ),
    )
    assert of_type(events, "usage") == [
        {"input_tokens": 100, "output_tokens": 10},
        {"input_tokens": 250, "output_tokens": 30},
    ]


def test_codex_error_lines_it_recovers_from_are_not_the_error() -> None:
    """``error`` lines followed by turn.completed (a reconnect that worked) leave error None."""
    _, parser = parse(
        "codex-json",
        lines(
            {"type": "error", "message": "Reconnecting... 2/5 (stream disconnected)"},
            {"type": "turn.completed", "usage": {"input_tokens": 1, "output_tokens": 1}},
        ),
    )
    assert parser.error is None


def test_codex_output_ending_after_error_lines_reports_the_last() -> None:
    """When the output ends after ``error`` lines and no finished turn, the last is the error."""
    data = lines(
        {"type": "turn.started"},
        {"type": "error", "message": "Reconnecting... 2/5"},
        {"type": "error", "message": "Reconnecting... waiting for network"},
    )
    parser = parser_for("codex-json")
    parser.feed(data)
    assert parser.error is None  # it may still recover
    parser.end()
    assert parser.error == "Reconnecting... waiting for network"


# -- Gemini CLI -------------------------------------------------------------------------------


def test_gemini_never_echoes_the_prompt() -> None:
    """The user message (the prompt, echoed) is not answer text."""
    events, _ = parse("gemini-stream-json", (RUNS / "gemini-stream-json.jsonl").read_bytes())
    assert "How many lines" not in text_of(events)


def test_gemini_warnings_and_recovered_errors_are_not_the_error() -> None:
    """Warning lines, and error lines followed by a successful result, leave error None."""
    _, parser = parse(
        "gemini-stream-json",
        lines(
            {
                "type": "error",
                "severity": "warning",
                "message": "Loop detected, stopping execution",
            },
            {"type": "error", "severity": "error", "message": "Maximum session turns exceeded"},
            {"type": "result", "status": "success", "stats": {}},
        ),
    )
    assert parser.error is None


def test_gemini_error_result_without_message_reports_the_error_line_before() -> None:
    """A result with status error and no error field reports the error line before it."""
    _, parser = parse(
        "gemini-stream-json",
        lines(
            {"type": "error", "severity": "error", "message": "Model stream ended empty"},
            {"type": "result", "status": "error", "stats": {"input_tokens": 3, "output_tokens": 0}},
        ),
    )
    assert parser.error == "Model stream ended empty"


# -- the text format --------------------------------------------------------------------------


def test_text_is_passed_on_at_once_without_waiting_for_a_newline() -> None:
    """Each chunk's text is an event as soon as it is fed."""
    parser = parser_for("text")
    assert parser.feed(b"Hello") == [RunEvent("text", {"text": "Hello"})]
    assert parser.feed(b", world\n") == [RunEvent("text", {"text": ", world\n"})]
    assert parser.end() == []
    assert parser.error is None


def test_text_holds_a_split_character_until_it_is_complete() -> None:
    """A UTF-8 character cut between chunks comes out whole with its last byte."""
    parser = parser_for("text")
    dash = "—".encode()
    assert parser.feed(b"a" + dash[:1]) == [RunEvent("text", {"text": "a"})]
    assert parser.feed(dash[1:2]) == []
    assert parser.feed(dash[2:]) == [RunEvent("text", {"text": "—"})]


def test_text_replaces_invalid_bytes_and_a_character_cut_by_the_end() -> None:
    """Bytes that are not UTF-8 become U+FFFD, as does a character the output ends inside."""
    events, _ = parse("text", b"ok\xff\xfe!", "—".encode()[:2])
    assert text_of(events) == "ok\ufffd\ufffd!\ufffd"


# -- hostile bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("run_format", JSON_FORMATS)
def test_lines_that_are_not_json_objects_are_ignored(run_format: str) -> None:
    """Non-JSON, arrays, strings, numbers, null, broken and empty lines give nothing, no error."""
    data = b'not json\n[1, 2]\n"text"\n42\nnull\n{"type": \n\n\r\n{"type": 7}\n[[[[[\n'
    events, parser = parse(run_format, data)
    assert events == []
    assert parser.error is None


@pytest.mark.parametrize("run_format", JSON_FORMATS)
def test_arbitrary_bytes_never_raise(run_format: str) -> None:
    """Random bytes, cut anywhere, are read without an exception."""

    @given(chunks=st.lists(st.binary(max_size=200), max_size=20))
    @settings(max_examples=80, deadline=None)
    def check(chunks: list[bytes]) -> None:
        parse(run_format, *chunks)

    check()


def test_fields_of_the_wrong_type_are_ignored() -> None:
    """Wrong types anywhere (content, blocks, names, counts) give no event and no exception."""
    claude = lines(
        {"type": "assistant", "message": "text"},
        {"type": "assistant", "message": {"id": 5, "content": {"type": "text"}}},
        assistant([7, None, {"type": "text", "text": 3}, {"type": "tool_use", "name": ["x"]}]),
        {"type": "stream_event", "event": {"type": "content_block_delta", "delta": "x"}},
        {"type": "stream_event", "event": {"type": "message_start", "message": []}},
        {"type": "result", "usage": {"input_tokens": True, "output_tokens": 1}},
        {"type": "result", "usage": {"input_tokens": 1.5, "output_tokens": 1}},
        {"type": "result", "usage": {"input_tokens": "9", "output_tokens": 1}},
        {"type": "result", "usage": {"input_tokens": -1, "output_tokens": 1}},
        {"type": "result", "usage": [1, 2]},
    )
    codex = lines(
        {"type": "item.completed", "item": "x"},
        {"type": "item.completed", "item": {"id": 1, "type": "agent_message", "text": "x"}},
        codex_item("item.completed", {"type": "agent_message", "text": None}),
        codex_item("item.started", {"type": "command_execution", "command": ["ls"]}, "item_2"),
        codex_item("item.started", {"type": "mcp_tool_call", "server": 1, "tool": "t"}, "item_3"),
        {"type": "turn.completed", "usage": {"input_tokens": False, "output_tokens": 0}},
        {"type": "turn.completed", "usage": "lots"},
        {"type": "turn.failed", "error": "nope"},
    )
    gemini = lines(
        {"type": "message", "role": "assistant", "content": ["x"]},
        {"type": "tool_use", "tool_name": None, "parameters": {}},
        {"type": "result", "status": "success", "stats": {"input_tokens": 1e3, "output_tokens": 1}},
        {"type": "result", "status": "success", "stats": "none"},
    )
    assert parse("claude-stream-json", claude)[0] == []
    codex_events, codex_parser = parse("codex-json", codex)
    assert codex_events == []
    assert codex_parser.error == "Codex reported that the turn failed"
    assert parse("gemini-stream-json", gemini)[0] == []


def test_a_tool_input_that_is_not_an_object_becomes_empty() -> None:
    """A tool_use whose input is not a JSON object is reported with an empty input."""
    events, _ = parse("claude-stream-json", lines(claude_tool([1, 2, 3])))
    assert of_type(events, "tool") == [{"name": "Bash", "input": {}}]


@pytest.mark.parametrize("run_format", JSON_FORMATS)
def test_an_overlong_line_is_skipped_whole_and_the_next_one_read(run_format: str) -> None:
    """A line over LINE_MAX gives nothing, even in pieces; the line after it is read as usual."""
    text = {"type": "message", "role": "assistant", "content": "after", "delta": True}
    after = {
        "claude-stream-json": assistant([{"type": "text", "text": "after"}]),
        "codex-json": codex_item("item.completed", {"type": "agent_message", "text": "after"}),
        "gemini-stream-json": text,
    }[run_format]
    overlong = {**text, "content": "x" * LINE_MAX}  # valid JSON, a text line if it were read
    data = json.dumps(overlong).encode() + b"\n" + lines(after)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    events, _ = parse(run_format, *chunks)
    assert text_of(events) == "after"


def test_a_line_of_exactly_line_max_bytes_is_read() -> None:
    """The cap is inclusive: a line of LINE_MAX bytes (without its newline) is still parsed."""
    head = json.dumps({"type": "message", "role": "assistant", "content": ""})[:-2]
    line = (head + "x" * (LINE_MAX - len(head) - 2) + '"}').encode()
    assert len(line) == LINE_MAX
    events, _ = parse("gemini-stream-json", line + b"\n")
    assert len(text_of(events)) == LINE_MAX - len(head) - 2


def test_an_endless_line_is_not_buffered() -> None:
    """Sixteen MiB without a newline never hold more than about LINE_MAX bytes in memory."""
    parser = parser_for("claude-stream-json")
    chunk = b"a" * 65536
    tracemalloc.start()
    try:
        for _ in range(256):
            assert parser.feed(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * LINE_MAX
    assert parser.end() == []


def test_invalid_utf8_and_lone_surrogates_in_a_line_become_replacement_characters() -> None:
    """Bad bytes and JSON lone surrogates come out as U+FFFD, so the text is valid UTF-8."""
    data = (
        b'{"type":"message","role":"assistant","content":"caf\xc3"}\n'
        b'{"type":"message","role":"assistant","content":" \\ud800!"}\n'
    )
    events, _ = parse("gemini-stream-json", data)
    assert text_of(events) == "caf\ufffd \ufffd!"
    text_of(events).encode()  # would raise on a surrogate


def test_a_huge_tool_input_is_truncated_to_a_preview() -> None:
    """A tool input over TOOL_INPUT_MAX is replaced by a marker with a bounded preview."""
    events, _ = parse("claude-stream-json", lines(claude_tool({"content": "y" * 100_000})))
    (tool,) = of_type(events, "tool")
    tool_input = tool["input"]
    assert isinstance(tool_input, dict)
    assert tool_input["truncated"] is True
    assert str(tool_input["preview"]).startswith('{"content": "yyy')
    assert len(str(tool_input["preview"])) == TOOL_PREVIEW_CHARS
    assert len(json.dumps(tool)) < TOOL_INPUT_MAX


def test_a_deeply_nested_tool_input_is_truncated() -> None:
    """An input nested deeper than TOOL_INPUT_DEPTH is replaced by the marker, however small."""
    nested: object = 1
    for _ in range(TOOL_INPUT_DEPTH + 1):
        nested = [nested]
    events, _ = parse("claude-stream-json", lines(claude_tool({"n": nested})))
    (tool,) = of_type(events, "tool")
    assert tool["input"] == {"truncated": True, "preview": json.dumps({"n": nested})}


def test_a_tool_input_at_the_depth_limit_is_kept() -> None:
    """An input nested exactly TOOL_INPUT_DEPTH deep is passed on as it is."""
    nested: object = 1
    for _ in range(TOOL_INPUT_DEPTH - 1):
        nested = [nested]
    events, _ = parse("claude-stream-json", lines(claude_tool({"n": nested})))
    assert of_type(events, "tool") == [{"name": "Bash", "input": {"n": nested}}]


def test_nesting_deeper_than_json_can_read_is_ignored() -> None:
    """A line nested a hundred thousand deep (a RecursionError in json) is skipped, not raised."""
    line = b'{"type":"assistant","message":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    events, _ = parse(
        "claude-stream-json", line, lines(assistant([{"type": "text", "text": "ok"}]))
    )
    assert text_of(events) == "ok"


@pytest.mark.parametrize(
    ("run_format", "line"),
    [
        ("claude-stream-json", {"type": "result", "is_error": True, "result": "e" * 5000}),
        ("codex-json", {"type": "turn.failed", "error": {"message": "e" * 5000}}),
        (
            "gemini-stream-json",
            {"type": "result", "status": "error", "error": {"message": "e" * 5000}},
        ),
    ],
)
def test_the_error_is_capped(run_format: str, line: object) -> None:
    """A CLI's error message is cut to ERROR_MAX characters, ending in an ellipsis."""
    _, parser = parse(run_format, lines(line))
    assert parser.error is not None
    assert len(parser.error) == ERROR_MAX
    assert parser.error.endswith("…")


def test_a_last_line_without_newline_is_read_at_the_end() -> None:
    """The final line is parsed by end() when the output does not end with a newline."""
    parser = parser_for("codex-json")
    line = json.dumps({"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1}})
    assert parser.feed(line.encode()) == []
    assert parser.end() == [RunEvent("usage", {"input_tokens": 5, "output_tokens": 1})]


# -- choosing a parser ------------------------------------------------------------------------


def test_every_run_format_has_a_parser_and_an_unknown_one_is_refused() -> None:
    """parser_for knows each of RUN_FORMATS and raises ValueError naming them for another."""
    for run_format in RUN_FORMATS:
        assert parser_for(run_format).error is None
    with pytest.raises(ValueError, match=r"unknown run format 'json'.*claude-stream-json"):
        parser_for("json")


def test_parsers_are_independent() -> None:
    """Two parsers of one format share no state."""
    first, second = parser_for("text"), parser_for("text")
    assert first.feed("—".encode()[:1]) == []
    assert second.feed(b"x") == [RunEvent("text", {"text": "x"})]


# -- what a hostile CLI can make the controller hold --------------------------------------------


def test_token_counts_past_two_to_the_53_are_not_taken() -> None:
    """A forged count past 2**53 (one SQLite or JavaScript could not hold) is no usage."""
    big = {"type": "turn.completed", "usage": {"input_tokens": 2**63, "output_tokens": 1}}
    fine = {"type": "turn.completed", "usage": {"input_tokens": 2**53, "output_tokens": 1}}
    events, _ = parse("codex-json", lines(big, fine))
    assert of_type(events, "usage") == [{"input_tokens": 2**53, "output_tokens": 1}]


def test_ids_too_long_to_be_ids_are_not_remembered() -> None:
    """Items and messages whose id is over ID_MAX characters give nothing and are not kept."""
    long_id = "i" * (ID_MAX + 1)
    parser = parser_for("codex-json")
    message = {"type": "agent_message", "text": "hello"}
    events = parser.feed(lines(codex_item("item.completed", message, long_id)))
    assert events == []
    assert isinstance(parser, CodexJsonParser)
    assert parser._reported == set()


def test_many_items_keep_a_bounded_memory() -> None:
    """Thousands of distinct items of empty or real text: the remembered ids stay bounded, and
    an empty message is not remembered at all."""
    parser = parser_for("codex-json")
    assert isinstance(parser, CodexJsonParser)
    empty = {"type": "agent_message", "text": ""}
    parser.feed(lines(*(codex_item("item.completed", empty, f"e{n}") for n in range(3000))))
    assert parser._reported == set()
    said = {"type": "agent_message", "text": "x"}
    parser.feed(lines(*(codex_item("item.completed", said, f"s{n}") for n in range(3000))))
    assert len(parser._reported) <= 1024
