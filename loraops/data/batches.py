"""Arrow RowBatches of a split for the data contract, built from the chunks of the one reader.

A clean JSONL chunk is parsed by pyarrow and a clean Parquet chunk used as it is; any other chunk
goes row by row from the reader's Python rows, so the line numbers and the verdicts are the same
either way (``read_batches``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.data.formats import (
    FORMAT_FIELDS,
    TEXT_ROLE,
    FormatChoice,
    check_objects,
    field_problem,
    normalize_row,
    resolve_format,
    why,
)
from loraops.data.reader import DEFAULT_CHUNK_BYTES, Chunk, Rows, decode_messages, read_chunks

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


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


MESSAGE_FIELDS = ("role", "content")


def read_batches(
    path: str | Path, fmt: FormatChoice = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[RowBatch]:
    """Stream one split as RowBatches: JSONL and Parquet in chunks of about ``chunk_bytes``, JSON and CSV whole.

    The chunks come from the reader training uses (``read_chunks``). The first rows decide an
    auto-detected format; a later chunk in another format is an error that names its lines, as for
    a file read whole. An empty file gives one empty batch. The next chunk is read and parsed on a
    second thread while the caller works on this one (pyarrow releases the GIL), so two chunks are
    in memory at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    chunks = read_chunks(path, chunk_bytes)
    expected, how = fmt, "set by data.format"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraops-read") as reader:
        pending = reader.submit(_build_next, chunks, expected, how)
        while (batch := pending.result()) is not None:
            if len(batch) and expected == "auto":
                expected, how = batch.format, "detected"
            pending = reader.submit(_build_next, chunks, expected, how)
            yield batch


def _build_next(chunks: Iterator[Chunk], fmt: str, how: str) -> RowBatch | None:
    chunk = next(chunks, None)
    return None if chunk is None else chunk_batch(chunk, fmt, how)


def chunk_batch(chunk: Chunk, fmt: str, how: str = "set by data.format") -> RowBatch:
    """One chunk as a RowBatch: by pyarrow when the chunk is clean, else from the reader's Python rows."""
    import numpy as np

    if chunk.block is not None:
        table = _arrow_json(chunk.block, fmt)
        if table is not None:
            lines, offsets = _line_positions(chunk.block, chunk.first_line, chunk.offset)
            batch = _arrow_batch(chunk.path, table, lines, fmt) if len(lines) == table.num_rows else None
            if batch is not None:
                batch.offsets = offsets
                return batch
    elif chunk.table is not None and chunk.table.num_rows:
        lines = np.arange(chunk.first_line, chunk.first_line + chunk.table.num_rows, dtype=np.int64)
        batch = _arrow_batch(chunk.path, chunk.table, lines, fmt)
        if batch is not None:
            return batch
    return _rows_batch(chunk.path, chunk.rows(), fmt, how)


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


def _rows_batch(path: Path, read: Rows, fmt: str, how: str) -> RowBatch:
    """The row-by-row path: exact format errors, and per-row field problems instead of a failed load."""
    import numpy as np
    import pyarrow as pa

    rows, lines = read.rows, read.lines
    check_objects(path, rows, lines)
    resolved = resolve_format(path, rows, lines, fmt, how)
    decode = resolved == "chat" and path.suffix.lower() in (".csv", ".parquet")
    problems: dict[int, str] = {}
    encoding = dict(read.encoding)
    turn_lists: list[list[dict[str, Any]] | None] = []
    for index, row in enumerate(rows):
        row = decode_messages(path, row, lines[index]) if decode else row
        try:
            problem = field_problem(row, resolved)
            if problem is None:
                turns, surrogate = _clean_turns(normalize_row(row, resolved))
        except Exception as error:  # any surprise in one row is that row's failure, never a traceback
            problem = f"cannot read this row ({why(error)})"
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
        offsets=None if read.offsets is None else np.asarray(read.offsets, dtype=np.int64),
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
