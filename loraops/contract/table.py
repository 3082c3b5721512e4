"""The per-example table the GX suites check: one row per example, real columns a user can write rules for.

Columns (documented in the README's data-contract section):

=============== ===================================================================================
``file``        the data file (shown with ``line`` next to each unexpected value in Data Docs)
``line``        1-based line (JSONL/JSON) or data-row number (CSV/Parquet) of the example
``prompt``      the user turns, joined by a blank line (null for text rows and malformed rows)
``completion``  the trained answer: the last assistant turn (the whole text for text rows)
``text``        every turn's content, joined by a blank line (null for a malformed row)
``roles``       the turns' roles, comma-separated (``system,user,assistant``; commas in a role escaped)
``shortest_turn`` characters of the shortest turn without surrounding whitespace (0: an empty turn)
``n_tokens``    tokens after the chat template (null when not tokenised: no tokenizer or not renderable)
``template_error`` why the chat template refused the row (null when it rendered)
``duplicate_of`` line of the earlier example this one repeats (null for the first occurrence)
``train_line``  validation only: the train line sharing its question, answer or whole example (0: none)
=============== ===================================================================================

Text columns are built per Arrow batch while streaming (``batch_columns``); the columns needing the
whole split (duplicates, leakage, token lengths) come from the split's facts (``example_frame``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraops.contract.facts import SplitFacts, Turns

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

TEXT_COLUMNS = ("prompt", "completion", "text", "roles")
# The role-order rules, on the ``roles`` column: the custom GX expectations and the scan's explanations
# both test these, so the rule is written once.
ROLE_ORDER = r"^(?:system,)?user(?:,assistant,user)*(?:,assistant)?$"
LAST_ROLE = r"(?:^|,)assistant$"
SEPARATOR = "\n\n"


def batch_columns(facts: SplitFacts, turns: Turns, well_formed: np.ndarray, text_format: bool) -> None:
    """Append this batch's text columns and ``shortest_turn`` to ``facts.table``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = len(turns.lengths)
    offsets = np.concatenate(([0], np.cumsum(turns.lengths))).astype(np.int32)
    malformed = pa.array(~well_formed)
    nulls = pa.nulls(rows, pa.string())

    def joined(values: pa.Array, mask: np.ndarray, separator: str) -> pa.Array:
        counts = np.bincount(turns.parent[mask], minlength=rows) if len(mask) else np.zeros(rows, np.int64)
        starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
        lists = pa.ListArray.from_arrays(starts, values.filter(pa.array(mask)))
        return pc.if_else(malformed, nulls, pc.binary_join(lists, separator))

    every = np.ones(len(turns.parent), dtype=bool)
    content = pc.fill_null(turns.content, "")  # a null turn is the empty-content rule's, not a missing row
    text = joined(content, every, SEPARATOR)
    facts.add_column("text", text)
    if text_format:
        facts.add_column("prompt", nulls)
        facts.add_column("completion", text)
    else:
        facts.add_column("prompt", joined(content, turns.codes == 1, SEPARATOR))
        facts.add_column("completion", _last_answer(turns, malformed, rows))
    role = pc.replace_substring(pc.fill_null(turns.role, "null"), ",", "\\,")
    facts.add_column(
        "roles", pc.if_else(malformed, nulls, pc.binary_join(pa.ListArray.from_arrays(offsets, role), ","))
    )
    stripped = pc.fill_null(pc.utf8_length(pc.utf8_trim_whitespace(turns.content)), 0).to_numpy(zero_copy_only=False)
    shortest = np.zeros(rows, dtype=np.int64)
    has_turns = np.flatnonzero(turns.lengths > 0)
    if len(has_turns):
        shortest[has_turns] = np.minimum.reduceat(stripped, turns.starts[has_turns])
    facts.add_column("shortest_turn", pa.array(shortest, mask=~well_formed))


def _last_answer(turns: Turns, malformed: pa.Array, rows: int) -> pa.Array:
    """The content of each row's last assistant turn (null where there is none)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    hits = np.flatnonzero(turns.codes == 2)
    owners = turns.parent[hits]
    last = np.ones(len(hits), dtype=bool)
    last[:-1] = owners[1:] != owners[:-1]
    index = np.full(rows, -1, dtype=np.int64)
    index[owners[last]] = hits[last]
    if not len(turns.content):
        return pa.nulls(rows, pa.string())
    taken = turns.content.take(pa.array(np.maximum(index, 0), mask=index < 0))
    return pc.if_else(malformed, pa.nulls(rows, pa.string()), taken)


def example_frame(facts: SplitFacts, keep: np.ndarray) -> pd.DataFrame:
    """The kept rows of the table's current rows (from ``facts.table_start``) as a pandas frame."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    rows = np.flatnonzero(keep)
    start, stop = facts.table_start, facts.table_start + len(keep)
    take = None if len(rows) == len(keep) else pa.array(rows)

    def compact(name: str, default: float | int) -> np.ndarray:
        if name not in facts.columns:
            return np.full(len(rows), default)
        return facts.window(name, start, stop)[rows]

    frame = pd.DataFrame({"file": pd.Categorical.from_codes(np.zeros(len(rows), np.int8), [facts.path])})
    frame["line"] = compact("line", 0)
    for name in TEXT_COLUMNS:  # Arrow-backed: no copy, and pandas runs the suites' regexes with RE2
        column = facts.table_column(name)
        frame[name] = pd.arrays.ArrowExtensionArray(column if take is None else column.take(take))
    # Numbers as float64 with NaN for null: GX compares numpy columns vectorised, nullable Int64 row by row.
    shortest = facts.table_column("shortest_turn")
    frame["shortest_turn"] = (
        (shortest if take is None else shortest.take(take)).to_numpy(zero_copy_only=False).astype(float)
    )
    frame["n_tokens"] = compact("token_length", np.nan)  # NaN: not tokenised
    frame["template_error"] = _by_line(frame["line"].to_numpy(), facts.template_errors)
    duplicate_of = compact("duplicate_of", 0)
    frame["duplicate_of"] = pd.array(duplicate_of, dtype="Int64")
    frame.loc[duplicate_of == 0, "duplicate_of"] = pd.NA
    frame["train_line"] = compact("train_line", 0)
    return frame


def _by_line(lines: np.ndarray, values: dict[int, str]) -> np.ndarray:
    """``values`` (line -> text) as an object column over ``lines`` (ascending), None elsewhere."""
    import numpy as np

    column = np.full(len(lines), None, dtype=object)
    if values:
        wanted = np.array(sorted(values), dtype=np.int64)
        where = np.searchsorted(lines, wanted)
        found = (where < len(lines)) & (lines[np.minimum(where, len(lines) - 1)] == wanted)
        for position, line in zip(where[found], wanted[found]):
            column[position] = values[int(line)]
    return column
