"""Row formats (chat, alpaca, text): detection, normalisation to messages or text, field problems, DataError."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

FormatName = Literal["chat", "alpaca", "text"]
FormatChoice = Literal["auto", "chat", "alpaca", "text"]

# Fields that identify each format; detection tries them in this order.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
EMPTY_FORMAT = "empty"  # resolved format of an auto-detected file without rows
TEXT_ROLE = "text"  # the role of the one turn of a plain-text row (RowBatch, example keys)


class DataError(ValueError):
    """A dataset the pipeline cannot read; the message names file, line, field and the fix."""


UNREADABLE_FIX = "write each row as a plain JSON object of strings (no huge numbers, no deep nesting)"


def why(error: BaseException) -> str:
    """What went wrong with one row, in one line, without the exception's traceback."""
    if isinstance(error, RecursionError):
        return "lists or objects nested too deeply"
    text = str(error).split("\n", 1)[0].split("; use sys.set_int_max_str_digits", 1)[0]
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def normalize_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Map a raw row to ``{"messages": [...]}`` or ``{"text": ...}``, keeping faulty values as given."""
    if fmt == "chat":
        return {"messages": row.get("messages")}
    if fmt == "alpaca":
        return {
            "messages": [
                {"role": "user", "content": _alpaca_prompt(row.get("instruction"), row.get("input"))},
                {"role": "assistant", "content": row.get("output")},
            ]
        }
    return {"text": row.get("text")}


def _alpaca_prompt(instruction: Any, extra: Any) -> Any:
    if not isinstance(instruction, str) or not isinstance(extra, str) or not extra:
        return instruction  # a null or non-string instruction stays visible to the contract
    return f"{instruction}\n\n{extra}"


def field_problem(row: dict[str, Any], fmt: str) -> str | None:
    """Why ``row`` lacks the fields or types its format needs; None when it has them."""
    if fmt == "chat":
        return _messages_problem(row.get("messages"))
    if fmt == "alpaca":
        for key, optional in (("instruction", False), ("input", True), ("output", False)):
            if key not in row and not optional:
                return f"missing field '{key}'"
            if row.get(key) is not None and not isinstance(row[key], str):
                return f"field '{key}' is {type(row[key]).__name__}, expected a string"
        return None
    if row.get("text") is not None and not isinstance(row["text"], str):
        return f"field 'text' is {type(row['text']).__name__}, expected a string"
    return None


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"field 'messages' is {type(messages).__name__}, expected a list of {{role, content}} objects"
    if not messages:
        return "field 'messages' is an empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {index + 1} is {type(message).__name__}, expected an object"
        if not isinstance(message.get("role"), str):
            return f"message {index + 1} has no string 'role'"
        if "content" not in message:
            return f"message {index + 1} has no 'content'"
        if message["content"] is not None and not isinstance(message["content"], str):
            return f"message {index + 1} 'content' is {type(message['content']).__name__}, expected a string"
    return None


def check_objects(path: Path, rows: list[Any], lines: list[int]) -> None:
    for row, line in zip(rows, lines):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{line}: expected an object with fields such as 'messages', got "
                f"{type(row).__name__}; write one JSON object per row"
            )


def row_format(row: dict[str, Any]) -> str | None:
    """The first format whose identifying fields are all present in ``row``."""
    for name, fields in FORMAT_FIELDS.items():
        if all(key in row for key in fields):
            return name
    return None


def _needs() -> str:
    needs = (f"{name} needs {' + '.join(repr(key) for key in fields)}" for name, fields in FORMAT_FIELDS.items())
    return "; ".join(needs)


def resolve_format(
    path: Path, rows: list[dict[str, Any]], lines: list[int], fmt: str, how: str = "set by data.format"
) -> str:
    """The format of ``rows``: detected when ``fmt`` is auto, else ``fmt`` (chosen ``how``), checked on every row."""
    if not rows:
        return EMPTY_FORMAT if fmt == "auto" else fmt
    found = [row_format(row) for row in rows]
    if fmt == "auto":
        known = [name for name in found if name is not None]
        if not known:
            raise DataError(
                f"{path}:{lines[0]}: unknown data format; found fields {_field_names(rows[0])}, but {_needs()}; "
                "rename the fields or convert the file"
            )
        detected = max(FORMAT_FIELDS, key=known.count)  # ties go to the earlier format
        _check_uniform(path, rows, lines, found, detected, "detected")
        return detected
    _check_uniform(path, rows, lines, found, fmt, how)
    return fmt


def _check_uniform(
    path: Path, rows: list[dict[str, Any]], lines: list[int], found: list[str | None], expected: str, how: str
) -> None:
    wrong = [index for index, name in enumerate(found) if name != expected and not _has_fields(rows[index], expected)]
    if not wrong:
        return
    first = wrong[0]
    shown = ", ".join(str(lines[index]) for index in wrong[:5])
    raise DataError(
        f"{path}: format '{expected}' ({how}) needs fields {list(FORMAT_FIELDS[expected])}, but {len(wrong)} "
        f"row(s) differ, at line(s) {shown}; line {lines[first]} has fields {_field_names(rows[first])} "
        f"({found[first] or 'no known format'}). Use one format per file ({_needs()})"
        + ("" if how == "detected" else " or set data.format: auto")
    )


def _field_names(row: dict[str, Any]) -> list[str]:
    return sorted(str(key) for key in row)  # a CSV row with surplus cells has the key None


def _has_fields(row: dict[str, Any], fmt: str) -> bool:
    return all(key in row for key in FORMAT_FIELDS[fmt])
