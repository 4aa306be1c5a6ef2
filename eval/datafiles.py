"""Reading evaluation rows from JSON / JSON Lines files, each row tagged with the file and line it came from.

Errors about a row must name the file, the line and the field, so rows are parsed here with their positions:
JSON Lines rows by line number, rows of a top-level JSON list by the line on which each row object starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".json", ".jsonl")


class EvalDataError(ValueError):
    """A task spec or data file that cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Row:
    """One data row: its fields, and where it came from (`source` a file path or hub id, `line` 1-based or None)."""

    data: dict
    source: str
    line: int | None

    @property
    def where(self) -> str:
        """`"file, line N"` for error messages."""
        return f"{self.source}, line {self.line}" if self.line is not None else self.source

    def error(self, field: str, problem: str) -> EvalDataError:
        """An `EvalDataError` for this row naming `field`."""
        return EvalDataError(f"{self.where}: field {field!r}: {problem}")


def read_rows(path: str | os.PathLike) -> list[Row]:
    """All row objects of a `.json` file (a list of objects) or a `.jsonl` file (one object per line, blank lines
    skipped), in file order.

    Raises:
        FileNotFoundError: `path` is not a file.
        EvalDataError: unknown suffix, empty file, malformed JSON (with its line), not a list, or a row that is not an
            object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise EvalDataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    rows = _json_lines(text, path) if path.suffix == ".jsonl" else _json_list(text, path)
    if not rows:
        raise EvalDataError(f"{path}: the file holds no rows")
    for row in rows:
        if not isinstance(row.data, dict):
            raise EvalDataError(f"{row.where}: expected a row object, got a {type(row.data).__name__}")
    return rows


def _json_lines(text: str, path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(Row(json.loads(line), str(path), number))
            except json.JSONDecodeError as error:
                raise EvalDataError(
                    f"{path}, line {number}: not valid JSON (column {error.colno}): {error.msg}"
                ) from None
    return rows


def _json_list(text: str, path: Path) -> list[Row]:
    """Rows of a top-level JSON list, decoded one element at a time so that each keeps the line it starts on."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if position == len(text):
        return []
    if text[position] != "[":
        hint = " (one object per line is JSON Lines: name the file .jsonl)" if text[position] == "{" else ""
        raise EvalDataError(f"{path}, line {_line(text, position)}: expected a JSON list of row objects{hint}")
    rows = []
    position = _skip_space(text, position + 1)
    line, counted = 1, 0  # line number of character `counted`, advanced incrementally (files have thousands of rows)
    while position < len(text) and text[position] != "]":
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise EvalDataError(
                f"{path}, line {error.lineno}: not valid JSON (column {error.colno}): {error.msg}"
            ) from None
        line, counted = line + text.count("\n", counted, position), position
        rows.append(Row(value, str(path), line))
        position = _skip_space(text, end)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
        elif position < len(text) and text[position] != "]":
            raise EvalDataError(f"{path}, line {_line(text, position)}: expected ',' or ']' after a row")
    if position >= len(text):
        raise EvalDataError(f"{path}, line {_line(text, len(text))}: the JSON list is not closed with ']'")
    if text[position + 1 :].strip():
        raise EvalDataError(f"{path}, line {_line(text, position + 1)}: extra data after the JSON list")
    return rows


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _line(text: str, position: int) -> int:
    """1-based line number of character `position`."""
    return text.count("\n", 0, position) + 1
