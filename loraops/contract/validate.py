"""The entry point: scan both splits, quarantine and validate them chunk by chunk with GX, write the reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from loraops.config import DataConfig
from loraops.contract.chunks import SplitRun
from loraops.contract.context import gx_dir, run_context
from loraops.contract.keys import TrainIndex
from loraops.contract.report import format_check, not_checked_without_validation, to_checks
from loraops.contract.scan import scan_split
from loraops.data.formats import EMPTY_FORMAT
from loraops.names import CONTRACT_DOCS_DIR, CONTRACT_SUMMARY
from loraops.results import ContractCheck, ContractReport, QuarantineRecord

logger = logging.getLogger(__name__)


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
    context = run_context(report_dir / CONTRACT_DOCS_DIR)
    tokenized = tokenizer is not None
    runs = [SplitRun(context, data, "train", tokenized, report_dir)]
    splits = [scan_split("train", train, data, tokenizer, on_batch=runs[0].add)]
    if validation is not None:
        runs.append(SplitRun(context, data, "validation", tokenized, report_dir))
        index = TrainIndex.of(splits[0])
        splits.append(scan_split("validation", validation, data, tokenizer, index, on_batch=runs[1].add))
    train_facts = splits[0]
    checks: list[ContractCheck] = []
    raw: dict[str, Any] = {}
    records: dict[str, QuarantineRecord] = {}
    known = [facts.format for facts in splits if facts.format != EMPTY_FORMAT]
    for facts, run in zip(splits, runs):
        fmt = facts.format if facts.format != EMPTY_FORMAT else (known[0] if known else "chat")
        result, entries, record = run.finish(facts, fmt)
        if record is not None:
            records[facts.name] = record
        raw[facts.name] = result.to_json_dict()
        counts = {"min_rows": record.rows if record else 0, **(record.by_rule if record else {})}
        suite = str(gx_dir(data) / "expectations" / f"{fmt}.json")
        checks += to_checks(facts, entries, result, counts, run.kept, suite)
    checks += [format_check(splits)] if validation is not None else not_checked_without_validation()
    context.build_data_docs()
    report = ContractReport(
        passed=all(check.passed for check in checks if check.severity == "fail" and check.checked),
        checks=checks,
        train_rows=len(train_facts.column("line")),
        validation_rows=len(splits[1].column("line")) if validation is not None else None,
        format=known[0] if known else EMPTY_FORMAT,
        quarantine=records,
        data_docs=str(report_dir / CONTRACT_DOCS_DIR / "index.html"),
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
    report.model_copy(update={"report_path": str(full)}).write_json(report_dir / CONTRACT_SUMMARY)
    return full
