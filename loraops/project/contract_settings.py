"""The ``data.contract`` section of params.yaml: the contract's rules, their severities and thresholds.

Its own module to keep config.py small; ``loraops.config`` re-exports every name here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` would pass `gt=0` checks; every number must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Severity = Literal["fail", "warn"]
# Row rules of the data contract; their names are the keys of ``data.contract`` and the kinds of
# rows that ``data.contract.quarantine`` can set aside instead of failing on.
RowRule = Literal[
    "required_fields",
    "empty_content",
    "roles",
    "ends_with_assistant",
    "encoding",
    "tokenizes",
    "over_length",
    "duplicates",
    "train_overlap",
    "secrets",
    "emails",
]


class RuleConfig(Section):
    """One contract rule: it breaks when more than ``max_share`` of a split's rows break it."""

    severity: Severity = Field("fail", description="fail stops the pipeline; warn only reports")
    max_share: float = Field(0.0, ge=0, lt=1, description="Share of rows allowed to break the rule")


class DuplicatesConfig(RuleConfig):
    normalized: bool = Field(True, description="Also count rows equal after casefolding and collapsing whitespace")


class MinRowsConfig(Section):
    severity: Severity = Field("fail", description="fail stops the pipeline; warn only reports")
    train: int = Field(1, ge=1, description="Rows the train split must keep (after quarantine)")
    validation: int = Field(1, ge=1, description="Rows the validation split must keep (after quarantine)")


class ContractConfig(Section):
    """Thresholds and severities of the data contract (``data.contract.*``)."""

    min_rows: MinRowsConfig = Field(MinRowsConfig(), description="Rows each split must keep")
    required_fields: RuleConfig = Field(RuleConfig(), description="Rows missing the fields of their format")
    empty_content: RuleConfig = Field(RuleConfig(), description="Turns or fields that are empty or whitespace")
    roles: RuleConfig = Field(
        RuleConfig(), description="Chat turns out of order (system first, user/assistant alternating)"
    )
    ends_with_assistant: RuleConfig = Field(
        RuleConfig(), description="Chat rows whose last turn is not the assistant's"
    )
    encoding: RuleConfig = Field(RuleConfig(), description="Invalid UTF-8 or control characters")
    tokenizes: RuleConfig = Field(RuleConfig(), description="The chat template renders the row")
    over_length: RuleConfig = Field(RuleConfig(), description="max_share: share of rows truncated at data.max_length")
    duplicates: DuplicatesConfig = Field(DuplicatesConfig(), description="Repeated examples within a split")
    train_overlap: RuleConfig = Field(RuleConfig(), description="Validation rows sharing a question/answer with train")
    secrets: RuleConfig = Field(RuleConfig(), description="API keys, access tokens, private key blocks")
    emails: RuleConfig = Field(RuleConfig(severity="warn"), description="E-mail addresses (personal data)")
    quarantine: list[RowRule] = Field(
        [], description="Rules whose failing rows are set aside (reports_dir/quarantine/) instead of failing"
    )
    chunk_mb: float = Field(32.0, gt=0, description="Files are read and scanned in chunks of this size")
    chunk_rows: int = Field(200_000, ge=0, description="Rows GX validates at a time, results merged (0: all)")
    gx_dir: str = Field(
        "gx",
        description="The GX file context holding the suites (expectations/chat.json, alpaca.json, text.json); "
        "thresholds and severities of the built-in rules stay here in data.contract",
    )

    @model_validator(mode="after")
    def _check_quarantine(self) -> ContractConfig:
        repeated = sorted({kind for kind in self.quarantine if self.quarantine.count(kind) > 1})
        if repeated:
            raise ValueError(f"data.contract.quarantine lists {repeated} more than once: list each rule once")
        return self

    def rule(self, name: str) -> RuleConfig:
        return getattr(self, name)
