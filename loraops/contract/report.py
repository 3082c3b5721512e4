"""The contract's results as ContractChecks, the readable summary and the error that stops the pipeline."""

from __future__ import annotations

from typing import Any

from loraops.contract.context import SuiteEntry, entry_name
from loraops.contract.facts import MAX_EXAMPLES, SplitFacts, snippet
from loraops.data.formats import EMPTY_FORMAT
from loraops.results import ContractCheck, ContractReport

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


def to_checks(
    facts: SplitFacts, entries: list[SuiteEntry], result: Any, quarantined: dict[str, int], kept: int, suite: str
) -> list[ContractCheck]:
    """One ContractCheck per expectation, with up to five ``file:line: reason`` examples for a failure."""
    by_name = {entry_name(entry): entry for entry in entries}
    checks = []
    for item in result.results:
        name = item.expectation_config.meta["check"]
        entry = by_name[name]
        passed = bool(item.success)
        checks.append(
            ContractCheck(
                expectation=name,
                split=facts.name,
                passed=passed,
                severity=entry.severity,
                observed=_observed(item, quarantined.get(name, 0)),
                threshold=entry.threshold,
                examples=[] if passed else _examples(facts, entry, item, kept),
                hint="" if passed else _hint(entry, facts.name, suite),
            )
        )
    order = list(by_name)
    return sorted(checks, key=lambda check: order.index(check.expectation))


def _observed(item: Any, quarantined: int) -> str:
    result = item.result or {}
    aside = f"; {quarantined} quarantined" if quarantined else ""
    error = _error(item)
    if error:
        return f"error: {error}"
    if "observed_value" in result:
        return f"{result['observed_value']} rows{aside}"
    unexpected, total = result.get("unexpected_count", 0), result.get("element_count", 0)
    tokens = item.expectation_config.kwargs.get("column") == "n_tokens"
    measured = total - result.get("missing_count", 0) if tokens else total  # other nulls are malformed rows
    share = f" ({unexpected / measured:.1%})" if measured else ""
    which = " tokenised" if tokens and measured != total else ""
    return f"{unexpected} of {measured}{which} rows{share}{aside}"


def _error(item: Any) -> str | None:
    """GX's message when the expectation could not be computed (e.g. a column the table lacks)."""
    info = item.exception_info or {}
    for value in [info, *info.values()]:
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "GX raised an exception")
    return None


def _examples(facts: SplitFacts, entry: SuiteEntry, item: Any, kept: int) -> list[str]:
    """The first failing rows GX found, each with loraops' explanation or else the offending value."""
    if entry.rule == "min_rows":
        return [f"{facts.path}: {kept} rows left to train on"]
    reasons = facts.reasons.get(entry.rule, {}) if entry.rule else {}
    column = item.expectation_config.kwargs.get("column")
    found = _unexpected(item, column)
    if not found:  # GX lists no rows (a table-level expectation): loraops' own explanations, if any
        found = [(line, None) for line in sorted(reasons) if line not in facts.quarantined]
    shown = []
    for line, value in found[:MAX_EXAMPLES]:
        why = reasons.get(line) or f"{column} = {snippet(value)}"
        shown.append(f"{facts.path}:{line}: {why}")
    return shown


def _unexpected(item: Any, column: str | None) -> list[tuple[int, Any]]:
    """(line, value) of the unexpected rows GX lists (``unexpected_index_column_names: [line]``)."""
    result = item.result or {}
    indices = result.get("partial_unexpected_index_list") or []
    values = result.get("partial_unexpected_list") or []
    found = []
    for position, index in enumerate(indices):
        line = index.get("line") if isinstance(index, dict) else None
        if line is not None:
            value = index.get(column) if isinstance(index, dict) and column in index else None
            found.append(
                (int(line), value if value is not None else (values[position] if position < len(values) else None))
            )
    return found


def _hint(entry: SuiteEntry, split: str, suite: str) -> str:
    if entry.rule is None:
        return f"fix these rows, or change this expectation in {suite}"
    hint = HINTS[entry.rule].replace("<split>", split)
    return hint + ("" if entry.rule == "min_rows" else QUARANTINE_HINT.format(rule=entry.rule))


def format_check(splits: list[SplitFacts]) -> ContractCheck:
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


def not_checked_without_validation() -> list[ContractCheck]:
    """The rules that compare train with validation, listed as not checked when there is no validation file."""
    rules = {
        "train_overlap": "no validation question or answer in train",
        "same_format_kind": "both chat/alpaca or both text",
    }
    return [
        ContractCheck(
            expectation=name,
            split="validation",
            passed=False,
            checked=False,
            observed="not checked: no validation file",
            threshold=threshold,
        )
        for name, threshold in rules.items()
    ]


def _kind(fmt: str) -> str:
    return "text" if fmt == "text" else "chat"


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
