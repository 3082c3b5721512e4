"""Chunked validation of one split: quarantine, the example table and its GX checkpoint, batch by batch.

``scan_split`` calls ``SplitRun.add`` after each read batch, once every fact of its rows is known.
The batch's rows become rows of the example table; with ``data.contract.quarantine`` set, the
expectations of those rules run on them first and the rows they find unexpected are set aside
(the suite's verdict, as for the contract itself: one implementation per rule). Each time
``data.contract.chunk_rows`` rows are waiting GX validates them and they are dropped, so the text
columns of at most one chunk (plus one read batch) are in memory whatever the file's size.
``finish`` validates the rest and merges the chunks' results into the split's one result
(``merge.py``); a suite holding an expectation that needs the whole column at once is validated
in one piece instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.config import DataConfig
from loraops.contract.context import (
    EVERY_ROW,
    SuiteEntry,
    add_checkpoint,
    load_suite,
    run_checkpoint,
    store_result,
)
from loraops.contract.facts import SplitFacts
from loraops.contract.merge import merge_results, needs_whole_table
from loraops.contract.quarantine import Quarantine
from loraops.contract.table import example_frame
from loraops.results import QuarantineRecord

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


class SplitRun:
    """The GX validation of one split, fed batch by batch while the split is scanned."""

    def __init__(self, context: Any, data: DataConfig, split: str, tokenized: bool, report_dir: Path) -> None:
        self.context, self.data, self.split, self.tokenized = context, data, split, tokenized
        self.quarantine = Quarantine(split, data.contract.quarantine, report_dir)
        self.chunk_rows = data.contract.chunk_rows
        self.pending: list[pd.DataFrame] = []
        self.results: list[Any] = []
        self.key: Any = None
        self.checkpoint: Any = None
        self.aside: Any = None  # the checkpoint of the quarantine rules' expectations (None: no quarantine)
        self.entries: list[SuiteEntry] = []
        self.kept = 0

    def add(self, facts: SplitFacts) -> None:
        """Quarantine the rows scanned since the last call, queue the kept ones and validate full chunks."""
        import numpy as np

        frame = example_frame(facts, np.ones(facts.rows - facts.table_start, dtype=bool))
        facts.drop_table()
        if self.checkpoint is None:
            self._prepare(facts.format)
        if self.aside is not None:
            aside = self.quarantine.write(facts, self._broken(frame))
            if aside:
                frame = frame[~frame["line"].isin(aside)].reset_index(drop=True)
        self.kept += len(frame)
        self.pending.append(frame)
        while self.chunk_rows and sum(len(part) for part in self.pending) >= self.chunk_rows:
            self._validate(self.chunk_rows)

    def finish(self, facts: SplitFacts, fmt: str) -> tuple[Any, list[SuiteEntry], QuarantineRecord | None]:
        """Validate the rows left (or the empty table of an empty split); the merged result, stored for Data Docs."""
        import numpy as np

        if self.checkpoint is None:
            self._prepare(fmt)
        if not self.pending:
            self.pending = [example_frame(facts, np.zeros(0, dtype=bool))]
        if sum(len(part) for part in self.pending) or not self.results:
            self._validate(None)
        logger.info("%s: GX validated %d rows in %d chunk(s)", self.split, self.kept, len(self.results))
        result = merge_results(self.results)
        store_result(self.context, self.key, result)
        if self.aside is not None:  # a helper suite: not one of the contract's, so not in Data Docs
            self.context.suites.delete(self.aside.validation_definitions[0].suite.name)
        return result, self.entries, self.quarantine.record(facts)

    def _prepare(self, fmt: str) -> None:
        self.entries = load_suite(self.data, fmt, self.split, self.tokenized)
        self.checkpoint = add_checkpoint(self.context, fmt, self.split, self.entries)
        aside = [entry for entry in self.entries if entry.rule in self.quarantine.rules]
        if aside:
            self.aside = add_checkpoint(self.context, fmt, f"{self.split}_quarantine", aside, EVERY_ROW)
        whole = needs_whole_table(self.entries)
        if whole and self.chunk_rows:
            logger.warning(
                "%s: %s needs the whole column at once; validating the split in one piece (memory grows with rows)",
                self.split,
                whole,
            )
            self.chunk_rows = 0

    def _broken(self, frame: pd.DataFrame) -> dict[str, dict[int, Any]]:
        """Per quarantine rule, the rows of ``frame`` its expectation finds unexpected (line -> value)."""
        _, result = run_checkpoint(self.context, self.aside, self.split, frame, self._parameters())
        broken = {}
        for item in result.results:
            column = item.expectation_config.kwargs.get("column")
            found = (item.result or {}).get("unexpected_index_list") or []
            broken[item.expectation_config.meta["check"]] = {int(row["line"]): row.get(column) for row in found}
        return broken

    def _parameters(self) -> dict[str, Any]:
        return {"min_rows": getattr(self.data.contract.min_rows, self.split), "max_length": self.data.max_length}

    def _validate(self, rows: int | None) -> None:
        """Validate the first ``rows`` waiting rows (all of them for None); keep the rest waiting."""
        import pandas as pd

        waiting = pd.concat(self.pending, ignore_index=True) if len(self.pending) > 1 else self.pending[0]
        chunk = waiting if rows is None else waiting.iloc[:rows].reset_index(drop=True)
        self.pending = [] if rows is None else [waiting.iloc[rows:].reset_index(drop=True)]
        self.key, result = run_checkpoint(self.context, self.checkpoint, self.split, chunk, self._parameters())
        self.results.append(result)
