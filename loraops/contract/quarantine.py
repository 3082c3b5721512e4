"""Quarantine: rows breaking the rules in ``data.contract.quarantine`` are set aside, written with reasons."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from loraops.contract.facts import SplitFacts
from loraops.data.formats import DataError
from loraops.names import CONTRACT_SUMMARY, QUARANTINE_DIR
from loraops.results import ContractReport, QuarantineRecord

if TYPE_CHECKING:
    import numpy as np

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

    def take(self, facts: SplitFacts, start: int, stop: int) -> np.ndarray:
        """Write rows ``start:stop`` that break a rule; return the mask of the rows kept."""
        import numpy as np

        if not self.rules:
            return np.ones(stop - start, dtype=bool)
        line = facts.window("line", start, stop)
        flagged = {rule: facts.window(rule, start, stop) for rule in self.rules if rule in facts.columns}
        aside = np.zeros(len(line), dtype=bool)
        for rule, mask in flagged.items():
            aside |= mask
            self.by_rule[rule] = self.by_rule.get(rule, 0) + int(mask.sum())
        with self.partial.open("a", encoding="utf-8") as handle:
            for row in np.flatnonzero(aside):
                broken = [rule for rule, mask in flagged.items() if mask[row]]
                reasons = [f"{rule}: {facts.reasons.get(rule, {}).get(int(line[row]), '')}" for rule in broken]
                handle.write(json.dumps({"line": int(line[row]), "rules": broken, "reasons": reasons}) + "\n")
        facts.quarantined.update(int(value) for value in line[aside])
        self.rows += int(aside.sum())
        return ~aside

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
            by_rule={rule: self.by_rule.get(rule, 0) for rule in self.rules if rule in facts.columns},
        )
        if record.rows:
            logger.warning("Quarantined %d %s rows (%s) in %s", record.rows, facts.name, record.by_rule, self.target)
        return record


def quarantine(facts: SplitFacts, rules: Iterable[str], report_dir: Path) -> tuple[np.ndarray, QuarantineRecord | None]:
    """Quarantine a whole scanned split at once: the mask of kept rows and the record (None: no rules)."""
    aside = Quarantine(facts.name, rules, report_dir)
    keep = aside.take(facts, 0, facts.rows)
    return keep, aside.record(facts)


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
