"""Read training data: import the embedded chatterbot corpus, load user files, normalise rows.

Loading only refuses what makes a file unreadable (missing, malformed, no known format, mixed
formats). Content problems — empty turns, wrong roles, duplicates, over-length, leakage — are
left in place and reported by the data contract, which can show every offending line at once.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraops.config import ImportConfig

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


# --- loading user files --------------------------------------------------------------------


def load_split(path: str | Path, fmt: FormatChoice = "auto") -> LoadedSplit:
    """Read one split (.jsonl, .json, .csv, .parquet) and resolve its format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: not found; set data.train_file / data.validation_file to an existing file, "
            "or run `loraops import-data` to build the default dataset"
        )
    rows, lines = _read_rows(path)
    for row, line in zip(rows, lines):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{line}: expected an object with fields such as 'messages', got "
                f"{type(row).__name__}; write one JSON object per row"
            )
    resolved = _resolve_format(path, rows, lines, fmt)
    if resolved == "chat" and path.suffix.lower() in (".csv", ".parquet"):
        rows = [_decode_messages(path, row, line) for row, line in zip(rows, lines)]
    logger.info("Loaded %d %s rows from %s", len(rows), resolved, path)
    return LoadedSplit(path=str(path), format=resolved, rows=rows, lines=lines)


def _read_rows(path: Path) -> tuple[list[Any], list[int]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json_array(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unknown file extension '{path.suffix}'; use one of {', '.join(EXTENSIONS)} "
        "(JSON Lines is the usual choice)"
    )


def _read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    rows: list[Any] = []
    lines: list[int] = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno}); "
                    "each line must be one complete JSON object"
                ) from None
            lines.append(number)
    return rows, lines


def _read_json_array(path: Path) -> tuple[list[Any], list[int]]:
    """Decode a JSON list element by element so each row keeps the line it starts on."""
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()
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
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = [dict(row) for row in csv.DictReader(handle)]
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


def _resolve_format(path: Path, rows: list[dict[str, Any]], lines: list[int], fmt: FormatChoice) -> str:
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
    _check_uniform(path, rows, lines, found, fmt, "set by data.format")
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
