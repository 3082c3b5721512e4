"""Merging the GX results of a split's chunks into one result, as if GX had validated the whole table.

Map expectations (one verdict per row, e.g. regexes, nulls, value bounds, the custom role rules)
merge exactly: their counts are summed, the unexpected examples (with file and line) are joined
up to the 20 GX keeps, and the expectation's own ``_validate`` decides success again from the summed
counts and its ``mostly``. Table metrics that combine across chunks merge the same way (row count
and column sum: added; column max and min: the max and min over chunks). Expectations about the
table's shape (columns and their types) see the same columns in every chunk: the first failing
chunk's result stands. Anything else (unique or increasing values, means, quantiles, distinct
values ...) needs the whole column at once, so a suite holding one is validated in one piece
(``needs_whole_table``). Duplicates and leakage are never decided per chunk: their columns come
from keys over the whole file (``keys.Duplicates``, ``keys.TrainIndex``).
"""

from __future__ import annotations

from typing import Any

from loraops.contract.context import RESULT_FORMAT, SuiteEntry, entry_name

ACROSS_ROWS = {
    "expect_column_values_to_be_unique",
    "expect_compound_columns_to_be_unique",
    "expect_multicolumn_values_to_be_unique",
    "expect_column_values_to_be_increasing",
    "expect_column_values_to_be_decreasing",
}
AGGREGATES = {
    "expect_table_row_count_to_be_between": ("table.row_count", sum),
    "expect_table_row_count_to_equal": ("table.row_count", sum),
    "expect_column_sum_to_be_between": ("column.sum", sum),
    "expect_column_max_to_be_between": ("column.max", max),
    "expect_column_min_to_be_between": ("column.min", min),
}
SHAPE = {
    "expect_column_to_exist",
    "expect_table_columns_to_match_set",
    "expect_table_columns_to_match_ordered_list",
    "expect_table_column_count_to_equal",
    "expect_table_column_count_to_be_between",
    "expect_column_values_to_be_of_type",
    "expect_column_values_to_be_in_type_list",
}


def needs_whole_table(entries: list[SuiteEntry]) -> str | None:
    """The first expectation whose chunk results cannot be merged (None: the suite can run in chunks)."""
    from great_expectations.expectations.expectation import ColumnMapExpectation

    for entry in entries:
        kind = entry.expectation.expectation_type
        if kind in AGGREGATES or kind in SHAPE:
            continue
        if isinstance(entry.expectation, ColumnMapExpectation) and kind not in ACROSS_ROWS:
            continue
        return entry_name(entry)
    return None


def merge_results(results: list[Any]) -> Any:
    """One suite result from the chunks' results (the same suite, in the same order)."""
    if len(results) == 1:
        return results[0]
    merged = results[0]
    merged.results = [_merge([result.results[index] for result in results]) for index in range(len(merged.results))]
    passed = sum(1 for item in merged.results if item.success)
    merged.success = passed == len(merged.results)
    merged.statistics = {
        "evaluated_expectations": len(merged.results),
        "successful_expectations": passed,
        "unsuccessful_expectations": len(merged.results) - passed,
        "success_percent": passed / len(merged.results) * 100 if merged.results else None,
    }
    return merged


def _merge(items: list[Any]) -> Any:
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult

    first = items[0]
    raised = [item for item in items if _raised(item)]
    if raised:
        return raised[0]
    kind = first.expectation_config.type
    expectation = first.expectation_config.to_domain_obj()
    if kind in SHAPE:
        return next((item for item in items if not item.success), first)
    if kind in AGGREGATES:
        metric, combine = AGGREGATES[kind]
        observed = [item.result.get("observed_value") for item in items]
        observed = [value for value in observed if value is not None]
        if not observed:
            return first
        outcome = expectation._validate({metric: combine(observed)}, {"result_format": RESULT_FORMAT})
    else:
        outcome = expectation._validate(_map_metrics(expectation.map_metric, items), {"result_format": RESULT_FORMAT})
    outcome = outcome.to_json_dict() if hasattr(outcome, "to_json_dict") else outcome
    return ExpectationValidationResult(
        success=bool(outcome["success"]),
        expectation_config=first.expectation_config,
        result=outcome.get("result", {}),
        meta=first.meta,
        exception_info=first.exception_info,
    )


def _map_metrics(metric: str, items: list[Any]) -> dict[str, Any]:
    """The metrics a map expectation's ``_validate`` reads, summed or joined over the chunks."""
    keep = RESULT_FORMAT["partial_unexpected_count"]
    results = [item.result or {} for item in items]
    values = [value for result in results for value in result.get("partial_unexpected_list", [])][:keep]
    where = [index for result in results for index in result.get("partial_unexpected_index_list", [])][:keep]
    return {
        "table.row_count": sum(result.get("element_count", 0) for result in results),
        "column_values.nonnull.unexpected_count": sum(result.get("missing_count") or 0 for result in results),
        f"{metric}.unexpected_count": sum(result.get("unexpected_count") or 0 for result in results),
        f"{metric}.unexpected_values": values,
        f"{metric}.unexpected_index_list": where,
    }


def _raised(item: Any) -> bool:
    info = item.exception_info or {}
    return any(isinstance(value, dict) and value.get("raised_exception") for value in [info, *info.values()])
