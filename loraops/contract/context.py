"""The GX file context in ``gx/``: one suite per data format, run through a checkpoint per split.

The suites (``gx/expectations/{chat,alpaca,text}.json``) are read with GX's own API from the
file context. Each entry with ``meta.rule`` is one of loraops' built-in rules: its threshold
(``mostly``) and severity come from ``data.contract.<rule>`` in params.yaml, so the suite file must
not set them. Any other entry is the user's: it keeps its own ``mostly`` and ``severity``
(``critical`` fails the contract, ``warning``/``info`` only report). The run itself happens in an
ephemeral context whose Data Docs site is ``<reports_dir>/data_docs``, so validating never writes
into ``gx/``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.config import DataConfig
from loraops.data.formats import DataError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

REPO_GX_DIR = Path(__file__).resolve().parents[2] / "gx"
BUILT_IN = (
    "min_rows", "required_fields", "empty_content", "roles", "ends_with_assistant", "encoding", "tokenizes",
    "over_length", "duplicates", "train_overlap", "secrets", "emails",
)  # fmt: skip
TOKEN_RULES = ("tokenizes", "over_length")
DOCS_VALUE_CHARS = 160
RESULT_FORMAT = {
    "result_format": "SUMMARY",
    "unexpected_index_column_names": ["file", "line"],
    "partial_unexpected_count": 20,
    "return_unexpected_index_query": False,  # a pandas filter string over every unexpected row; unused, and it
}  # makes GX copy the whole table once more per expectation
EVERY_ROW = {  # the quarantine's rows
    "result_format": "COMPLETE",
    "unexpected_index_column_names": ["line"],
    "return_unexpected_index_query": False,
}


@dataclass(frozen=True)
class SuiteEntry:
    """One expectation of a suite, with the loraops rule it implements (None: added by the user)."""

    expectation: Any  # a gx Expectation
    rule: str | None
    severity: str  # fail | warn
    threshold: str


def for_project(data: DataConfig, root: Path) -> DataConfig:
    """``data`` with a relative ``data.contract.gx_dir`` resolved against the project root, when it is there."""
    configured = Path(data.contract.gx_dir)
    if configured.is_absolute() or not (root / configured / "great_expectations.yml").is_file():
        return data
    contract = data.contract.model_copy(update={"gx_dir": str(root / configured)})
    return data.model_copy(update={"contract": contract})


def gx_dir(data: DataConfig) -> Path:
    """``data.contract.gx_dir`` (relative to the working directory), else the suites shipped with loraops."""
    configured = Path(data.contract.gx_dir)
    if (configured / "great_expectations.yml").is_file():
        return configured
    if configured != Path("gx"):
        raise DataError(
            f"data.contract.gx_dir: {configured} has no great_expectations.yml; point it at a GX file context"
        )
    return REPO_GX_DIR


def load_suite(data: DataConfig, fmt: str, split: str, tokenized: bool) -> list[SuiteEntry]:
    """The suite for ``fmt`` as it applies to ``split``, with the thresholds of params.yaml filled in."""
    import great_expectations as gx

    import loraops.contract.expectations  # noqa: F401  registers the custom expectations

    root = gx_dir(data)
    path = root / "expectations" / f"{fmt}.json"
    raw = _check_file(path)
    _quiet_gx_logging()
    suite_logger = logging.getLogger("great_expectations.core.expectation_suite")
    suite_logger.disabled = True  # it logs a traceback per entry it drops; the entry is named below instead
    try:
        suite = gx.get_context(mode="file", project_root_dir=str(root.parent)).suites.get(fmt)
    except Exception as error:  # GX raises its own errors for a malformed suite
        _refuse_bad_entry(path, raw)
        raise DataError(f"{path}: GX cannot load this suite: {error}") from None
    finally:
        suite_logger.disabled = False
    if len(suite.expectations) != len(raw):
        _refuse_bad_entry(path, raw)
        raise DataError(f"{path}: GX loaded fewer expectations than the file lists; check each entry's type and kwargs")
    entries = []
    for expectation in suite.expectations:
        rule = (expectation.meta or {}).get("rule")
        if rule == "train_overlap" and split != "validation" or rule in TOKEN_RULES and not tokenized:
            continue
        entries.append(_entry(expectation, rule, data, split))
    return entries


def _refuse_bad_entry(path: Path, raw: list[dict[str, Any]]) -> None:
    """Name the first entry GX cannot build (GX drops an unknown type with only a log line)."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    for number, entry in enumerate(raw, start=1):
        try:
            ExpectationConfiguration(**{key: value for key, value in entry.items() if key != "id"}).to_domain_obj()
        except Exception as error:
            raise DataError(
                f"{path}: expectation {number} ({entry.get('type')}): GX cannot load it: {error}; "
                "fix its type or kwargs (see the GX expectation gallery) or remove it"
            ) from None


def _check_file(path: Path) -> list[dict[str, Any]]:
    """Built-in entries take their threshold and severity from params.yaml: refuse them in the suite file."""
    if not path.is_file():
        raise DataError(f"{path}: no such suite; the GX context needs chat.json, alpaca.json and text.json")
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("expectations", [])
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError("'expectations' must be a list of objects")
    except (ValueError, AttributeError) as error:
        raise DataError(f"{path}: not a GX suite file ({error})") from None
    for entry in entries:
        rule = (entry.get("meta") or {}).get("rule")
        if rule is None:
            continue
        if rule not in BUILT_IN:
            raise DataError(f"{path}: meta.rule {rule!r} is not a loraops rule ({', '.join(BUILT_IN)}); drop meta.rule")
        if "mostly" in entry.get("kwargs", {}) or "severity" in entry:
            raise DataError(
                f"{path}: the {rule} expectation sets mostly/severity; set data.contract.{rule}.max_share and "
                f".severity in params.yaml instead (built-in rules take them from there)"
            )
    return entries


def _entry(expectation: Any, rule: str | None, data: DataConfig, split: str) -> SuiteEntry:
    if rule is None:
        level = getattr(expectation.severity, "value", expectation.severity)  # GX: critical | warning | info
        severity = "fail" if str(level) == "critical" else "warn"
        return SuiteEntry(expectation, None, severity, expectation.description or _signature(expectation))
    contract = data.contract
    if rule == "min_rows":
        minimum = getattr(contract.min_rows, split)
        return SuiteEntry(expectation, rule, contract.min_rows.severity, f">= {minimum} row{'s' * (minimum != 1)}")
    settings = contract.rule(rule)
    expectation.mostly = 1 - settings.max_share
    threshold = _share_text(settings.max_share)
    if rule == "over_length":
        threshold = f"n_tokens <= {data.max_length}; truncated: {threshold}"
    return SuiteEntry(expectation, rule, settings.severity, threshold)


def _signature(expectation: Any) -> str:
    kwargs = expectation.configuration.kwargs
    shown = ", ".join(
        f"{key}={value!r}" for key, value in kwargs.items() if key not in ("result_format", "catch_exceptions")
    )
    return f"{expectation.expectation_type}({shown})"


def _share_text(max_share: float) -> str:
    return "no rows" if max_share == 0 else f"at most {max_share:.1%} of rows"


def entry_name(entry: SuiteEntry) -> str:
    """The name a check is reported under: the rule, or the user's ``meta.name``, or type and column."""
    if entry.rule:
        return entry.rule
    meta = entry.expectation.meta or {}
    column = entry.expectation.configuration.kwargs.get("column")
    return str(meta.get("name") or f"{entry.expectation.expectation_type}" + (f"({column})" if column else ""))


def run_context(docs_dir: Path) -> Any:
    """An ephemeral GX context whose one Data Docs site is ``docs_dir``, emptied for this run."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before the import: it logs ~150 INFO lines
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_gx_logging()
    _skip_batch_fingerprint()
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


def _skip_batch_fingerprint() -> None:
    """Turn off GX's ``pandas_data_fingerprint`` batch marker, which GX already skips for frames over 1 GB.

    It is metadata only (md5 of ``pandas.util.hash_pandas_object`` over every cell, nothing reads
    it back) and costed a third of the contract's time, since pandas hashes the text columns as
    Python strings. The report names the data by file and line instead.
    """
    from great_expectations.execution_engine import pandas_execution_engine

    if hasattr(pandas_execution_engine, "HASH_THRESHOLD"):
        pandas_execution_engine.HASH_THRESHOLD = 0


def _quiet_gx_logging() -> None:
    """GX pins some module loggers at INFO (e.g. one line per context); keep warnings only."""
    for name in list(logging.root.manager.loggerDict):
        if name == "great_expectations" or name.startswith("great_expectations."):
            logging.getLogger(name).setLevel(logging.WARNING)


def add_checkpoint(
    context: Any, fmt: str, split: str, entries: list[SuiteEntry], result_format: dict[str, Any] = RESULT_FORMAT
) -> Any:
    """The split's checkpoint: ``entries`` as one suite over a pandas frame asset (SUMMARY results by default)."""
    import great_expectations as gx

    name = f"{fmt}_{split}"
    batch = context.data_sources.add_pandas(name).add_dataframe_asset("examples")
    definition = batch.add_batch_definition_whole_dataframe("whole_table")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for entry in entries:
        config = entry.expectation.configuration
        config.meta = {**(config.meta or {}), "check": entry_name(entry)}
        suite.add_expectation(config.to_domain_obj())
    validation = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=definition, suite=suite))
    return context.checkpoints.add(
        gx.Checkpoint(name=name, validation_definitions=[validation], result_format=result_format)
    )


def run_checkpoint(
    context: Any, checkpoint: Any, split: str, frame: pd.DataFrame, parameters: dict[str, Any]
) -> tuple[Any, Any]:
    """Validate ``frame`` (a chunk of the split's table): the result's store key and the suite's result.

    GX stores every run's result; a chunk's is taken out again, so Data Docs show only the merged
    result of the split (``store_result``).
    """
    from great_expectations.core.run_identifier import RunIdentifier

    result = checkpoint.run(
        batch_parameters={"dataframe": frame}, expectation_parameters=parameters, run_id=RunIdentifier(run_name=split)
    )
    key, suite_result = next(iter(result.run_results.items()))
    if context.validation_results_store.has_key(key):
        context.validation_results_store.remove_key(key)
    return key, suite_result


def store_result(context: Any, key: Any, suite_result: Any) -> None:
    """Keep the split's (merged) result for Data Docs, with file and line next to the unexpected values."""
    _show_lines_in_docs(suite_result)
    context.validation_results_store.set(key, suite_result)


def _show_lines_in_docs(suite_result: Any) -> None:
    """Data Docs list file and line next to unexpected values only for an ``unexpected_index_list``.

    COMPLETE would compute it over every unexpected row; the first 20 (SUMMARY's partial list) are
    enough to read, so they are shown under that name, values cut to DOCS_VALUE_CHARS.
    """
    for item in suite_result.results:
        result = item.result or {}
        partial = result.get("partial_unexpected_index_list")
        if not partial:
            continue
        # GX matches listed rows to counted values: cut both the same way
        result.setdefault("unexpected_index_column_names", RESULT_FORMAT["unexpected_index_column_names"])
        result["unexpected_index_list"] = [{key: _cut(value) for key, value in row.items()} for row in partial]
        result["partial_unexpected_list"] = [_cut(value) for value in result.get("partial_unexpected_list", [])]
        result["partial_unexpected_counts"] = [
            {**count, "value": _cut(count.get("value"))} for count in result.get("partial_unexpected_counts", [])
        ]


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > DOCS_VALUE_CHARS:
        return value[: DOCS_VALUE_CHARS - 1] + "…"
    return value
