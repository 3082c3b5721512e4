"""Import the embedded chatterbot corpus as the default dataset: deduplicate, split without overlap, write JSONL."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from loraops.config import ImportConfig
from loraops.data.formats import DataError
from loraops.data.keys import example_key, overlap_keys

logger = logging.getLogger(__name__)


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
    seen: set[int] = set()
    unique = []
    for row in rows:
        key = example_key(row)
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

    owner: dict[int, int] = {}
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
