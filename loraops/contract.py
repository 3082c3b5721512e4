"""The data contract: a Great Expectations suite over one row per example, with line numbers.

Each split becomes a DataFrame of derived columns (fields present, empty content, role order,
token length, duplicate and leakage keys) so that every rule is a plain GX column expectation and
GX's unexpected-index report points at the source line. Problems are collected, not raised one by
one, so a user fixes a whole file in one pass.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from loraops.data import LoadedSplit, dedup_key, overlap_keys
from loraops.results import ContractCheck, ContractReport
from loraops.tokenization import token_lengths

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_EXAMPLES = 5
SNIPPET_CHARS = 60
ALPACA_FIELDS = {"user": "instruction", "assistant": "output"}


class DataContractError(RuntimeError):
    """The data broke the contract; the message lists each failed expectation with example lines."""

    def __init__(self, report: ContractReport) -> None:
        self.report = report
        super().__init__(format_report(report, failures_only=True))


@dataclass(frozen=True)
class Rule:
    """One contract rule: the GX expectation to run and the column that explains a failing row."""

    name: str
    expectation: Any  # a gx.expectations.* instance
    threshold: str
    reason_column: str | None  # per-row explanation shown in the examples


# --- derived columns -----------------------------------------------------------------------


def _snippet(value: Any) -> str:
    text = " ".join(str(value).split())
    return repr(text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "...")


def _turn_name(index: int, role: Any, fmt: str) -> str:
    if fmt == "alpaca" and role in ALPACA_FIELDS:
        return f"field '{ALPACA_FIELDS[role]}'"
    return f"content of message {index + 1} ({role})"


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


def empty_problem(example: dict[str, Any], fmt: str) -> str | None:
    """Which turn (or text) is null, empty or whitespace-only."""
    if "text" in example:
        text = example["text"]
        return None if isinstance(text, str) and text.strip() else f"field 'text' is {_emptiness(text)}"
    for index, message in enumerate(example["messages"]):
        content = message.get("content")
        if content is None or (isinstance(content, str) and not content.strip()):
            return f"{_turn_name(index, message.get('role'), fmt)} is {_emptiness(content)}"
    return None


def _emptiness(value: Any) -> str:
    return "null" if value is None else "empty" if value == "" else "whitespace-only"


def role_problem(messages: list[dict[str, Any]]) -> str | None:
    """Roles must be an optional leading system turn, then user/assistant alternating from user."""
    roles = [message.get("role") for message in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user" if index % 2 == 0 else "assistant" for index in range(len(turns))]
    if turns == expected and turns:
        return None
    shown = ", ".join(str(role) for role in roles)
    unknown = sorted({str(role) for role in roles} - set(ROLES))
    hint = f"unknown role(s) {unknown}" if unknown else "expected [system,] user, assistant, user, ..."
    return f"roles {shown}: {hint}"


def _chat_columns(example: dict[str, Any], well_formed: bool) -> dict[str, Any]:
    if "messages" not in example:
        return {"roles_valid": True, "role_reason": None, "ends_with_assistant": True, "end_reason": None}
    messages = example["messages"] if well_formed else []
    roles_reason = role_problem(messages) if well_formed else None
    last = messages[-1].get("role") if messages else None
    ends = not well_formed or last == "assistant"
    return {
        "roles_valid": roles_reason is None,
        "role_reason": roles_reason,
        "ends_with_assistant": ends,
        "end_reason": None if ends else f"last turn is {last!r}, expected 'assistant'",
    }


def _row_columns(split: LoadedSplit, index: int) -> dict[str, Any]:
    example = split.examples[index]
    field_reason = field_problem(split.rows[index], split.format)
    well_formed = field_reason is None
    empty_reason = empty_problem(example, split.format) if well_formed else None
    return {
        "line": split.lines[index],
        "has_required_fields": well_formed,
        "field_reason": field_reason,
        "empty_content": empty_reason is not None,
        "empty_reason": empty_reason,
        **_chat_columns(example, well_formed),
        "dedup_key": dedup_key(example) if well_formed else None,
        "snippet": _snippet(_first_content(example)),
    }


def _first_content(example: dict[str, Any]) -> Any:
    if "text" in example:
        return example["text"]
    messages = example.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[0].get("content")
    return messages


def build_frame(split: LoadedSplit, tokenizer: Any, max_length: int) -> pd.DataFrame:
    """One row per example with every column the expectations check, plus reasons for reports."""
    records = [_row_columns(split, index) for index in range(len(split))]
    frame = pd.DataFrame.from_records(records, columns=_COLUMNS)
    _add_token_lengths(frame, split, tokenizer, max_length)
    _add_duplicate_reasons(frame)
    return frame


_COLUMNS = [
    "line", "has_required_fields", "field_reason", "empty_content", "empty_reason", "roles_valid",
    "role_reason", "ends_with_assistant", "end_reason", "dedup_key", "snippet",
]  # fmt: skip


def _add_token_lengths(frame: pd.DataFrame, split: LoadedSplit, tokenizer: Any, max_length: int) -> None:
    """Untruncated template length of rows fit to render; a template that raises is reported, not fatal."""
    lengths: list[int | None] = []
    errors: list[str | None] = []
    well_formed = frame["has_required_fields"] & ~frame["empty_content"]
    renderable = well_formed & frame["roles_valid"] & frame["ends_with_assistant"]
    for index, fit in enumerate(renderable):
        length, error = None, None
        if fit:
            try:
                length = token_lengths(tokenizer, [split.examples[index]])[0]
            except Exception as caught:  # the chat template is user Jinja and may raise anything
                error = f"tokenisation failed: {type(caught).__name__}: {caught}"
        lengths.append(length)
        errors.append(error)
    frame["token_length"] = pd.array(lengths, dtype="Int64")
    frame["template_error"] = errors
    frame["length_reason"] = [
        None if length is None else f"{length} tokens > max_length {max_length}" for length in lengths
    ]


def _add_duplicate_reasons(frame: pd.DataFrame) -> None:
    lines_by_key: dict[str, list[int]] = {}
    for line, key in zip(frame["line"], frame["dedup_key"]):
        if key is not None:
            lines_by_key.setdefault(key, []).append(int(line))
    frame["duplicate_reason"] = [
        _duplicate_reason(line, lines_by_key.get(key, []), snippet)
        for line, key, snippet in zip(frame["line"], frame["dedup_key"], frame["snippet"])
    ]


def _duplicate_reason(line: int, same: list[int], snippet: str) -> str | None:
    others = [str(other) for other in same if other != line]
    return f"same example as line(s) {', '.join(others[:5])}: {snippet}" if others else None


def add_leakage(frame: pd.DataFrame, validation: LoadedSplit, train: LoadedSplit, train_frame: pd.DataFrame) -> None:
    """Mark validation rows whose question, an answer or the whole example also occurs in train."""
    train_lines: dict[str, int] = {}
    for index, well_formed in enumerate(train_frame["has_required_fields"]):
        if well_formed:
            for key in overlap_keys(train.examples[index]):
                train_lines.setdefault(key, train.lines[index])
    reasons = []
    for index, well_formed in enumerate(frame["has_required_fields"]):
        shared = sorted(overlap_keys(validation.examples[index]) & train_lines.keys()) if well_formed else []
        reasons.append(_leak_reason(shared, train_lines, train.path))
    frame["leaks_into_train"] = [reason is not None for reason in reasons]
    frame["leak_reason"] = reasons


def _leak_reason(shared: list[str], train_lines: dict[str, int], train_path: str) -> str | None:
    if not shared:
        return None
    kind, _, text = shared[0].partition(":")
    shown = "" if kind == "whole" else f" {_snippet(text)}"
    return f"{kind}{shown} also in {train_path}:{train_lines[shared[0]]}"


# --- the suite -----------------------------------------------------------------------------


def build_rules(split_name: str, chat_like: bool, max_length: int) -> list[Rule]:
    """The expectations for one split; chat-only rules are left out for plain-text data."""
    import great_expectations as gx

    expect = gx.expectations
    rules = [
        Rule("has_rows", expect.ExpectTableRowCountToBeBetween(min_value=1), ">= 1 row", None),
        Rule("required_fields", _all_true(expect, "has_required_fields"), "0 rows", "field_reason"),
        Rule("no_empty_content", _all_false(expect, "empty_content"), "0 rows", "empty_reason"),
    ]
    if chat_like:
        rules += [
            Rule("roles_valid", _all_true(expect, "roles_valid"), "0 rows", "role_reason"),
            Rule("ends_with_assistant", _all_true(expect, "ends_with_assistant"), "0 rows", "end_reason"),
        ]
    rules += [
        Rule(
            "tokenizes",
            expect.ExpectColumnValuesToBeNull(column="template_error"),
            "0 rows",
            "template_error",
        ),
        Rule(
            "max_token_length",
            expect.ExpectColumnValuesToBeBetween(column="token_length", min_value=1, max_value=max_length),
            f"1 <= token_length <= {max_length}",
            "length_reason",
        ),
        Rule(
            "no_duplicates",
            expect.ExpectColumnValuesToBeUnique(column="dedup_key"),
            "0 repeated rows",
            "duplicate_reason",
        ),
    ]
    if split_name == "validation":
        rules.append(Rule("no_train_overlap", _all_false(expect, "leaks_into_train"), "0 rows", "leak_reason"))
    for rule in rules:
        rule.expectation.meta = {"check": rule.name}
    return rules


def _all_true(expect: Any, column: str) -> Any:
    return expect.ExpectColumnValuesToBeInSet(column=column, value_set=[True])


def _all_false(expect: Any, column: str) -> Any:
    return expect.ExpectColumnValuesToBeInSet(column=column, value_set=[False])


def _gx_context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_gx_logging()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _quiet_gx_logging() -> None:
    """GX pins some module loggers at INFO (e.g. one line per ephemeral context); keep warnings only."""
    for name in list(logging.root.manager.loggerDict):
        if name == "great_expectations" or name.startswith("great_expectations."):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_suite(context: Any, split_name: str, frame: pd.DataFrame, rules: list[Rule]) -> Any:
    """Validate ``frame`` with GX; unexpected rows come back identified by their ``line``."""
    import great_expectations as gx

    # GX sees only the checked columns; the reason columns serve the examples in our report.
    explanations = [column for column in frame.columns if column.endswith("_reason") or column == "snippet"]
    checked = frame.drop(columns=explanations)
    batch = context.data_sources.add_pandas(f"loraops_{split_name}").add_dataframe_asset(split_name)
    definition = batch.add_batch_definition_whole_dataframe("all_rows")
    suite = context.suites.add(gx.ExpectationSuite(name=f"loraops_{split_name}"))
    for rule in rules:
        suite.add_expectation(rule.expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"loraops_{split_name}", data=definition, suite=suite)
    )
    return validation.run(
        batch_parameters={"dataframe": checked},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]},
    )


def to_checks(
    split_name: str, split: LoadedSplit, frame: pd.DataFrame, rules: list[Rule], result: Any
) -> list[ContractCheck]:
    """Turn GX results into ContractChecks, with up to five ``file:line: reason`` examples each."""
    by_name = {rule.name: rule for rule in rules}
    checks = []
    for item in result.results:
        rule = by_name[item.expectation_config.meta["check"]]
        checks.append(
            ContractCheck(
                expectation=rule.name,
                split=split_name,
                passed=bool(item.success),
                observed=_observed(item),
                threshold=rule.threshold,
                examples=[] if item.success else _examples(split, frame, rule, item),
            )
        )
    order = [rule.name for rule in rules]
    return sorted(checks, key=lambda check: order.index(check.expectation))


def _observed(item: Any) -> str:
    result = item.result or {}
    if item.exception_info and item.exception_info.get("raised_exception"):
        return f"error: {item.exception_info.get('exception_message')}"
    if "observed_value" in result:
        return f"{result['observed_value']} rows"
    return f"{result.get('unexpected_count', 0)} of {result.get('element_count', 0)} rows unexpected"


def _examples(split: LoadedSplit, frame: pd.DataFrame, rule: Rule, item: Any) -> list[str]:
    if rule.reason_column is None:
        return [f"{split.path}: the split has no rows; point the data config at a file with examples"]
    lines = [int(entry["line"]) for entry in (item.result or {}).get("unexpected_index_list") or []]
    reasons = dict(zip(frame["line"].astype(int), frame[rule.reason_column]))
    return [f"{split.path}:{line}: {reasons.get(line) or 'unexpected value'}" for line in lines[:MAX_EXAMPLES]]


def _format_check(splits: dict[str, LoadedSplit]) -> ContractCheck:
    """Train and validation must both be chat-like or both plain text: one loss, one tokenisation."""
    kinds = {name: _kind(split) for name, split in splits.items() if split.rows}
    passed = len(set(kinds.values())) <= 1
    return ContractCheck(
        expectation="same_format_kind",
        split="validation",
        passed=passed,
        observed=", ".join(f"{name} {splits[name].format}" for name in kinds),
        threshold="both chat/alpaca or both text",
        examples=[] if passed else [f"{split.path}: format {split.format}" for split in splits.values()],
    )


def _kind(split: LoadedSplit) -> str:
    return "text" if split.format == "text" else "chat"


# --- entry point ---------------------------------------------------------------------------


def validate_dataset(
    train: LoadedSplit, validation: LoadedSplit, tokenizer: Any, max_length: int, report_dir: str | Path
) -> ContractReport:
    """Run the contract over both splits and write the GX result and a summary under ``report_dir``."""
    context = _gx_context()
    train_frame = build_frame(train, tokenizer, max_length)
    validation_frame = build_frame(validation, tokenizer, max_length)
    add_leakage(validation_frame, validation, train, train_frame)
    checks: list[ContractCheck] = []
    raw: dict[str, Any] = {}
    for name, split, frame in (("train", train, train_frame), ("validation", validation, validation_frame)):
        rules = build_rules(name, _kind(split) == "chat", max_length)
        result = run_suite(context, name, frame, rules)
        raw[name] = result.to_json_dict()
        checks += to_checks(name, split, frame, rules, result)
    checks.append(_format_check({"train": train, "validation": validation}))
    report = ContractReport(
        passed=all(check.passed for check in checks if check.severity == "fail"),
        checks=checks,
        train_rows=len(train),
        validation_rows=len(validation),
        format=train.format if train.rows else validation.format,
    )
    report.report_path = str(_write_reports(Path(report_dir), raw, report))
    verdict = "passed" if report.passed else "FAILED"
    logger.info("Data contract %s: %d checks, %d failed", verdict, len(checks), len(report.failures()))
    return report


def _write_reports(report_dir: Path, raw: dict[str, Any], report: ContractReport) -> Path:
    """Write the full GX result (``data_contract.json``) and the summary next to it; return the former."""
    report_dir.mkdir(parents=True, exist_ok=True)
    full = report_dir / "data_contract.json"
    full.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    report.model_copy(update={"report_path": str(full)}).write_json(report_dir / "data_contract_summary.json")
    return full


def format_report(report: ContractReport, failures_only: bool = False) -> str:
    """A readable summary: one line per expectation, failing rows listed under each failure."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"Data contract {verdict} (format {report.format}; {report.train_rows} train / "
        f"{report.validation_rows} validation rows)"
    ]
    for check in report.checks:
        if failures_only and check.passed:
            continue
        status = "PASS" if check.passed else "FAIL" if check.severity == "fail" else "WARN"
        lines.append(
            f"  {status} {check.split:<10} {check.expectation:<22} "
            f"observed {check.observed}; expected {check.threshold}"
        )
        lines += [f"       {example}" for example in check.examples]
    return "\n".join(lines)
