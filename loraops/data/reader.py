"""The one reader of training files, for training (``load_split``) and the data contract (``batches``).

``read_chunks`` reads a split in the order of the file: JSONL in blocks of whole lines, Parquet in
record batches, JSON and CSV whole. Each chunk gives its rows as Python objects with their line
numbers (1-based line for JSONL/JSON, data-row number for CSV/Parquet) and, for JSONL, the file
offset of every line and its invalid UTF-8. ``load_split`` concatenates the chunks; the contract's
``read_batches`` turns each chunk into Arrow columns, by pyarrow when the chunk is clean, else from
these same rows, so both see the same rows at the same lines.

Loading only refuses what makes a file unreadable (missing, malformed, no known format, mixed
formats). Content problems (empty turns, wrong roles, invalid UTF-8, duplicates, over-length,
leakage) are left in place and reported by the data contract, which can show every offending
line at once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.data.formats import (
    EXTENSIONS,
    UNREADABLE_FIX,
    DataError,
    FormatChoice,
    check_objects,
    normalize_row,
    resolve_format,
    why,
)

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
DEFAULT_CHUNK_BYTES = 32 << 20


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
class Rows:
    """Rows of a chunk as Python objects, in file order."""

    rows: list[Any]
    lines: list[int]  # 1-based line (JSONL/JSON) or data-row number (CSV/Parquet) of each row
    offsets: list[int] | None = None  # JSONL: file offset of each row's line, for byte positions
    encoding: dict[int, str] = field(default_factory=dict)  # JSONL: row index -> invalid UTF-8 (where, which byte)


@dataclass
class Chunk:
    """A piece of one split as read: whole JSONL lines, a Parquet record batch, or a whole JSON/CSV file."""

    path: Path
    first_line: int  # line (JSONL) or data-row number (Parquet) of the chunk's start
    block: bytes | None = None  # JSONL: whole lines
    offset: int = 0  # JSONL: file offset of ``block``
    table: pa.Table | None = None  # Parquet
    parsed: Rows | None = None  # JSON and CSV, parsed whole

    def rows(self) -> Rows:
        """The chunk's rows; JSONL and Parquet are turned into Python objects here, on demand."""
        if self.parsed is not None:
            return self.parsed
        if self.block is not None:
            return _parse_jsonl(self.path, self.block, self.first_line, self.offset)
        rows = self.table.to_pylist() if self.table is not None else []
        return Rows(rows, list(range(self.first_line, self.first_line + len(rows))))


def load_split(path: str | Path, fmt: FormatChoice = "auto") -> LoadedSplit:
    """Read one split (.jsonl, .json, .csv, .parquet) and resolve its format."""
    path = Path(path)
    rows: list[Any] = []
    lines: list[int] = []
    for chunk in read_chunks(path):
        part = chunk.rows()
        rows += part.rows
        lines += part.lines
    check_objects(path, rows, lines)
    resolved = resolve_format(path, rows, lines, fmt)
    if resolved == "chat" and path.suffix.lower() in (".csv", ".parquet"):
        rows = [decode_messages(path, row, line) for row, line in zip(rows, lines)]
    logger.info("Loaded %d %s rows from %s", len(rows), resolved, path)
    return LoadedSplit(path=str(path), format=resolved, rows=rows, lines=lines)


def read_chunks(path: str | Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """The chunks of one split in file order, each read only when asked for; an empty file gives one empty chunk."""
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for block, first_line, offset in _jsonl_blocks(path, chunk_bytes):
            yield Chunk(path, first_line, block=block, offset=offset)
    elif suffix == ".parquet":
        for table, first_row in _parquet_tables(path, chunk_bytes):
            yield Chunk(path, first_row, table=table)
    elif suffix == ".json":
        yield Chunk(path, 1, parsed=Rows(*_read_json_array(path)))
    else:
        yield Chunk(path, 1, parsed=Rows(*_read_csv(path)))


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


def _strip_bom(data: bytes) -> bytes:
    return data[len(BOM) :] if data.startswith(BOM) else data


def _parse_jsonl(path: Path, block: bytes, first_line: int, offset: int) -> Rows:
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
            raise DataError(f"{path}:{number}: unreadable JSON ({why(error)}); {UNREADABLE_FIX}") from None
        if problem:
            encoding[len(lines)] = problem
        lines.append(number)
        offsets.append(line_offset)
    return Rows(rows, lines, offsets, encoding)


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
            raise DataError(f"{path}:{line}: unreadable JSON ({why(error)}); {UNREADABLE_FIX}") from None
        rows.append(row)
        lines.append(text.count("\n", 0, position) + 1)
        position = _skip_space(text, end)
        if text[position : position + 1] == ",":
            position = _skip_space(text, position + 1)
        elif text[position : position + 1] != "]":
            line = text.count("\n", 0, position) + 1
            raise DataError(f"{path}:{line}: malformed JSON (expected ',' or ']' after a row)")
    return rows, lines


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(path: Path) -> tuple[list[Any], list[int]]:
    # Every cell is read as a string (an empty cell is ""), so nothing is silently turned into NaN.
    rows = [dict(row) for row in csv.DictReader(io.StringIO(_read_text(path), newline=""))]
    return rows, list(range(1, len(rows) + 1))


def decode_messages(path: Path, row: dict[str, Any], line: int) -> dict[str, Any]:
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
            f"{path}:{line}: field 'messages' holds unreadable JSON ({why(error)}); {UNREADABLE_FIX}"
        ) from None


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
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({error}); rewrite it with DataFrame.to_parquet") from None
