"""Read training data: import the embedded chatterbot corpus, load user files, normalise rows.

Loading only refuses what makes a file unreadable (missing, malformed, no known format, mixed
formats). Content problems — empty turns, wrong roles, invalid UTF-8, duplicates, over-length,
leakage — are left in place and reported by the data contract, which can show every offending
line at once.

Two readers share one parsing of each line: ``load_split`` gives Python rows for tokenisation,
``read_batches`` streams a split as Arrow batches for the contract (JSONL and Parquet chunk by
chunk; a well-formed JSONL chunk is parsed by pyarrow, any other by the row-by-row path, so the
line numbers and the verdicts are the same either way).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraops.config import ImportConfig

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

logger = logging.getLogger(__name__)

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
TEXT_ROLE = "text"  # the one turn of a plain-text row in a RowBatch
BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A dataset the pipeline cannot read; the message names file, line, field and the fix."""


@dataclass
class LoadedSplit:
    """One split as read from disk, with the source line of every row for error reports."""

    path: str
    format: str  # "chat" | "alpaca" | "text", or "empty" when auto-detecting a file without rows
    rows: list[dict[str, Any]]  # as read (a CSV/Parquet ``messages`` JSON string is decoded)
    lines: list[int]  # 1-based line (JSONL/JSON) or data-row number (CSV/Parquet) of each row
    examples: list[dict[str, Any]] = field(default_factory=list)  # normalised: messages or text

    def __post_init__(self) -> None:
        if not self.examples:
            self.examples = [normalize_row(row, self.format) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def without_lines(self, lines: set[int]) -> LoadedSplit:
        """The split minus the rows at ``lines`` (quarantined by the data contract)."""
        keep = [index for index, line in enumerate(self.lines) if line not in lines]
        return LoadedSplit(
            path=self.path,
            format=self.format,
            rows=[self.rows[index] for index in keep],
            lines=[self.lines[index] for index in keep],
            examples=[self.examples[index] for index in keep],
        )


@dataclass
class RowBatch:
    """A chunk of one split as Arrow columns, for the data contract.

    Every example is a list of (role, content) turns: alpaca rows become a user and an assistant
    turn, text rows one turn with role ``"text"``. A row that lacks its format's fields or types
    holds null messages and says why in ``problems``.
    """

    path: str
    format: str
    lines: np.ndarray  # int64: 1-based line (JSONL/JSON) or data-row number (CSV/Parquet) of each row
    messages: pa.ListArray  # list<struct<role: string, content: string>>
    problems: dict[int, str] = field(default_factory=dict)  # batch row -> missing field or wrong type
    encoding: dict[int, str] = field(default_factory=dict)  # batch row -> invalid UTF-8 (where, which byte)
    offsets: np.ndarray | None = None  # int64 file offset of each row's line (JSONL), for byte positions

    def __len__(self) -> int:
        return len(self.lines)


# --- normalisation -------------------------------------------------------------------------


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


def normalize_text(value: Any) -> str:
    """Casefold and collapse whitespace: "Hello  there" and "hello there" count as one text."""
    return "" if value is None else " ".join(str(value).casefold().split())


def _messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    messages = example.get("messages")
    if not isinstance(messages, list):
        return []
    return [message for message in messages if isinstance(message, dict)]


def dedup_key(example: dict[str, Any]) -> str:
    """Normalised content of a whole example; equal keys are duplicates."""
    if "messages" in example:
        return "\x1e".join(
            f"{normalize_text(message.get('role'))}\x1f{normalize_text(message.get('content'))}"
            for message in _messages(example)
        )
    return normalize_text(example.get("text"))


def question_key(example: dict[str, Any]) -> str | None:
    """Normalised first user turn: the question a validation example asks."""
    for message in _messages(example):
        if message.get("role") == "user":
            return normalize_text(message.get("content")) or None
    return None


def answer_keys(example: dict[str, Any]) -> set[str]:
    """Normalised assistant turns: the targets a model could memorise from training."""
    return {
        normalize_text(message.get("content"))
        for message in _messages(example)
        if message.get("role") == "assistant" and normalize_text(message.get("content"))
    }


def overlap_keys(example: dict[str, Any]) -> set[str]:
    """Keys two examples must not share across train and validation (question, answers, whole)."""
    keys = {f"whole:{dedup_key(example)}"}
    question = question_key(example)
    if question:
        keys.add(f"question:{question}")
    keys.update(f"answer:{answer}" for answer in answer_keys(example))
    return keys


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


# --- loading user files --------------------------------------------------------------------


def _existing(path: str | Path) -> Path:
    from loraops.data.files import unreadable_reason

    path = Path(path)
    reason = unreadable_reason(path)
    if reason is not None:
        raise DataError(
            f"{path}: {reason}; set data.train_file / data.validation_file to a readable data file, "
            "or run `loraops import-data` to build the default dataset"
        )
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(
            f"{path}: unknown file extension '{path.suffix}'; use one of {', '.join(EXTENSIONS)} "
            "(JSON Lines is the usual choice)"
        )
    return path


def load_split(path: str | Path, fmt: FormatChoice = "auto") -> LoadedSplit:
    """Read one split (.jsonl, .json, .csv, .parquet) and resolve its format."""
    path = _existing(path)
    rows, lines = _read_rows(path)
    _check_objects(path, rows, lines)
    resolved = _resolve_format(path, rows, lines, fmt)
    if resolved == "chat" and path.suffix.lower() in (".csv", ".parquet"):
        rows = [_decode_messages(path, row, line) for row, line in zip(rows, lines)]
    logger.info("Loaded %d %s rows from %s", len(rows), resolved, path)
    return LoadedSplit(path=str(path), format=resolved, rows=rows, lines=lines)


def _check_objects(path: Path, rows: list[Any], lines: list[int]) -> None:
    for row, line in zip(rows, lines):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{line}: expected an object with fields such as 'messages', got "
                f"{type(row).__name__}; write one JSON object per row"
            )


def _read_rows(path: Path) -> tuple[list[Any], list[int]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        data = path.read_bytes()
        body = _strip_bom(data)
        rows, lines, _, _ = _parse_jsonl(path, body, 1, len(data) - len(body))
        return rows, lines
    if suffix == ".json":
        return _read_json_array(path)
    if suffix == ".csv":
        return _read_csv(path)
    return _read_parquet(path)


def _strip_bom(data: bytes) -> bytes:
    return data[len(BOM) :] if data.startswith(BOM) else data


def _parse_jsonl(
    path: Path, block: bytes, first_line: int, offset: int
) -> tuple[list[Any], list[int], list[int], dict[int, str]]:
    """Rows of a block of whole JSONL lines, with line numbers, file offsets and UTF-8 problems.

    Blank lines are skipped. Invalid UTF-8 is replaced (U+FFFD) and reported by row index, and raw
    control characters inside strings are accepted, so the contract can report both per line
    instead of the whole file failing to load.
    """
    rows: list[Any] = []
    lines: list[int] = []
    offsets: list[int] = []
    encoding: dict[int, str] = {}
    start = 0
    for number, raw in enumerate(block.split(b"\n"), start=first_line):
        line_offset, start = offset + start, start + len(raw) + 1
        text, problem = _decode_line(raw, line_offset)
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text, strict=False))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno}); "
                "each line must be one complete JSON object"
            ) from None
        except Exception as error:  # a huge integer, nesting too deep (RecursionError), ...
            raise DataError(f"{path}:{number}: unreadable JSON ({_why(error)}); {UNREADABLE_FIX}") from None
        if problem:
            encoding[len(lines)] = problem
        lines.append(number)
        offsets.append(line_offset)
    return rows, lines, offsets, encoding


def _read_text(path: Path) -> str:
    """A whole JSON or CSV file as text; invalid UTF-8 stops here with its line and byte offset."""
    data = _strip_bom(path.read_bytes())
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1)
        raise DataError(
            f"{path}:{line}: invalid UTF-8 byte 0x{data[error.start]:02x} at byte {column} of the line "
            f"(file offset {error.start}); re-save the file as UTF-8"
        ) from None


def _decode_line(raw: bytes, line_offset: int) -> tuple[str, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        problem = (
            f"invalid UTF-8 byte 0x{raw[error.start]:02x} at byte {error.start} of the line "
            f"(file offset {line_offset + error.start}); re-save the file as UTF-8"
        )
        return raw.decode("utf-8", errors="replace"), problem


def _read_json_array(path: Path) -> tuple[list[Any], list[int]]:
    """Decode a JSON list element by element so each row keeps the line it starts on."""
    text = _read_text(path)
    decoder = json.JSONDecoder(strict=False)
    position = _skip_space(text, 0)
    if text[position : position + 1] != "[":
        raise DataError(
            f"{path}:{text.count(chr(10), 0, position) + 1}: expected a JSON list of rows ('[' ...); "
            "for one object per line rename the file to .jsonl"
        )
    rows: list[Any] = []
    lines: list[int] = []
    position = _skip_space(text, position + 1)
    while text[position : position + 1] != "]":
        try:
            row, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
        except Exception as error:  # a huge integer, nesting too deep (RecursionError), ...
            line = text.count("\n", 0, position) + 1
            raise DataError(f"{path}:{line}: unreadable JSON ({_why(error)}); {UNREADABLE_FIX}") from None
        rows.append(row)
        lines.append(text.count("\n", 0, position) + 1)
        position = _skip_space(text, end)
        if text[position : position + 1] == ",":
            position = _skip_space(text, position + 1)
        elif text[position : position + 1] != "]":
            line = text.count("\n", 0, position) + 1
            raise DataError(f"{path}:{line}: malformed JSON (expected ',' or ']' after a row)")
    return rows, lines


UNREADABLE_FIX = "write each row as a plain JSON object of strings (no huge numbers, no deep nesting)"


def _why(error: BaseException) -> str:
    """What went wrong with one row, in one line, without the exception's traceback."""
    if isinstance(error, RecursionError):
        return "lists or objects nested too deeply"
    text = str(error).split("\n", 1)[0].split("; use sys.set_int_max_str_digits", 1)[0]
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(path: Path) -> tuple[list[Any], list[int]]:
    # Every cell is read as a string (an empty cell is ""), so nothing is silently turned into NaN.
    rows = [dict(row) for row in csv.DictReader(io.StringIO(_read_text(path), newline=""))]
    return rows, list(range(1, len(rows) + 1))


def _read_parquet(path: Path) -> tuple[list[Any], list[int]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({error}); rewrite it with DataFrame.to_parquet") from None
    return rows, list(range(1, len(rows) + 1))


def _decode_messages(path: Path, row: dict[str, Any], line: int) -> dict[str, Any]:
    """Tables hold ``messages`` as a JSON string (CSV always, Parquet often); decode it to a list."""
    messages = row.get("messages")
    if not isinstance(messages, str):
        return row
    try:
        return {**row, "messages": json.loads(messages)}
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{line}: field 'messages' holds malformed JSON ({error.msg}); it must be a JSON list "
            'such as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
        ) from None
    except Exception as error:  # a huge integer, nesting too deep (RecursionError), ...
        raise DataError(
            f"{path}:{line}: field 'messages' holds unreadable JSON ({_why(error)}); {UNREADABLE_FIX}"
        ) from None


# --- format detection ----------------------------------------------------------------------


def row_format(row: dict[str, Any]) -> str | None:
    """The first format whose identifying fields are all present in ``row``."""
    for name, fields in FORMAT_FIELDS.items():
        if all(key in row for key in fields):
            return name
    return None


def _needs() -> str:
    needs = (f"{name} needs {' + '.join(repr(key) for key in fields)}" for name, fields in FORMAT_FIELDS.items())
    return "; ".join(needs)


def _resolve_format(
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


# --- streaming a split as Arrow batches (for the data contract) ----------------------------

DEFAULT_CHUNK_BYTES = 32 << 20
MESSAGE_FIELDS = ("role", "content")


def read_batches(
    path: str | Path, fmt: FormatChoice = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[RowBatch]:
    """Stream one split as RowBatches: JSONL and Parquet in chunks of about ``chunk_bytes``, JSON and CSV whole.

    The first rows decide an auto-detected format; a later chunk in another format is an error that
    names its lines, as for a file read whole. An empty file gives one empty batch. The next chunk
    is read and parsed on a second thread while the caller works on this one (pyarrow releases
    the GIL), so two chunks are in memory at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    path = _existing(path)
    builders = _chunk_builders(path, chunk_bytes)
    expected, how = fmt, "set by data.format"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraops-read") as reader:
        pending = reader.submit(_build_next, builders, expected, how)
        while (batch := pending.result()) is not None:
            if len(batch) and expected == "auto":
                expected, how = batch.format, "detected"
            pending = reader.submit(_build_next, builders, expected, how)
            yield batch


def _build_next(builders: Iterator[Callable[[str, str], RowBatch]], fmt: str, how: str) -> RowBatch | None:
    build = next(builders, None)
    return None if build is None else build(fmt, how)


def _chunk_builders(path: Path, chunk_bytes: int) -> Iterator[Callable[[str, str], RowBatch]]:
    """One callable ``(fmt, how) -> RowBatch`` per chunk, so each chunk is read only when needed."""
    from functools import partial

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for block, first_line, offset in _jsonl_blocks(path, chunk_bytes):
            yield partial(_jsonl_batch, path, block, first_line, offset)
    elif suffix == ".parquet":
        for table, first_row in _parquet_tables(path, chunk_bytes):
            yield partial(_table_batch, path, table, first_row)
    else:
        rows, lines = _read_rows(path)
        yield partial(_rows_batch, path, rows, lines)


def _jsonl_blocks(path: Path, chunk_bytes: int) -> Iterator[tuple[bytes, int, int]]:
    """Blocks of whole lines: (bytes, number of the block's first line, file offset of the block)."""
    with path.open("rb") as handle:
        offset = len(BOM) if handle.read(len(BOM)) == BOM else 0
        line, size, yielded = 1, chunk_bytes, False
        while True:
            handle.seek(offset)
            block = handle.read(size)
            if len(block) == size and b"\n" not in block:
                size *= 2  # a line longer than a chunk: read on until it ends
                continue
            if len(block) == size:
                block = block[: block.rfind(b"\n") + 1]
            if block or not yielded:  # an empty file still gives one (empty) block
                yield block, line, offset
                yielded = True
            if not block:
                return
            line += block.count(b"\n")
            offset += len(block)
            size = chunk_bytes


def _jsonl_batch(path: Path, block: bytes, first_line: int, offset: int, fmt: str, how: str) -> RowBatch:
    """Parse a well-formed block with pyarrow; anything unusual goes row by row, as ``load_split`` does."""
    table = _arrow_json(block, fmt)
    if table is not None:
        lines, offsets = _line_positions(block, first_line, offset)
        batch = _arrow_batch(path, table, lines, fmt) if len(lines) == table.num_rows else None
        if batch is not None:
            batch.offsets = offsets
            return batch
    rows, lines, offsets, encoding = _parse_jsonl(path, block, first_line, offset)
    return _rows_batch(path, rows, lines, fmt, how, offsets=offsets, encoding=encoding)


def _arrow_json(block: bytes, fmt: str) -> pa.Table | None:
    """The block as a table, or None when pyarrow cannot read it as is (then rows go one by one)."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = None
    if fmt != "auto":  # known format: parse only its fields, with their types (a fifth faster)
        fields = {"chat": ("messages",), "alpaca": ("instruction", "input", "output"), "text": ("text",)}[fmt]
        turn = pa.struct([(name, pa.string()) for name in MESSAGE_FIELDS])
        schema = pa.schema([(name, pa.list_(turn) if name == "messages" else pa.string()) for name in fields])
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore" if schema else "infer")
    try:
        block.decode("utf-8")  # pyarrow does not check, and the contract must see every bad byte
        # One pyarrow block per chunk: contiguous columns, no copy to combine them; the parse of the
        # next chunk already runs beside the work on this one (read_batches).
        read = pj.ReadOptions(block_size=max(len(block) + 1, 1 << 20), use_threads=False)
        return pj.read_json(io.BytesIO(block), read_options=read, parse_options=options)
    except Exception:  # invalid UTF-8, pa.ArrowException or anything else: the row-by-row path says which line
        return None


def _line_positions(block: bytes, first_line: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Line numbers and file offsets of the non-blank lines of ``block``, vectorised."""
    import numpy as np

    ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
    if block[-1:] != b"\n":
        ends = np.append(ends, len(block))
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    # Only a short line can be blank here: a long blank one makes the row count differ from
    # pyarrow's, and the block then goes row by row.
    has_text = np.ones(len(ends), dtype=bool)
    for index in np.flatnonzero(ends - starts <= 8):
        has_text[index] = bool(block[starts[index] : ends[index]].strip())
    return (first_line + np.flatnonzero(has_text)).astype(np.int64), offset + starts[has_text]


def _parquet_tables(path: Path, chunk_bytes: int) -> Iterator[tuple[pa.Table, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        metadata = parquet.metadata
        size = sum(metadata.row_group(index).total_byte_size for index in range(metadata.num_row_groups))
        rows_per_chunk = max(1024, int(chunk_bytes / max(1.0, size / max(1, metadata.num_rows))))
        first_row = 1
        for record_batch in parquet.iter_batches(batch_size=rows_per_chunk):
            yield pa.Table.from_batches([record_batch]), first_row
            first_row += record_batch.num_rows
        if metadata.num_rows == 0:
            yield parquet.schema_arrow.empty_table(), 1
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: cannot read as Parquet ({error}); rewrite it with DataFrame.to_parquet") from None


def _table_batch(path: Path, table: pa.Table, first_row: int, fmt: str, how: str) -> RowBatch:
    import numpy as np

    lines = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    batch = _arrow_batch(path, table, lines, fmt) if table.num_rows else None
    if batch is not None:
        return batch
    return _rows_batch(path, table.to_pylist(), lines.tolist(), fmt, how)


def _arrow_batch(path: Path, table: pa.Table, lines: np.ndarray, fmt: str) -> RowBatch | None:
    """A batch built without Python per row, or None when any row needs the row-by-row path."""
    try:
        resolved = _arrow_format(table, fmt)
        messages = _arrow_messages(table, resolved) if resolved else None
    except Exception:  # column types pyarrow cannot cast or combine: the row-by-row path names the row
        return None
    if messages is None:
        return None
    return RowBatch(path=str(path), format=resolved, lines=lines, messages=messages)


def _arrow_format(table: pa.Table, fmt: str) -> str | None:
    """The format every row has, judged from the columns: the first whose fields are present and never null."""
    candidates = list(FORMAT_FIELDS) if fmt == "auto" else [fmt]
    for name in candidates:
        fields = FORMAT_FIELDS[name]
        if all(key in table.column_names for key in fields):
            return name if all(table.column(key).null_count == 0 for key in fields) else None
    return None


def _arrow_messages(table: pa.Table, fmt: str) -> pa.ListArray | None:
    if fmt == "chat":
        return _chat_messages(table.column("messages").combine_chunks())
    if fmt == "alpaca":
        return _alpaca_messages(table)
    text = _strings(table.column("text").combine_chunks())
    return None if text is None else _turn_lists([_repeat(TEXT_ROLE, len(text))], [text])


def _strings(array: pa.Array) -> pa.Array | None:
    """``array`` as non-null UTF-8 strings, or None when it holds nulls or other types."""
    import pyarrow as pa

    if array.null_count or not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return None
    return array.cast(pa.string())


def _chat_messages(column: pa.Array) -> pa.ListArray | None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_list(column.type) or not pa.types.is_struct(column.type.value_type):
        return None
    struct = column.type.value_type
    if struct.get_field_index("role") < 0 or struct.get_field_index("content") < 0:
        return None
    values = pc.list_flatten(column)
    lengths = pc.list_value_length(column).to_numpy()
    if values.null_count or (len(lengths) and lengths.min() == 0):
        return None  # a null or empty turn list: the row-by-row path names the problem
    children = values.flatten()
    role = _strings(children[struct.get_field_index("role")])
    content = _strings(children[struct.get_field_index("content")])
    if role is None or content is None:
        return None
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays([role, content], MESSAGE_FIELDS))


def _alpaca_messages(table: pa.Table) -> pa.ListArray | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    instruction = _strings(table.column("instruction").combine_chunks())
    output = _strings(table.column("output").combine_chunks())
    if instruction is None or output is None:
        return None
    user = instruction
    if "input" in table.column_names:
        extra = table.column("input").combine_chunks()
        if pa.types.is_large_string(extra.type):
            extra = extra.cast(pa.string())
        if not (pa.types.is_string(extra.type) or pa.types.is_null(extra.type)):
            return None
        if pa.types.is_string(extra.type):
            has_input = pc.fill_null(pc.not_equal(extra, ""), False)
            user = pc.if_else(has_input, pc.binary_join_element_wise(instruction, extra, "\n\n"), instruction)
    rows = len(user)
    return _turn_lists([_repeat("user", rows), _repeat("assistant", rows)], [user, output])


def _repeat(value: str, count: int) -> pa.Array:
    import numpy as np
    import pyarrow as pa

    return pa.array([value]).take(pa.array(np.zeros(count, dtype=np.int64)))


def _turn_lists(roles: list[pa.Array], contents: list[pa.Array]) -> pa.ListArray:
    """Examples with the same number of turns: turn ``k`` of row ``i`` is ``roles[k][i]``/``contents[k][i]``."""
    import numpy as np
    import pyarrow as pa

    turns, rows = len(roles), len(roles[0])
    order = pa.array((np.arange(turns)[None, :] * rows + np.arange(rows)[:, None]).ravel())
    role = pa.concat_arrays(roles).take(order)
    content = pa.concat_arrays(contents).take(order)
    offsets = pa.array(np.arange(0, turns * rows + 1, turns, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([role, content], MESSAGE_FIELDS))


def _rows_batch(
    path: Path,
    rows: list[Any],
    lines: list[int],
    fmt: str,
    how: str,
    offsets: list[int] | None = None,
    encoding: dict[int, str] | None = None,
) -> RowBatch:
    """The row-by-row path: exact format errors, and per-row field problems instead of a failed load."""
    import numpy as np
    import pyarrow as pa

    _check_objects(path, rows, lines)
    resolved = _resolve_format(path, rows, lines, fmt, how)
    decode = resolved == "chat" and path.suffix.lower() in (".csv", ".parquet")
    problems: dict[int, str] = {}
    encoding = dict(encoding or {})
    turn_lists: list[list[dict[str, Any]] | None] = []
    for index, row in enumerate(rows):
        row = _decode_messages(path, row, lines[index]) if decode else row
        try:
            problem = field_problem(row, resolved)
            if problem is None:
                turns, surrogate = _clean_turns(normalize_row(row, resolved))
        except Exception as error:  # any surprise in one row is that row's failure, never a traceback
            problem = f"cannot read this row ({_why(error)})"
        if problem is not None:
            problems[index] = problem
            turn_lists.append(None)
            continue
        if surrogate:
            encoding.setdefault(index, surrogate)
        turn_lists.append(turns)
    message_type = pa.list_(pa.struct([(name, pa.string()) for name in MESSAGE_FIELDS]))
    return RowBatch(
        path=str(path),
        format=resolved,
        lines=np.asarray(lines, dtype=np.int64),
        messages=pa.array(turn_lists, type=message_type),
        problems=problems,
        encoding=encoding,
        offsets=None if offsets is None else np.asarray(offsets, dtype=np.int64),
    )


def _clean_turns(example: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """(role, content) turns of a normalised example; lone surrogates (``\\ud800``) become U+FFFD."""
    if "text" in example:
        turns = [{"role": TEXT_ROLE, "content": example["text"]}]
    else:
        turns = [{"role": message["role"], "content": message["content"]} for message in example["messages"]]
    problem = None
    for number, turn in enumerate(turns, start=1):
        for key, value in turn.items():
            if isinstance(value, str) and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:
                    turn[key] = value.encode("utf-8", errors="replace").decode("utf-8")
                    problem = problem or (
                        f"lone surrogate U+{ord(value[error.start]):04X} (a \\u escape) in {key} of turn {number}; "
                        "write the character itself or a valid surrogate pair"
                    )
    return turns, problem


# --- importing the embedded chatterbot corpus ----------------------------------------------


def import_chatterbot(cfg: ImportConfig) -> dict[str, Any]:
    """Build ``train.jsonl`` and ``validation.jsonl`` from the English chatterbot corpus.

    The output is byte-for-byte deterministic (``data.dvc`` records its hash) and the split keeps
    every validation question and answer out of training, because the corpus repeats answers
    heavily and a naive split would measure memorisation instead of learning.
    """
    conversations, stats = _read_chatterbot()
    rows = [_conversation_row(turns) for turns in conversations]
    rows = [row for row in rows if row is not None]
    stats["too_short"] = len(conversations) - len(rows)
    unique = _deduplicate(rows)
    stats["duplicates"] = len(rows) - len(unique)
    train, validation = split_without_overlap(unique, cfg.validation_fraction, cfg.seed)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_path = write_jsonl(output_dir / "train.jsonl", train)
    validation_path = write_jsonl(output_dir / "validation.jsonl", validation)
    summary = {
        **stats,
        "unique": len(unique),
        "train_rows": len(train),
        "validation_rows": len(validation),
        "train_path": str(train_path),
        "validation_path": str(validation_path),
    }
    logger.info("Imported chatterbot-corpus: %s", summary)
    return summary


def chatterbot_files() -> list[Path]:
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    return sorted((Path(DATA_DIRECTORY) / "english").glob("*.yml"))


def _read_chatterbot() -> tuple[list[list[str]], dict[str, Any]]:
    import yaml

    files = chatterbot_files()
    if not files:
        raise DataError("chatterbot-corpus: no english/*.yml files found; reinstall chatterbot-corpus==1.3.3")
    conversations: list[list[str]] = []
    skipped = 0
    for path in files:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for entry in document.get("conversations") or []:
            turns = _turns(entry)
            if turns is None:
                skipped += 1
            else:
                conversations.append(turns)
    stats = {"files": len(files), "conversations": len(conversations) + skipped, "malformed": skipped}
    return conversations, stats


def _turns(entry: Any) -> list[str] | None:
    """A conversation's turns as strings; None for entries that are not a list of scalars.

    One trivia entry is a bare string (a YAML indentation slip): it is no conversation. Numbers
    such as ``1984`` are answers and are kept as text.
    """
    if not isinstance(entry, list):
        return None
    if not all(isinstance(item, (str, int, float)) for item in entry):
        return None
    turns = [str(item).strip() for item in entry]
    return None if any(not turn for turn in turns) else turns


def _conversation_row(turns: list[str]) -> dict[str, Any] | None:
    """Alternate user/assistant turns; drop a trailing user turn so the row ends with the assistant."""
    if len(turns) % 2:
        turns = turns[:-1]
    if len(turns) < 2:
        return None
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[index % 2], "content": turn} for index, turn in enumerate(turns)]}


def _deduplicate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = dedup_key(row)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def split_without_overlap(
    rows: list[dict[str, Any]], validation_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Assign whole groups of rows sharing a question or answer to one split.

    Groups are shuffled with ``random.Random(seed)`` and fill validation up to its share; a group
    that would overshoot goes to train, so the few huge groups (one answer repeats 121 times in
    chatterbot) stay in training. Rows keep their input order within each split.
    """
    groups = _overlap_groups(rows)
    random.Random(seed).shuffle(groups)
    target = round(validation_fraction * len(rows))
    in_validation: set[int] = set()
    for group in groups:
        if len(in_validation) + len(group) <= target:
            in_validation.update(group)
    train = [row for index, row in enumerate(rows) if index not in in_validation]
    validation = [row for index, row in enumerate(rows) if index in in_validation]
    return train, validation


def _overlap_groups(rows: list[dict[str, Any]]) -> list[list[int]]:
    """Connected components of rows linked by a shared overlap key (union-find), in input order."""
    parent = list(range(len(rows)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: dict[str, int] = {}
    for index, row in enumerate(rows):
        for key in sorted(overlap_keys(row)):
            first = owner.setdefault(key, index)
            parent[root(index)] = root(first)
    groups: dict[int, list[int]] = {}
    for index in range(len(rows)):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Stable bytes: fixed key order from the rows, UTF-8, one object and a newline per row."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
