"""Per-row facts of one split: the compact columns the contract keeps and the reasons for failing rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraops.data.formats import TEXT_ROLE

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

MAX_EXAMPLES = 5
SNIPPET_CHARS = 60
ALPACA_FIELDS = {"user": "instruction", "assistant": "output"}


@dataclass
class SplitFacts:
    """The compact per-row columns of one split, with explanations for the rows that break a rule."""

    name: str
    path: str
    format: str
    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)  # appended per batch, joined later
    reasons: dict[str, dict[int, str]] = field(default_factory=dict)  # rule -> line -> why
    keep_all_reasons: frozenset[str] = frozenset()  # rules whose every reason is kept (quarantine)
    quarantined: set[int] = field(default_factory=set)  # lines set aside
    table: dict[str, list[pa.Array]] = field(default_factory=dict)  # the example table's text columns, per batch
    template_errors: dict[int, str] = field(default_factory=dict)  # line -> why the chat template refused it
    table_start: int = 0  # the split's row where ``table`` begins: rows before it were validated and dropped

    @property
    def rows(self) -> int:
        """Rows scanned so far."""
        return sum(len(part) for part in self.columns.get("line", []))

    def drop_table(self) -> None:
        """Forget the text columns of the rows validated so far (chunked validation keeps one chunk)."""
        self.table_start += sum(len(part) for part in self.table.get("text", []))
        self.table.clear()

    def window(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a per-row column, joining only the parts they span (the last batch's, mostly)."""
        import numpy as np

        pieces, end = [], sum(len(part) for part in self.columns.get(name, []))
        for part in reversed(self.columns.get(name, [])):
            begin = end - len(part)
            if begin < stop and end > start:
                pieces.insert(0, part[max(start - begin, 0) : min(stop, end) - begin])
            if begin <= start:
                break
            end = begin
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.zeros(0, dtype=bool)

    def add_column(self, name: str, values: pa.Array) -> None:
        self.table.setdefault(name, []).append(values)

    def table_column(self, name: str) -> pa.Array:
        import pyarrow as pa

        parts = self.table.get(name) or []
        if len(parts) > 1:
            self.table[name] = [pa.concat_arrays(parts)]
        return self.table[name][0] if parts else pa.array([], pa.int64() if name == "shortest_turn" else pa.string())

    def add(self, name: str, values: np.ndarray) -> None:
        self.columns.setdefault(name, []).append(values)

    def column(self, name: str) -> np.ndarray:
        import numpy as np

        parts = self.columns.get(name) or []
        if len(parts) > 1:
            self.columns[name] = [np.concatenate(parts)]
        return self.columns[name][0] if parts else np.zeros(0, dtype=bool)

    def wants_reason(self, rule: str) -> bool:
        return rule in self.keep_all_reasons or len(self.reasons.get(rule, {})) < MAX_EXAMPLES

    def explain(self, rule: str, lines: np.ndarray, flagged: np.ndarray, why: Callable[[int], str]) -> None:
        """Record ``why(row)`` for flagged rows of a batch, as many as the report and quarantine need."""
        import numpy as np

        for row in np.flatnonzero(flagged):
            if not self.wants_reason(rule):
                return
            self.reasons.setdefault(rule, {})[int(lines[row])] = why(int(row))


@dataclass
class Turns:
    """The turns of one batch, flattened: turn ``t`` belongs to row ``parent[t]`` at ``position[t]``."""

    role: pa.Array
    content: pa.Array
    codes: np.ndarray  # role as 0 system, 1 user, 2 assistant, -1 anything else
    empty: np.ndarray  # content is null, empty or whitespace-only
    lengths: np.ndarray  # turns per row (0 for a malformed row)
    starts: np.ndarray  # index of each row's first turn
    parent: np.ndarray
    position: np.ndarray

    @classmethod
    def of(cls, messages: pa.ListArray) -> Turns:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        lengths = pc.list_value_length(messages).fill_null(0).to_numpy().astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        parent = np.repeat(np.arange(len(lengths)), lengths)
        role, content = pc.list_flatten(messages).flatten()
        codes = pc.fill_null(pc.index_in(role, value_set=pa.array(["system", "user", "assistant"])), -1).to_numpy()
        empty = pc.fill_null(pc.or_(pc.equal(pc.binary_length(content), 0), pc.utf8_is_space(content)), True)
        return cls(
            role,
            content,
            codes,
            empty.to_numpy(zero_copy_only=False),
            lengths,
            starts,
            parent,
            np.arange(len(parent)) - starts[parent],
        )

    def any_per_row(self, per_turn: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.bincount(self.parent[per_turn], minlength=len(self.lengths)) > 0

    def first_per_row(self, per_turn: np.ndarray) -> np.ndarray:
        """Index of each row's first turn where ``per_turn`` holds, -1 where none does."""
        import numpy as np

        first = np.full(len(self.lengths), -1, dtype=np.int64)
        hits = np.flatnonzero(per_turn)
        rows = self.parent[hits]  # non-decreasing: a row's first hit is where the row number changes
        starts = np.ones(len(hits), dtype=bool)
        starts[1:] = rows[1:] != rows[:-1]
        first[rows[starts]] = hits[starts]
        return first


def turn_name(index: int, role: Any, fmt: str) -> str:
    if fmt == "alpaca" and role in ALPACA_FIELDS:
        return f"field '{ALPACA_FIELDS[role]}'"
    if fmt == "text" or role == TEXT_ROLE:
        return "field 'text'"
    return f"content of message {index + 1} ({role})"


def snippet(value: Any) -> str:
    text = " ".join(str(value).split())
    return repr(text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "...")
