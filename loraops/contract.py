"""The data contract: a Great Expectations suite over one compact row of facts per example.

Each split is streamed in Arrow batches (``data.read_batches``) and reduced to a few columns per
row: one boolean per rule ("this row breaks it"), the token length, and 64-bit keys for
duplicates and train/validation leakage. The checks are vectorised (pyarrow compute and numpy);
Python runs per row only to tokenise and to explain the rows that break a rule. GX then runs one
expectation per rule over those columns, with the share of rows each rule may break
(``data.contract.<rule>.max_share``) as its ``mostly``, and builds Data Docs. Problems are
collected, not raised one by one, so a user fixes a whole file in one pass.

Rows of the rules listed in ``data.contract.quarantine`` are written to
``<reports_dir>/quarantine/<split>.jsonl`` and left out of the validated data; ``stages`` drops
the same lines before tokenising (``quarantined_lines``).

Keys are Python string hashes (per process, 64-bit): two different examples share one with a
probability of about n²/2⁶⁵, a false duplicate in ~10⁻⁸ of million-row runs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.config import ContractConfig, DataConfig
from loraops.data import EMPTY_FORMAT, TEXT_ROLE, DataError, RowBatch, normalize_text, read_batches
from loraops.results import ContractCheck, ContractReport, QuarantineRecord

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5
SNIPPET_CHARS = 60
TOKENIZE_BATCH = 256
ALPACA_FIELDS = {"user": "instruction", "assistant": "output"}
CHAT_ONLY = ("roles", "ends_with_assistant")
SUMMARY_FILE = "data_contract_summary.json"
DOCS_DIR = "data_docs"
QUARANTINE_DIR = "quarantine"

CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x{80}-\x{9f}]"  # RE2: all but tab, newline, CR
SECRET_PATTERNS = {
    "OpenAI-style API key ('sk-...')": r"\bsk-[A-Za-z0-9_\-]{20,}",
    "AWS access key id ('AKIA...')": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token ('ghp_...')": r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,})",
    "Slack token ('xox.-...')": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "Google API key ('AIza...')": r"\bAIza[0-9A-Za-z_\-]{35}",
    "private key block": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
}
EMAIL_PATTERN = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
ASCII_WHITESPACE_RUN = r"[\t\n\x0b\x0c\r\x1c-\x1f ]+"  # what ``str.split()`` splits ASCII text on
# One pass finds the few ASCII turns any rule or the normalisation must look at closely: control
# and whitespace characters other than a single inner space (``str.split`` would change them),
# and anything a secret or e-mail pattern could match. Non-ASCII turns are always looked at.
UNUSUAL = "|".join([r"[\x00-\x1f\x7f]|^ | $|  ", *SECRET_PATTERNS.values(), EMAIL_PATTERN])

# What to do about each rule; shown under a failing check.
HINTS = {
    "min_rows": "add rows, or lower data.contract.min_rows.<split>",
    "required_fields": "give every row its format's fields with the right types",
    "empty_content": "fill or remove the empty turns",
    "roles": "use an optional leading system turn, then user and assistant turns alternating from user",
    "ends_with_assistant": "end each conversation with an assistant turn (the training target)",
    "encoding": "re-save the file as UTF-8 and remove control characters",
    "tokenizes": "fix the rows the chat template refuses, or use a template that accepts them",
    "over_length": "shorten or split long examples, or raise data.max_length",
    "duplicates": "remove repeated examples (the first occurrence is kept)",
    "train_overlap": "move validation rows whose question or answer occurs in train, or re-split the data",
    "secrets": "remove the credentials from the data and rotate them",
    "emails": "remove or mask personal e-mail addresses",
}
QUARANTINE_HINT = " — or set them aside with data.contract.quarantine: [{rule}]"


class DataContractError(RuntimeError):
    """The data broke the contract; the message lists each failed expectation with example lines."""

    def __init__(self, report: ContractReport) -> None:
        self.report = report
        super().__init__(format_report(report, failures_only=True))


# --- per-row facts ---------------------------------------------------------------------------


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


def scan_split(
    name: str,
    path: str | Path,
    data: DataConfig,
    tokenizer: Any,
    train_index: TrainIndex | None = None,
) -> SplitFacts:
    """Stream a split and compute every per-row fact; leakage needs the train split's index."""
    contract = data.contract
    facts = SplitFacts(name, str(path), EMPTY_FORMAT, keep_all_reasons=frozenset(contract.quarantine))
    for batch in read_batches(path, data.format, int(contract.chunk_mb * 2**20)):
        if len(batch) == 0:
            facts.format = batch.format if facts.format == EMPTY_FORMAT else facts.format
            continue
        facts.format = batch.format
        _scan_batch(facts, batch, tokenizer, data.max_length, train_index)
    return facts


def _scan_batch(facts: SplitFacts, batch: RowBatch, tokenizer: Any, max_length: int, train_index: TrainIndex | None) -> None:
    import numpy as np

    turns = Turns.of(batch.messages)
    chat_like = batch.format != "text"
    well_formed = batch.messages.is_valid().to_numpy(zero_copy_only=False)
    unusual = _unusual_turns(turns.content)
    facts.add("line", batch.lines)
    facts.add("well_formed", well_formed)
    renderable = _structure(facts, batch, turns, well_formed, chat_like)
    _content_patterns(facts, batch, turns, well_formed, unusual)
    keys = _keys(facts, turns, well_formed, unusual)
    if tokenizer is not None:
        _token_lengths(facts, batch, tokenizer, max_length, renderable)
    if train_index is not None:
        _leakage(facts, batch, turns, keys, well_formed, train_index)
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
    roles_bad, ends_bad = _role_order(turns) if chat_like else (no_rows, no_rows)
    roles_bad, ends_bad = roles_bad & well_formed, ends_bad & well_formed
    facts.add("roles", roles_bad)
    facts.add("ends_with_assistant", ends_bad)
    facts.explain("roles", lines, roles_bad, lambda row: role_problem(batch.messages[row].as_py()) or "")
    facts.explain("ends_with_assistant", lines, ends_bad, lambda row: _end_reason(batch, row))
    return well_formed & ~empty & ~roles_bad & ~ends_bad


def _role_order(turns: Turns) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose roles are not [system,] user, assistant, ...; rows whose last turn is not the assistant's."""
    import numpy as np

    codes = turns.codes
    has_turns = turns.lengths > 0
    leading_system = np.zeros(len(turns.lengths), dtype=bool)
    leading_system[has_turns] = codes[turns.starts[has_turns]] == 0
    shift = leading_system[turns.parent].astype(np.int64)
    turn = turns.position - shift
    expected = np.where(turn % 2 == 0, 1, 2)
    good = (codes == expected) | ((turns.position == 0) & (shift == 1))
    roles_bad = turns.any_per_row(~good) | (turns.lengths - leading_system <= 0)
    last = np.full(len(turns.lengths), -1, dtype=np.int64)
    last[has_turns] = codes[turns.starts[has_turns] + turns.lengths[has_turns] - 1]
    return roles_bad, last != 2


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


def _turn_name(index: int, role: Any, fmt: str) -> str:
    if fmt == "alpaca" and role in ALPACA_FIELDS:
        return f"field '{ALPACA_FIELDS[role]}'"
    if fmt == "text" or role == TEXT_ROLE:
        return "field 'text'"
    return f"content of message {index + 1} ({role})"


def _empty_reason(batch: RowBatch, row: int) -> str:
    for index, turn in enumerate(batch.messages[row].as_py()):
        content = turn["content"]
        if content is None or not content.strip():
            what = "null" if content is None else "empty" if content == "" else "whitespace-only"
            return f"{_turn_name(index, turn['role'], batch.format)} is {what}"
    return "empty content"


def _end_reason(batch: RowBatch, row: int) -> str:
    last = batch.messages[row].as_py()[-1]["role"]
    return f"last turn is {last!r}, expected 'assistant'"


# --- content patterns: encoding, control characters, secrets, e-mail -----------------------


def _unusual_turns(content: pa.Array) -> np.ndarray:
    """Indices of the turns that are not plain ASCII text (see ``UNUSUAL``)."""
    import numpy as np
    import pyarrow.compute as pc

    unusual = pc.or_(pc.invert(pc.string_is_ascii(content)), pc.match_substring_regex(content, UNUSUAL))
    return np.flatnonzero(pc.fill_null(unusual, False).to_numpy(zero_copy_only=False))


def _content_patterns(
    facts: SplitFacts, batch: RowBatch, turns: Turns, well_formed: np.ndarray, unusual: np.ndarray
) -> None:
    import numpy as np
    import pyarrow.compute as pc

    suspects = turns.content.take(unusual)

    def per_row(pattern: str) -> np.ndarray:
        hits = np.zeros(len(turns.parent), dtype=bool)
        found = pc.fill_null(pc.match_substring_regex(suspects, pattern), False).to_numpy(zero_copy_only=False)
        hits[unusual[found]] = True
        return turns.any_per_row(hits) & well_formed

    lines = batch.lines
    invalid = np.zeros(len(lines), dtype=bool)
    invalid[list(batch.encoding)] = True
    encoding = invalid | per_row(CONTROL_CHARS)
    facts.add("encoding", encoding)
    facts.explain("encoding", lines, encoding, lambda row: batch.encoding.get(row) or _control_reason(batch, row))

    secrets = per_row("|".join(f"(?:{pattern})" for pattern in SECRET_PATTERNS.values()))
    facts.add("secrets", secrets)
    facts.explain("secrets", lines, secrets, lambda row: _secret_reason(batch, row))
    emails = per_row(EMAIL_PATTERN)
    facts.add("emails", emails)
    facts.explain("emails", lines, emails, lambda row: _email_reason(batch, row))


def _control_reason(batch: RowBatch, row: int) -> str:
    control = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
    for index, turn in enumerate(batch.messages[row].as_py()):
        found = control.search(turn["content"] or "")
        if found:
            char = found.group()
            where = _byte_in_line(batch, row, char)
            return (
                f"control character U+{ord(char):04X} in {_turn_name(index, turn['role'], batch.format)} "
                f"at character {found.start()}{where}"
            )
    return "control character"


def _byte_in_line(batch: RowBatch, row: int, char: str) -> str:
    """Where ``char`` sits in the raw line (as itself or as a \\u escape), when the file has lines."""
    if batch.offsets is None:
        return ""
    with open(batch.path, "rb") as handle:
        handle.seek(int(batch.offsets[row]))
        raw = handle.readline()
    forms = [char.encode("utf-8"), f"\\u{ord(char):04x}".encode(), f"\\u{ord(char):04X}".encode()]
    positions = [raw.find(form) for form in forms if raw.find(form) >= 0]
    if not positions:
        return ""
    return f" (byte {min(positions)} of the line, file offset {int(batch.offsets[row]) + min(positions)})"


def _secret_reason(batch: RowBatch, row: int) -> str:
    for index, turn in enumerate(batch.messages[row].as_py()):
        for kind, pattern in SECRET_PATTERNS.items():
            found = re.search(pattern, turn["content"] or "")
            if found:
                shown = found.group()[:6] + "…"
                return f"{kind} {shown!r} in {_turn_name(index, turn['role'], batch.format)}"
    return "credential pattern"


def _email_reason(batch: RowBatch, row: int) -> str:
    for index, turn in enumerate(batch.messages[row].as_py()):
        found = re.search(EMAIL_PATTERN, turn["content"] or "")
        if found:
            local, _, domain = found.group().partition("@")
            return f"e-mail address '{local[:1]}***@{domain}' in {_turn_name(index, turn['role'], batch.format)}"
    return "e-mail address"


# --- keys: duplicates and leakage ---------------------------------------------------------

_TAGS = {"question": 0x9E3779B97F4A7C15, "answer": 0xC2B2AE3D27D4EB4F, "whole": 0x165667B19E3779F9}


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole 64-bit key."""
    import numpy as np

    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _hash_strings(array: pa.Array) -> np.ndarray:
    import numpy as np

    values = array.to_numpy(zero_copy_only=False)
    return np.fromiter(map(hash, values), dtype=np.int64, count=len(values)).view(np.uint64)


def normalized_hashes(content: pa.Array, unusual: np.ndarray) -> np.ndarray:
    """``hash(normalize_text(s))`` of every turn, computed by Arrow except for non-ASCII turns.

    For plain ASCII text ``normalize_text`` (casefold, split on whitespace, join with one space)
    is lower-casing; unusual ASCII turns also get their whitespace runs collapsed by Arrow, and
    only non-ASCII turns (Unicode case folding and spaces) go through Python.
    """
    import numpy as np
    import pyarrow.compute as pc

    hashes = _hash_strings(pc.ascii_lower(content))
    if not len(unusual):
        return hashes
    odd = content.take(unusual)
    spaced = pc.replace_substring_regex(pc.ascii_lower(odd), ASCII_WHITESPACE_RUN, " ")
    hashes[unusual] = _hash_strings(pc.utf8_trim(spaced, " "))
    foreign = np.flatnonzero(~pc.fill_null(pc.string_is_ascii(odd), True).to_numpy(zero_copy_only=False))
    if len(foreign):
        texts = odd.take(foreign).to_pylist()
        hashes[unusual[foreign]] = np.fromiter(
            (hash(normalize_text(text)) for text in texts), np.int64, len(texts)
        ).view(np.uint64)
    return hashes


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

        question, answer, whole = (np.uint64(_TAGS[kind]) for kind in ("question", "answer", "whole"))
        rows = self.rows()
        return np.concatenate(
            [_mix(self.question[rows[0]] ^ question), _mix(self.answers ^ answer), _mix(self.whole[rows[2]] ^ whole)]
        )


def _keys(facts: SplitFacts, turns: Turns, well_formed: np.ndarray, unusual: np.ndarray) -> BatchKeys:
    """Hash each turn (normalised and exact), combine per row with role and position."""
    import numpy as np
    import pyarrow.compute as pc

    normalised = normalized_hashes(turns.content, unusual)
    encoded = pc.dictionary_encode(turns.role)
    role_hash = _hash_strings(encoded.dictionary)[encoded.indices.to_numpy()] if len(turns.role) else np.zeros(0, np.uint64)
    salt = _mix(role_hash ^ turns.position.astype(np.uint64))
    whole = _per_row_sum(turns, _mix(normalised ^ salt))
    exact_whole = _per_row_sum(turns, _mix(_hash_strings(turns.content) ^ salt))
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


def _leakage(
    facts: SplitFacts, batch: RowBatch, turns: Turns, keys: BatchKeys, well_formed: np.ndarray, index: TrainIndex
) -> None:
    """Validation rows sharing an answer, the question or the whole example with a train row."""
    import numpy as np

    rows = len(batch)
    found = index.find(keys.tagged())
    question_rows, answer_rows, whole_rows = keys.rows()
    cut = np.cumsum([len(question_rows), len(answer_rows)])
    question_line, answer_line, whole_line = np.split(found, cut)
    leaks = np.zeros(rows, dtype=bool)
    for hit_rows, hit_lines in ((question_rows, question_line), (answer_rows, answer_line), (whole_rows, whole_line)):
        leaks[hit_rows[hit_lines > 0]] = True
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
            return f"answer {_snippet(normalize_text(text))} also in {index.path}:{answer_line[first_answer[row]]}"
        if per_row["question"][row]:
            text = next(turn["content"] for turn in batch.messages[row].as_py() if turn["role"] == "user")
            return f"question {_snippet(normalize_text(text))} also in {index.path}:{per_row['question'][row]}"
        return f"whole example also in {index.path}:{per_row['whole'][row]}"

    facts.explain("train_overlap", batch.lines, leaks, why)


def _snippet(value: Any) -> str:
    text = " ".join(str(value).split())
    return repr(text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "...")


def mark_duplicates(facts: SplitFacts, normalized: bool) -> None:
    """Rows repeating an earlier row of the split (exactly, or after normalising case and spacing)."""
    import numpy as np

    line, well_formed = facts.column("line"), facts.column("well_formed")
    first = _first_occurrence(facts.column("key" if normalized else "exact_key"), well_formed)
    repeats = well_formed & (first != np.arange(len(line)))
    grouped = repeats.copy()
    grouped[first[repeats]] = True  # exact copies can only be among rows with a normalised twin
    exact_first = _first_occurrence(facts.column("exact_key"), grouped)
    exact = exact_first != np.arange(len(line))
    facts.columns["duplicates"] = [repeats]
    facts.reasons.pop("duplicates", None)

    def why(row: int) -> str:
        if exact[row]:
            return f"same example as line {line[exact_first[row]]}"
        return f"same example as line {line[first[row]]} after normalising case and whitespace"

    facts.explain("duplicates", line, repeats, why)


def _first_occurrence(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Index of the first row with the same key (the row itself when it is the first or not valid)."""
    import numpy as np

    first = np.arange(len(keys))
    rows = np.flatnonzero(valid)
    if len(rows):
        _, start, inverse = np.unique(keys[rows], return_index=True, return_inverse=True)
        first[rows] = rows[start[inverse]]
    return first


# --- token lengths -------------------------------------------------------------------------


def _token_lengths(
    facts: SplitFacts, batch: RowBatch, tokenizer: Any, max_length: int, renderable: np.ndarray
) -> None:
    """Untruncated length after the chat template, as ``tokenization.tokenize_example`` measures it."""
    import numpy as np

    rows = np.flatnonzero(renderable)
    examples = batch.messages.take(rows).to_pylist()
    lengths = np.full(len(batch), np.nan)
    errors: dict[int, str] = {}
    for start in range(0, len(rows), TOKENIZE_BATCH):
        chunk = examples[start : start + TOKENIZE_BATCH]
        for offset, (length, error) in enumerate(_measure(tokenizer, chunk)):
            row = int(rows[start + offset])
            lengths[row] = np.nan if length is None else length
            if error:
                errors[row] = error
    failed = np.zeros(len(batch), dtype=bool)
    failed[list(errors)] = True
    over = np.nan_to_num(lengths, nan=0) > max_length
    facts.add("token_length", lengths)
    facts.add("tokenizes", failed)
    facts.add("over_length", over)
    facts.explain("tokenizes", batch.lines, failed, lambda row: errors[row])
    facts.explain("over_length", batch.lines, over, lambda row: f"{int(lengths[row])} tokens > max_length {max_length}")


def _measure(tokenizer: Any, examples: list[list[dict[str, Any]]]) -> list[tuple[int | None, str | None]]:
    """Token counts of a batch; a template that raises is retried row by row to find the rows it refuses."""
    try:
        return [(length, None) for length in _batch_lengths(tokenizer, examples)]
    except Exception:  # the chat template is user Jinja and may raise anything
        results: list[tuple[int | None, str | None]] = []
        for example in examples:
            try:
                results.append((_batch_lengths(tokenizer, [example])[0], None))
            except Exception as caught:
                results.append((None, f"tokenisation failed: {type(caught).__name__}: {caught}"))
        return results


def _batch_lengths(tokenizer: Any, examples: list[list[dict[str, Any]]]) -> list[int]:
    if not examples:
        return []
    if examples[0][0]["role"] == TEXT_ROLE:
        texts = [turns[0]["content"] for turns in examples]
        eos = tokenizer.eos_token_id
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [len(item) + (eos is not None and (not item or item[-1] != eos)) for item in ids]
    encoded = tokenizer.apply_chat_template(examples, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [len(item) for item in ids]


# --- the suite -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One expectation: the rule's name, its GX expectation and how its threshold reads."""

    name: str
    expectation: Any  # a gx.expectations.* instance
    threshold: str
    severity: str


def build_rules(split: str, chat_like: bool, tokenized: bool, data: DataConfig) -> list[Rule]:
    """The expectations for one split; chat-only rules are left out for plain text, leakage for train."""
    import great_expectations as gx

    contract = data.contract
    minimum = getattr(contract.min_rows, split)
    rules = [
        Rule(
            "min_rows",
            gx.expectations.ExpectTableRowCountToBeBetween(min_value=minimum),
            f">= {minimum} row{'s' * (minimum != 1)}",
            contract.min_rows.severity,
        )
    ]
    names = ["required_fields", "empty_content", *(CHAT_ONLY if chat_like else ()), "encoding"]
    names += ["tokenizes"] if tokenized else []
    for name in names:
        rules.append(_flag_rule(name, contract))
    if tokenized:
        rules.append(_length_rule(data))
    names = ["duplicates", *(["train_overlap"] if split == "validation" else []), "secrets", "emails"]
    rules += [_flag_rule(name, contract) for name in names]
    for rule in rules:
        rule.expectation.meta = {"check": rule.name}
    return rules


def _flag_rule(name: str, contract: ContractConfig) -> Rule:
    import great_expectations as gx

    settings = contract.rule(name)
    expectation = gx.expectations.ExpectColumnValuesToBeInSet(
        column=name,
        value_set=[False],
        mostly=1 - settings.max_share,
        description=f"Rows that break data.contract.{name} (True) may be at most {settings.max_share:.1%}",
    )
    return Rule(name, expectation, _share_text(settings.max_share), settings.severity)


def _length_rule(data: DataConfig) -> Rule:
    import great_expectations as gx

    settings = data.contract.over_length
    expectation = gx.expectations.ExpectColumnValuesToBeBetween(
        column="token_length",
        min_value=1,
        max_value=data.max_length,
        mostly=1 - settings.max_share,
        description=f"Token length after the chat template is at most data.max_length ({data.max_length})",
    )
    threshold = f"token_length <= {data.max_length}; truncated: {_share_text(settings.max_share)}"
    return Rule("over_length", expectation, threshold, settings.severity)


def _share_text(max_share: float) -> str:
    return "no rows" if max_share == 0 else f"at most {max_share:.1%} of rows"


def gx_frame(facts: SplitFacts, rules: list[Rule], keep: np.ndarray) -> pd.DataFrame:
    """The columns GX checks, for the rows that are not quarantined."""
    import pandas as pd

    columns = {"line": facts.column("line")[keep]}
    for rule in rules:
        if rule.name == "over_length":
            columns["token_length"] = pd.array(facts.column("token_length")[keep]).astype("Int64")
        elif rule.name != "min_rows":
            columns[rule.name] = facts.column(rule.name)[keep]
    return pd.DataFrame(columns)


def _gx_context(docs_dir: Path) -> Any:
    """An ephemeral GX context whose one Data Docs site is ``docs_dir``, emptied for this run."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before the import: it logs ~150 INFO lines
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_gx_logging()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    shutil.rmtree(docs_dir, ignore_errors=True)
    for site in list(context.list_data_docs_sites()):
        context.delete_data_docs_site(site)
    context.add_data_docs_site(
        "loraops",
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def _quiet_gx_logging() -> None:
    """GX pins some module loggers at INFO (e.g. one line per ephemeral context); keep warnings only."""
    for name in list(logging.root.manager.loggerDict):
        if name == "great_expectations" or name.startswith("great_expectations."):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_suite(context: Any, split: str, frame: pd.DataFrame, rules: list[Rule]) -> Any:
    """Validate ``frame``; GX keeps the result in the context's store for ``context.build_data_docs``."""
    import great_expectations as gx

    batch = context.data_sources.add_pandas(f"loraops_{split}").add_dataframe_asset(split)
    definition = batch.add_batch_definition_whole_dataframe("all_rows")
    suite = context.suites.add(gx.ExpectationSuite(name=f"loraops_{split}"))
    for rule in rules:
        suite.add_expectation(rule.expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"loraops_{split}", data=definition, suite=suite)
    )
    # SUMMARY, not COMPLETE: GX lists unexpected rows one pandas lookup at a time; our reasons name them.
    return validation.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "SUMMARY"})


def to_checks(facts: SplitFacts, rules: list[Rule], result: Any, quarantined: dict[str, int], kept: int) -> list[ContractCheck]:
    """One ContractCheck per expectation, with up to five ``file:line: reason`` examples for a failure."""
    by_name = {rule.name: rule for rule in rules}
    checks = []
    for item in result.results:
        rule = by_name[item.expectation_config.meta["check"]]
        passed = bool(item.success)
        checks.append(
            ContractCheck(
                expectation=rule.name,
                split=facts.name,
                passed=passed,
                severity=rule.severity,
                observed=_observed(item, quarantined.get(rule.name, 0)),
                threshold=rule.threshold,
                examples=[] if passed else _examples(facts, rule.name, kept),
                hint="" if passed else _hint(rule.name, facts.name),
            )
        )
    order = [rule.name for rule in rules]
    return sorted(checks, key=lambda check: order.index(check.expectation))


def _observed(item: Any, quarantined: int) -> str:
    result = item.result or {}
    aside = f"; {quarantined} quarantined" if quarantined else ""
    if item.exception_info and item.exception_info.get("raised_exception"):
        return f"error: {item.exception_info.get('exception_message')}"
    if "observed_value" in result:
        return f"{result['observed_value']} rows{aside}"
    unexpected, total = result.get("unexpected_count", 0), result.get("element_count", 0)
    missing = result.get("missing_count", 0)
    measured = total - missing
    share = f" ({unexpected / measured:.1%})" if measured else ""
    which = " tokenised" if missing else ""
    return f"{unexpected} of {measured}{which} rows{share}{aside}"


def _examples(facts: SplitFacts, rule: str, kept: int) -> list[str]:
    if rule == "min_rows":
        return [f"{facts.path}: {kept} rows left to train on"]
    reasons = facts.reasons.get(rule, {})
    lines = [line for line in sorted(reasons) if line not in facts.quarantined][:MAX_EXAMPLES]
    return [f"{facts.path}:{line}: {reasons[line]}" for line in lines]


def _hint(rule: str, split: str) -> str:
    hint = HINTS[rule].replace("<split>", split)
    return hint + ("" if rule == "min_rows" else QUARANTINE_HINT.format(rule=rule))


def _format_check(splits: list[SplitFacts]) -> ContractCheck:
    """Train and validation must both be chat-like or both plain text: one loss, one tokenisation."""
    kinds = {facts.name: _kind(facts.format) for facts in splits if facts.format != EMPTY_FORMAT}
    passed = len(set(kinds.values())) <= 1
    return ContractCheck(
        expectation="same_format_kind",
        split="validation",
        passed=passed,
        observed=", ".join(f"{facts.name} {facts.format}" for facts in splits),
        threshold="both chat/alpaca or both text",
        examples=[] if passed else [f"{facts.path}: format {facts.format}" for facts in splits],
        hint="" if passed else "convert one split so both are chat/alpaca or both plain text",
    )


def _not_checked_without_validation() -> list[ContractCheck]:
    """The rules that compare train with validation, listed as not checked when there is no validation file."""
    rules = {
        "train_overlap": "no validation question or answer in train",
        "same_format_kind": "both chat/alpaca or both text",
    }
    return [
        ContractCheck(
            expectation=name, split="validation", passed=False, checked=False,
            observed="not checked: no validation file", threshold=threshold,
        )
        for name, threshold in rules.items()
    ]


def _kind(fmt: str) -> str:
    return "text" if fmt == "text" else "chat"


# --- quarantine ----------------------------------------------------------------------------


def quarantine(facts: SplitFacts, rules: Iterable[str], report_dir: Path) -> tuple[np.ndarray, QuarantineRecord | None]:
    """Set aside rows breaking ``rules``; write them, with line and reasons, to ``quarantine/<split>.jsonl``.

    Returns the mask of kept rows and the record for the report (None when nothing is configured).
    """
    import numpy as np

    from loraops.versioning import file_md5

    line = facts.column("line")
    target = report_dir / QUARANTINE_DIR / f"{facts.name}.jsonl"
    target.unlink(missing_ok=True)  # never leave a quarantine of an earlier run behind
    rules = list(rules)
    if not rules:
        return np.ones(len(line), dtype=bool), None
    flagged = {rule: facts.column(rule) for rule in rules if rule in facts.columns}
    aside = np.zeros(len(line), dtype=bool)
    for mask in flagged.values():
        aside |= mask
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for row in np.flatnonzero(aside):
            broken = [rule for rule, mask in flagged.items() if mask[row]]
            reasons = [f"{rule}: {facts.reasons.get(rule, {}).get(int(line[row]), '')}" for rule in broken]
            handle.write(json.dumps({"line": int(line[row]), "rules": broken, "reasons": reasons}) + "\n")
    facts.quarantined = {int(value) for value in line[aside]}
    record = QuarantineRecord(
        split=facts.name,
        source=facts.path,
        source_md5=file_md5(Path(facts.path)),
        path=str(target),
        rows=int(aside.sum()),
        by_rule={rule: int(mask.sum()) for rule, mask in flagged.items()},
    )
    if record.rows:
        logger.warning("Quarantined %d %s rows (%s) in %s", record.rows, facts.name, record.by_rule, target)
    return ~aside, record


def quarantined_lines(report_dir: str | Path, split: str, source: str | Path) -> set[int]:
    """Lines of ``source`` the last contract run set aside; refuses a quarantine made for other data."""
    from loraops.versioning import file_md5

    summary = Path(report_dir) / SUMMARY_FILE
    if not summary.is_file():
        raise DataError(f"{summary}: not found; run `loraops stage validate-dataset` before using data.contract.quarantine")
    record = ContractReport.read_json(summary).quarantine.get(split)
    if record is None:
        raise DataError(f"{summary}: no {split} quarantine recorded; rerun `loraops stage validate-dataset`")
    if Path(record.source).resolve() != Path(source).resolve() or record.source_md5 != file_md5(Path(source)):
        raise DataError(
            f"{record.path}: made for {record.source} as it was then, not the current {source}; "
            "rerun `loraops stage validate-dataset`"
        )
    with open(record.path, encoding="utf-8") as handle:
        return {json.loads(text)["line"] for text in handle if text.strip()}


# --- entry point ---------------------------------------------------------------------------


def validate_dataset(
    train: str | Path, validation: str | Path | None, tokenizer: Any, data: DataConfig, report_dir: str | Path
) -> ContractReport:
    """Run the contract over both splits; write GX results, Data Docs, quarantine and a summary.

    ``validation=None`` checks the train file on its own (``loraops validate FILE``): every
    per-split rule, with the rules across splits reported as not checked.
    ``tokenizer=None`` skips the two token rules (the benchmark measures that path separately);
    the pipeline always passes one.
    """
    report_dir = Path(report_dir)
    contract = data.contract
    train_facts = scan_split("train", train, data, tokenizer)
    splits = [train_facts]
    if validation is not None:
        splits.append(scan_split("validation", validation, data, tokenizer, TrainIndex.of(train_facts)))
    context = _gx_context(report_dir / DOCS_DIR)
    checks: list[ContractCheck] = []
    raw: dict[str, Any] = {}
    records: dict[str, QuarantineRecord] = {}
    for facts in splits:
        mark_duplicates(facts, contract.duplicates.normalized)
        keep, record = quarantine(facts, contract.quarantine, report_dir)
        if record is not None:
            records[facts.name] = record
        rules = build_rules(facts.name, _kind(facts.format) == "chat", tokenizer is not None, data)
        result = run_suite(context, facts.name, gx_frame(facts, rules, keep), rules)
        raw[facts.name] = result.to_json_dict()
        counts = record.by_rule if record else {}
        checks += to_checks(facts, rules, result, {"min_rows": record.rows if record else 0, **counts}, int(keep.sum()))
    checks += [_format_check(splits)] if validation is not None else _not_checked_without_validation()
    context.build_data_docs()
    formats = [facts.format for facts in splits if facts.format != EMPTY_FORMAT]
    report = ContractReport(
        passed=all(check.passed for check in checks if check.severity == "fail" and check.checked),
        checks=checks,
        train_rows=len(train_facts.column("line")),
        validation_rows=len(splits[1].column("line")) if validation is not None else None,
        format=formats[0] if formats else EMPTY_FORMAT,
        quarantine=records,
        data_docs=str(report_dir / DOCS_DIR / "index.html"),
    )
    report.report_path = str(_write_reports(report_dir, raw, report))
    verdict = "passed" if report.passed else "FAILED"
    logger.info("Data contract %s: %d checks, %d failed", verdict, len(checks), len(report.failures()))
    return report


def _write_reports(report_dir: Path, raw: dict[str, Any], report: ContractReport) -> Path:
    """Write the full GX result (``data_contract.json``) and the summary next to it; return the former."""
    report_dir.mkdir(parents=True, exist_ok=True)
    full = report_dir / "data_contract.json"
    full.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    report.model_copy(update={"report_path": str(full)}).write_json(report_dir / SUMMARY_FILE)
    return full


def format_report(report: ContractReport, failures_only: bool = False) -> str:
    """A readable summary: one line per expectation, failing rows and the fix listed under each failure."""
    verdict = "PASSED" if report.passed else "FAILED"
    rows = f"{report.train_rows} train / {report.validation_rows} validation rows"
    if report.validation_rows is None:
        rows = f"{report.train_rows} train rows; no validation file"
    lines = [f"Data contract {verdict} (format {report.format}; {rows})"]
    for check in report.checks:
        if failures_only and (check.passed or check.severity == "warn" or not check.checked):
            continue
        status = "PASS" if check.passed else "FAIL" if check.severity == "fail" else "WARN"
        status = status if check.checked else "SKIP"
        lines.append(
            f"  {status} {check.split:<10} {check.expectation:<22} "
            f"observed {check.observed}; expected {check.threshold}"
        )
        lines += [f"       {example}" for example in check.examples]
        if check.hint:
            lines.append(f"       fix: {check.hint}")
    for record in report.quarantine.values():
        kinds = ", ".join(f"{rule} {count}" for rule, count in record.by_rule.items()) or "nothing selected"
        lines.append(f"  Quarantined {record.rows} {record.split} rows ({kinds}): {record.path}")
    if report.data_docs and not failures_only:
        lines.append(f"  Data Docs: {report.data_docs}")
    return "\n".join(lines)
