"""The data contract: Great Expectations suites over a per-example table of each split.

Each split is streamed in Arrow batches (``data.batches.read_batches``, on the reader training uses) into a table with one row per
example (``table.py``: ``prompt``, ``completion``, ``text``, ``roles``, ``n_tokens``, ...). The
suites in the GX file context ``gx/`` (one per data format) check that table through a
checkpoint, ``data.contract.chunk_rows`` rows at a time with the results merged (``chunks.py``,
``merge.py``): native expectations (regexes, nulls, value bounds, row counts) and custom ones for
the rules GX has none for (``expectations.py``). Vectorised per-row facts (``scan.py``) explain
the failing rows with file and line; duplicates and leakage come from 64-bit keys over the whole
file (``keys.py``); the quarantine sets aside the rows the suite's own expectations find
unexpected. Problems are collected, not raised one by one, so a user fixes a whole file in one pass.

Rows of the rules listed in ``data.contract.quarantine`` are written to
``<reports_dir>/quarantine/<split>.jsonl`` and left out of the validated data; ``stages`` drops
the same lines before tokenising (``quarantined_lines``).
"""

from loraops.contract.context import for_project
from loraops.contract.facts import SplitFacts, Turns
from loraops.contract.keys import TrainIndex, mark_duplicates, normalized_hashes
from loraops.contract.patterns import SECRET_PATTERNS
from loraops.contract.quarantine import quarantined_lines
from loraops.contract.report import DataContractError, format_report
from loraops.contract.scan import role_problem, scan_split
from loraops.contract.validate import validate_dataset

__all__ = [
    "SECRET_PATTERNS", "DataContractError", "SplitFacts", "TrainIndex",
    "Turns", "for_project", "format_report", "mark_duplicates", "normalized_hashes",
    "quarantined_lines", "role_problem", "scan_split", "validate_dataset",
]  # fmt: skip
