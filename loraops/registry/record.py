"""What one pipeline run produced (``RunRecord``), and its one-line summary for the run note and version."""

from __future__ import annotations

from dataclasses import dataclass

from loraops.names import INIT_FROM_TAG
from loraops.results import EvalMetrics, GateDecision, Lineage, SampleAnswer, TrainResult


@dataclass(frozen=True)
class RunRecord:
    """What one pipeline run produced, bundled so the logging helpers take one argument."""

    train: TrainResult
    baseline: EvalMetrics
    candidate: EvalMetrics
    decision: GateDecision
    lineage: Lineage
    samples: tuple[SampleAnswer, ...] = ()  # greedy answers of base and adapter for the model card
    adapter_key: str = ""  # loraops.registry.adapter_hash: what a version is keyed on


def summarize(record: RunRecord) -> str:
    """One-line human summary, used as run note and model version description."""
    lineage = record.lineage
    return (
        f"LoRA adapter on {lineage.base_model}: validation loss {record.candidate.loss:.3f} "
        f"(base {record.baseline.loss:.3f}) over {record.candidate.tokens} tokens; gate "
        f"{'passed' if record.decision.passed else 'failed'}; data {lineage.data_md5[:12]}, "
        f"git {lineage.git_commit[:12]}{' (dirty)' if lineage.git_dirty else ''}, params {lineage.params_hash}"
    )


def init_from_tags(record: RunRecord) -> dict[str, str]:
    """``loraops.init_from``: the version whose adapter training started from (train.init_from); none for a fresh one."""
    return {INIT_FROM_TAG: record.train.init_from} if record.train.init_from else {}
