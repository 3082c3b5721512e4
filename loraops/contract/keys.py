"""64-bit keys per example, question and answer: duplicates within a split and train/validation leakage.

Vectorised over a batch's turns, with the one key scheme of ``data.keys`` (64-bit text keys mixed
with role and position), so a row's keys here equal ``data.keys.overlap_keys`` of that row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraops.contract.facts import SplitFacts, Turns, snippet
from loraops.contract.patterns import ASCII_WHITESPACE_RUN
from loraops.data.batches import RowBatch
from loraops.data.keys import digests, hash_strings, hash_strings_and_lowered, mix, normalize_text, tagged, turn_salts

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


def normalized_hashes(content: pa.Array, unusual: np.ndarray) -> np.ndarray:
    """``digests([normalize_text(s)])`` of every turn (see ``turn_hashes``)."""
    return turn_hashes(content, unusual)[1]


def turn_hashes(content: pa.Array, unusual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``digests`` of every turn as written and of its ``normalize_text``, computed by Arrow and numpy.

    For plain ASCII text ``normalize_text`` (casefold, split on whitespace, join with one space)
    is lower-casing, hashed from the same read of the bytes as the exact key; unusual ASCII turns
    also get their whitespace runs collapsed by Arrow, and only non-ASCII turns (Unicode case
    folding and spaces) go through Python.
    """
    import numpy as np
    import pyarrow.compute as pc

    exact, hashes = hash_strings_and_lowered(content)
    if not len(unusual):
        return exact, hashes
    odd = content.take(unusual)
    spaced = pc.replace_substring_regex(pc.ascii_lower(odd), ASCII_WHITESPACE_RUN, " ")
    hashes[unusual] = hash_strings(pc.utf8_trim(spaced, " "))
    foreign = np.flatnonzero(~pc.fill_null(pc.string_is_ascii(odd), True).to_numpy(zero_copy_only=False))
    if len(foreign):
        texts = odd.take(foreign).to_pylist()
        hashes[unusual[foreign]] = digests(normalize_text(text) for text in texts)
    return exact, hashes


@dataclass
class BatchKeys:
    """Per-row keys of a batch: normalised and exact whole-example keys, question and answer keys."""

    whole: np.ndarray  # uint64 per row (0 for a malformed row)
    exact: np.ndarray
    question: np.ndarray  # uint64 per row; 0 where the row has no user turn with text
    answers: np.ndarray  # uint64 per assistant turn with text
    answer_rows: np.ndarray  # row of each answer
    answer_turns: np.ndarray  # turn index (in the batch) of each answer
    well_formed: np.ndarray

    def rows(self) -> list[np.ndarray]:
        import numpy as np

        has_question = np.flatnonzero(self.question != 0)
        return [has_question, self.answer_rows, np.flatnonzero(self.well_formed)]

    def tagged(self) -> np.ndarray:
        """Keys as one array, each kind tagged so a question never matches a whole example."""
        import numpy as np

        rows = self.rows()
        return np.concatenate(
            [
                tagged("question", self.question[rows[0]]),
                tagged("answer", self.answers),
                tagged("whole", self.whole[rows[2]]),
            ]
        )


def keys_of(facts: SplitFacts, turns: Turns, well_formed: np.ndarray, unusual: np.ndarray) -> BatchKeys:
    """Hash each turn (normalised and exact), combine per row with role and position."""
    import numpy as np
    import pyarrow.compute as pc

    exact, normalised = turn_hashes(turns.content, unusual)
    encoded = pc.dictionary_encode(turns.role)
    role_hash = (
        hash_strings(encoded.dictionary)[encoded.indices.to_numpy()] if len(turns.role) else np.zeros(0, np.uint64)
    )
    salt = turn_salts(role_hash, turns.position)
    whole = _per_row_sum(turns, mix(normalised ^ salt))
    exact_whole = _per_row_sum(turns, mix(exact ^ salt))
    whole[~well_formed] = 0
    exact_whole[~well_formed] = 0
    facts.add("key", whole)
    facts.add("exact_key", exact_whole)

    codes = turns.codes
    has_text = ~turns.empty & well_formed[turns.parent]
    first_user = turns.first_per_row((codes == 1) & well_formed[turns.parent])
    question = np.zeros(len(turns.lengths), dtype=np.uint64)
    asks = first_user >= 0
    asks[asks] &= has_text[first_user[asks]]
    question[asks] = normalised[first_user[asks]]
    answer_turns = np.flatnonzero((codes == 2) & has_text)
    return BatchKeys(
        whole, exact_whole, question, normalised[answer_turns], turns.parent[answer_turns], answer_turns, well_formed
    )


def _per_row_sum(turns: Turns, values: np.ndarray) -> np.ndarray:
    import numpy as np

    out = np.zeros(len(turns.lengths), dtype=np.uint64)
    rows = np.flatnonzero(turns.lengths > 0)
    if len(rows):
        out[rows] = np.add.reduceat(values, turns.starts[rows])
    return out


@dataclass
class TrainIndex:
    """Sorted tagged train keys and the first train line holding each, for leakage lookups."""

    path: str
    keys: np.ndarray
    lines: np.ndarray

    @classmethod
    def of(cls, facts: SplitFacts) -> TrainIndex:
        import numpy as np

        # Keys are appended in line order, so a key's first occurrence holds its first line.
        keys, first = np.unique(facts.column("train_keys").astype(np.uint64), return_index=True)
        return cls(facts.path, keys, facts.column("train_key_lines")[first])

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Train line of each key, 0 where train does not have it."""
        import numpy as np

        if not len(self.keys):
            return np.zeros(len(keys), dtype=np.int64)
        where = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[where] == keys, self.lines[where], 0)


def leakage(
    facts: SplitFacts, batch: RowBatch, turns: Turns, keys: BatchKeys, well_formed: np.ndarray, index: TrainIndex
) -> None:
    """Validation rows sharing an answer, the question or the whole example with a train row."""
    import numpy as np

    rows = len(batch)
    found = index.find(keys.tagged())
    question_rows, answer_rows, whole_rows = keys.rows()
    cut = np.cumsum([len(question_rows), len(answer_rows)])
    question_line, answer_line, whole_line = np.split(found, cut)
    train_line = np.zeros(rows, dtype=np.int64)  # a train line sharing the whole example, question or answer
    for hit_rows, hit_lines in ((whole_rows, whole_line), (question_rows, question_line), (answer_rows, answer_line)):
        train_line[hit_rows[hit_lines > 0]] = hit_lines[hit_lines > 0]
    leaks = train_line > 0
    facts.add("train_line", train_line)
    facts.add("train_overlap", leaks)
    if not leaks.any():
        return
    first_answer = np.full(rows, -1, dtype=np.int64)  # per row: its first answer found in train
    hits = np.flatnonzero(answer_line > 0)
    hit_rows, first_hit = np.unique(answer_rows[hits], return_index=True)
    first_answer[hit_rows] = hits[first_hit]
    per_row = {kind: np.zeros(rows, dtype=np.int64) for kind in ("question", "whole")}
    per_row["question"][question_rows] = question_line
    per_row["whole"][whole_rows] = whole_line

    def why(row: int) -> str:
        if first_answer[row] >= 0:
            turn = int(keys.answer_turns[first_answer[row]]) - int(turns.starts[row])
            text = batch.messages[row].as_py()[turn]["content"]
            return f"answer {snippet(normalize_text(text))} also in {index.path}:{answer_line[first_answer[row]]}"
        if per_row["question"][row]:
            text = next(turn["content"] for turn in batch.messages[row].as_py() if turn["role"] == "user")
            return f"question {snippet(normalize_text(text))} also in {index.path}:{per_row['question'][row]}"
        return f"whole example also in {index.path}:{per_row['whole'][row]}"

    facts.explain("train_overlap", batch.lines, leaks, why)


class FirstSeen:
    """The keys seen so far in a split (sorted) and the line of each key's first row."""

    def __init__(self) -> None:
        import numpy as np

        self.keys = np.zeros(0, dtype=np.uint64)
        self.lines = np.zeros(0, dtype=np.int64)

    def first_lines(self, keys: np.ndarray, lines: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Line of the first row with each row's key, earlier batches included (its own line for a first
        occurrence or an invalid row); remembers this batch's new keys."""
        import numpy as np

        first = lines.copy()
        rows = np.flatnonzero(valid)
        if not len(rows):
            return first
        unique, start, inverse = np.unique(keys[rows], return_index=True, return_inverse=True)
        where = np.minimum(np.searchsorted(self.keys, unique), max(len(self.keys) - 1, 0))
        known = self.keys[where] == unique if len(self.keys) else np.zeros(len(unique), dtype=bool)
        earliest = lines[rows[start]]
        earliest[known] = self.lines[where[known]]
        first[rows] = earliest[inverse]
        new = np.flatnonzero(~known)
        at = np.searchsorted(self.keys, unique[new])
        self.keys = np.insert(self.keys, at, unique[new])
        self.lines = np.insert(self.lines, at, earliest[new])
        return first


class Duplicates:
    """Rows repeating an earlier row of the split (exactly, or after normalising case and spacing), batch by batch.

    The keys of every earlier row are kept (16 bytes per distinct row), so a repeat is found however
    far apart the two rows are: across read chunks and across the chunks GX validates.
    """

    def __init__(self, normalized: bool) -> None:
        self.normalized = normalized
        self.first, self.exact = FirstSeen(), FirstSeen()

    def mark(self, facts: SplitFacts, start: int, stop: int) -> None:
        """Add ``duplicates`` and ``duplicate_of`` for rows ``start:stop`` of the split, with reasons."""
        import numpy as np

        line, valid = facts.window("line", start, stop), facts.window("well_formed", start, stop)
        exact_key = facts.window("exact_key", start, stop)
        first = self.first.first_lines(facts.window("key", start, stop) if self.normalized else exact_key, line, valid)
        exact_first = self.exact.first_lines(exact_key, line, valid)
        repeats = valid & (first != line)
        facts.add("duplicates", repeats)
        facts.add("duplicate_of", np.where(repeats, first, 0))

        def why(row: int) -> str:
            if exact_first[row] != line[row]:
                return f"same example as line {exact_first[row]}"
            return f"same example as line {first[row]} after normalising case and whitespace"

        facts.explain("duplicates", line, repeats, why)


def mark_duplicates(facts: SplitFacts, normalized: bool) -> None:
    """Mark the duplicates of a whole scanned split again (``scan_split`` marks them with ``data.contract``'s setting)."""
    for name in ("duplicates", "duplicate_of"):
        facts.columns.pop(name, None)
    facts.reasons.pop("duplicates", None)
    Duplicates(normalized).mark(facts, 0, facts.rows)
