"""Custom GX expectations for the rules GX has none for: chat role order, the assistant's last turn, leakage.

Written the way GX documents custom expectations (a ``ColumnMapMetricProvider`` with a pandas
condition plus a ``ColumnMapExpectation`` naming its metric), so they load from a suite file by
their ``type``, take ``mostly`` like any map expectation and appear in Data Docs with their
unexpected values. Importing this module registers them; ``context.py`` does before loading suites.
"""

from __future__ import annotations

import logging

logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before the import: it logs ~150 INFO lines

from great_expectations.execution_engine import PandasExecutionEngine  # noqa: E402
from great_expectations.expectations.expectation import ColumnMapExpectation  # noqa: E402
from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial  # noqa: E402

from loraops.contract.table import LAST_ROLE, ROLE_ORDER  # noqa: E402


class ColumnValuesFollowChatRoleOrder(ColumnMapMetricProvider):
    condition_metric_name = "column_values.follow_chat_role_order"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column, **kwargs):
        return column.astype(str).str.contains(ROLE_ORDER, regex=True)


class ExpectColumnValuesToFollowChatRoleOrder(ColumnMapExpectation):
    """Roles (comma-separated) are an optional leading system turn, then user and assistant alternating from user."""

    map_metric = "column_values.follow_chat_role_order"
    success_keys = ("mostly",)


class ColumnValuesEndWithAssistantTurn(ColumnMapMetricProvider):
    condition_metric_name = "column_values.end_with_assistant_turn"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column, **kwargs):
        return column.astype(str).str.contains(LAST_ROLE, regex=True)


class ExpectColumnValuesToEndWithAssistantTurn(ColumnMapExpectation):
    """The last role is the assistant's: every conversation ends with the answer it trains on."""

    map_metric = "column_values.end_with_assistant_turn"
    success_keys = ("mostly",)


class ColumnValuesNotInTrain(ColumnMapMetricProvider):
    condition_metric_name = "column_values.not_in_train"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column, **kwargs):
        return column == 0


class ExpectValidationRowsToNotOccurInTrain(ColumnMapExpectation):
    """No validation row shares its question, an answer or the whole example with train.

    The column holds the train line that shares it (0: none), found by a 64-bit key lookup over
    the whole train split while streaming; the unexpected values are those train lines.
    """

    map_metric = "column_values.not_in_train"
    success_keys = ("mostly",)


CUSTOM = (
    ExpectColumnValuesToFollowChatRoleOrder,
    ExpectColumnValuesToEndWithAssistantTurn,
    ExpectValidationRowsToNotOccurInTrain,
)
