"""Stream a split in Arrow batches and compute its per-row facts and per-example table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.config import DataConfig
from loraops.contract.facts import SplitFacts, Turns, turn_name
from loraops.contract.keys import Duplicates, TrainIndex, keys_of, leakage
from loraops.contract.patterns import content_patterns, unusual_turns
from loraops.contract.table import LAST_ROLE, ROLE_ORDER, batch_columns
from loraops.contract.tokens import token_lengths
from loraops.data.batches import RowBatch, read_batches
from loraops.data.formats import EMPTY_FORMAT

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


def scan_split(
    name: str,
    path: str | Path,
    data: DataConfig,
    tokenizer: Any,
    train_index: TrainIndex | None = None,
    on_batch: Callable[[SplitFacts], None] | None = None,
) -> SplitFacts:
    """Stream a split and compute every per-row fact; leakage needs the train split's index.

    ``on_batch`` is called after each batch, when every fact of its rows is known (duplicates of
    earlier rows included): the contract validates and drops the example table's text there.
    """
    contract = data.contract
    facts = SplitFacts(name, str(path), EMPTY_FORMAT, keep_all_reasons=frozenset(contract.quarantine))
    duplicates = Duplicates(contract.duplicates.normalized)
    for batch in read_batches(path, data.format, int(contract.chunk_mb * 2**20)):
        if len(batch) == 0:
            facts.format = batch.format if facts.format == EMPTY_FORMAT else facts.format
            continue
        facts.format = batch.format
        start = facts.rows
        _scan_batch(facts, batch, tokenizer, data.max_length, train_index)
        duplicates.mark(facts, start, facts.rows)
        if on_batch is not None:
            on_batch(facts)
    return facts


def _scan_batch(
    facts: SplitFacts, batch: RowBatch, tokenizer: Any, max_length: int, train_index: TrainIndex | None
) -> None:
    import numpy as np

    turns = Turns.of(batch.messages)
    chat_like = batch.format != "text"
    well_formed = batch.messages.is_valid().to_numpy(zero_copy_only=False)
    unusual = unusual_turns(turns.content)
    facts.add("line", batch.lines)
    facts.add("well_formed", well_formed)
    batch_columns(facts, turns, well_formed, not chat_like)
    renderable = _structure(facts, batch, turns, well_formed, chat_like)
    content_patterns(facts, batch, turns, well_formed, unusual)
    keys = keys_of(facts, turns, well_formed, unusual)
    if tokenizer is not None:
        token_lengths(facts, batch, tokenizer, max_length, renderable)
    if train_index is not None:
        leakage(facts, batch, turns, keys, well_formed, train_index)
    elif facts.name == "train":
        facts.add("train_keys", keys.tagged())
        facts.add("train_key_lines", np.concatenate([batch.lines[rows] for rows in keys.rows()]))


def _structure(
    facts: SplitFacts, batch: RowBatch, turns: Turns, well_formed: np.ndarray, chat_like: bool
) -> np.ndarray:
    """Fields, empty turns, role order and the final turn, as booleans per row; returns the rows fit to render."""
    import numpy as np

    lines = batch.lines
    broken = ~well_formed
    facts.add("required_fields", broken)
    facts.explain("required_fields", lines, broken, lambda row: batch.problems.get(row, "missing fields"))

    empty = turns.any_per_row(turns.empty) & well_formed
    facts.add("empty_content", empty)
    facts.explain("empty_content", lines, empty, lambda row: _empty_reason(batch, row))

    no_rows = np.zeros(len(lines), dtype=bool)
    roles_bad, ends_bad = _role_order(facts.table["roles"][-1]) if chat_like else (no_rows, no_rows)
    roles_bad, ends_bad = roles_bad & well_formed, ends_bad & well_formed
    facts.add("roles", roles_bad)
    facts.add("ends_with_assistant", ends_bad)
    facts.explain("roles", lines, roles_bad, lambda row: role_problem(batch.messages[row].as_py()) or "")
    facts.explain("ends_with_assistant", lines, ends_bad, lambda row: _end_reason(batch, row))
    return well_formed & ~empty & ~roles_bad & ~ends_bad


def _role_order(roles: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose ``roles`` break ROLE_ORDER; rows whose last turn is not the assistant's (the GX rules' own tests)."""
    import pyarrow.compute as pc

    order_ok = pc.fill_null(pc.match_substring_regex(roles, ROLE_ORDER), True)
    ends_ok = pc.fill_null(pc.match_substring_regex(roles, LAST_ROLE), True)
    return pc.invert(order_ok).to_numpy(zero_copy_only=False), pc.invert(ends_ok).to_numpy(zero_copy_only=False)


def role_problem(messages: list[dict[str, Any]]) -> str | None:
    """Roles must be an optional leading system turn, then user/assistant alternating from user."""
    roles = [message.get("role") for message in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user" if index % 2 == 0 else "assistant" for index in range(len(turns))]
    if turns == expected and turns:
        return None
    shown = ", ".join(str(role) for role in roles)
    unknown = sorted({str(role) for role in roles} - {"system", "user", "assistant"})
    hint = f"unknown role(s) {unknown}" if unknown else "expected [system,] user, assistant, user, ..."
    return f"roles {shown}: {hint}"


def _empty_reason(batch: RowBatch, row: int) -> str:
    for index, turn in enumerate(batch.messages[row].as_py()):
        content = turn["content"]
        if content is None or not content.strip():
            what = "null" if content is None else "empty" if content == "" else "whitespace-only"
            return f"{turn_name(index, turn['role'], batch.format)} is {what}"
    return "empty content"


def _end_reason(batch: RowBatch, row: int) -> str:
    last = batch.messages[row].as_py()[-1]["role"]
    return f"last turn is {last!r}, expected 'assistant'"
