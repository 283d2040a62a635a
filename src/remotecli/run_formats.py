"""TEMPORARY stub until the formats module lands (text only)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RunEvent:
    type: str
    data: dict[str, object]


class OutputParser(Protocol):
    error: str | None

    def feed(self, data: bytes) -> list[RunEvent]: ...

    def end(self) -> list[RunEvent]: ...


class _Text:
    def __init__(self) -> None:
        self.error: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> list[RunEvent]:
        text = self._decoder.decode(data)
        return [RunEvent("text", {"text": text})] if text else []

    def end(self) -> list[RunEvent]:
        text = self._decoder.decode(b"", final=True)
        return [RunEvent("text", {"text": text})] if text else []


def parser_for(run_format: str) -> OutputParser:
    return _Text()
