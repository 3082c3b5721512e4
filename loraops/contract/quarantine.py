"""Quarantine: rows breaking the rules in ``data.contract.quarantine`` are set aside, written with reasons."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loraops.contract.facts import SplitFacts, snippet
from loraops.data.formats import DataError
from loraops.names import CONTRACT_SUMMARY, QUARANTINE_DIR
from loraops.results import ContractReport, QuarantineRecord

logger = logging.getLogger(__name__)


class Quarantine:
    """Sets aside a split's rows breaking ``rules``, batch by batch, into ``quarantine/<split>.jsonl`` with reasons."""

    def __init__(self, split: str, rules: Iterable[str], report_dir: Path) -> None:
        self.rules = list(rules)
        self.target = report_dir / QUARANTINE_DIR / f"{split}.jsonl"
        self.target.unlink(missing_ok=True)  # never leave a quarantine of an earlier run behind
        self.partial = self.target.with_suffix(".jsonl.partial")  # renamed to target once the split is done
        self.by_rule: dict[str, int] = {}
        self.rows = 0
        if self.rules:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.partial.write_text("")

    def write(self, facts: SplitFacts, broken: dict[str, dict[int, Any]]) -> set[int]:
        """Write the rows the suite found breaking a quarantine rule (rule -> line -> offending value), with reasons.

        The verdicts are GX's (the rule's expectation in the suite, ``chunks.SplitRun``); the reasons are
        the scan's explanations, else the offending value. Returns the lines set aside.
        """
        lines = sorted(set().union(*broken.values())) if broken else []
        with self.partial.open("a", encoding="utf-8") as handle:
            for line in lines:
                rules = [rule for rule, found in broken.items() if line in found]
                reasons = [
                    f"{rule}: {facts.reasons.get(rule, {}).get(line) or snippet(broken[rule][line])}" for rule in rules
                ]
                handle.write(json.dumps({"line": line, "rules": rules, "reasons": reasons}) + "\n")
        for rule, found in broken.items():
            self.by_rule[rule] = self.by_rule.get(rule, 0) + len(found)
        facts.quarantined.update(lines)
        self.rows += len(lines)
        return set(lines)

    def record(self, facts: SplitFacts) -> QuarantineRecord | None:
        """What was set aside, for the report (None when no rule is configured)."""
        from loraops.data.files import file_md5

        if not self.rules:
            return None
        self.partial.replace(self.target)
        record = QuarantineRecord(
            split=facts.name,
            source=facts.path,
            source_md5=file_md5(Path(facts.path)),
            path=str(self.target),
            rows=self.rows,
            by_rule={rule: self.by_rule[rule] for rule in self.rules if rule in self.by_rule},
        )
        if record.rows:
            logger.warning("Quarantined %d %s rows (%s) in %s", record.rows, facts.name, record.by_rule, self.target)
        return record


def quarantined_lines(report_dir: str | Path, split: str, source: str | Path) -> set[int]:
    """Lines of ``source`` the last contract run set aside; refuses a quarantine made for other data."""
    from loraops.data.files import file_md5

    summary = Path(report_dir) / CONTRACT_SUMMARY
    if not summary.is_file():
        raise DataError(
            f"{summary}: not found; run `loraops stage validate-dataset` before using data.contract.quarantine"
        )
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
