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


def quarantine(facts: SplitFacts, rules: Iterable[str], report_dir: Path) -> tuple[np.ndarray, QuarantineRecord | None]:
    """Set aside rows breaking ``rules``; write them, with line and reasons, to ``quarantine/<split>.jsonl``.

    Returns the mask of kept rows and the record for the report (None when nothing is configured).
    """
    import numpy as np

    from loraops.data.files import file_md5

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
