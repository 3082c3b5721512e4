"""Typed results that stages hand to each other (and that Prefect shows as task results)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel


def write_metrics(values: dict[str, float | int | None], path: str | Path) -> Path:
    """A metrics file for ``dvc metrics``/``dvc exp show``: numbers only (flags as 0/1, unknown values left out)."""
    numbers = {
        key: int(value) if isinstance(value, bool) else value for key, value in values.items() if value is not None
    }
    bad = [key for key, value in numbers.items() if not isinstance(value, int | float)]
    if bad:
        raise TypeError(f"metrics file {path}: {', '.join(bad)} are not numbers; keep strings and paths out of metrics")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    return path


class _Result(BaseModel):
    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read_json(cls, path: str | Path):
        return cls.model_validate_json(Path(path).read_text())


class BaseModelRef(_Result):
    """Where the base model can be loaded from: a local folder or a hub id."""

    source: str  # what the user asked for (model.base)
    path: str  # what from_pretrained receives
    revision: str | None = None


class ContractCheck(_Result):
    expectation: str  # e.g. "no_empty_content"
    split: str  # "train" | "validation"
    passed: bool
    severity: str = "fail"  # "fail" | "warn"
    observed: str = ""
    threshold: str = ""
    examples: list[str] = []  # "data/train.jsonl:12: <why>"
    hint: str = ""  # what to do when the check fails
    checked: bool = True  # False: not run (e.g. train/validation leakage without a validation file); passed is False


class QuarantineRecord(_Result):
    """Rows of one split the contract set aside (``data.contract.quarantine``); training drops them."""

    split: str
    source: str  # the data file
    source_md5: str  # of the data file the quarantine was computed on
    path: str  # JSONL: one {"line", "rules", "reasons"} per quarantined row
    rows: int
    by_rule: dict[str, int] = {}


class ContractReport(_Result):
    passed: bool
    checks: list[ContractCheck]
    train_rows: int  # rows read, quarantined ones included
    validation_rows: int | None  # None: a train file validated on its own (`loraops validate FILE`)
    format: str
    report_path: str | None = None
    quarantine: dict[str, QuarantineRecord] = {}  # by split; empty when data.contract.quarantine is off
    data_docs: str | None = None  # index.html of the GX Data Docs built for this run

    def failures(self) -> list[ContractCheck]:
        return [check for check in self.checks if not check.passed and check.severity == "fail" and check.checked]


class EvalMetrics(_Result):
    loss: float  # token-weighted mean NLL over target tokens
    perplexity: float
    tokens: int
    examples: int
    general_loss: float | None = None  # plain-text loss on the general set (forgetting check); None: not measured

    def write_json(self, path: str | Path) -> Path:
        """A DVC metrics file: numbers only, an unmeasured general loss left out."""
        return write_metrics(self.model_dump(), path)

    @classmethod
    def from_totals(cls, total_nll: float, tokens: int, examples: int) -> EvalMetrics:
        loss = total_nll / max(tokens, 1)
        return cls(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens, examples=examples)


class ExampleLosses(_Result):
    """Per-example summed NLL and target tokens, in validation-file order (not a DVC metric: lists)."""

    nll: list[float]
    tokens: list[int]


class TrainResult(_Result):
    adapter_dir: str
    trainable_params: int
    total_params: int
    steps: int
    best_step: int | None
    best_eval_loss: float | None
    stopped_early: bool
    history_path: str  # JSON list of {"step", "loss"|"eval_loss", ...} from the trainer
    resumed_from_step: int | None = None  # the checkpoint an interrupted run continued from
    mlflow_run_id: str | None = None  # the MLflow run opened as training started; later stages log into it
    init_from: str | None = None  # NAME/VERSION whose adapter the training started from (train.init_from)

    def metrics(self) -> dict[str, float | int | None]:
        """What ``metrics/train.json`` holds: the numbers, not the paths (they'd differ between clones) nor the run id."""
        return self.model_dump(exclude={"adapter_dir", "history_path", "mlflow_run_id", "init_from"})

    @classmethod
    def from_metrics(cls, path: str | Path, adapter_dir: str | Path, history_path: str | Path) -> TrainResult:
        """Read ``metrics/train.json`` back; the paths come from the config, as the stage wrote them."""
        values = json.loads(Path(path).read_text())
        return cls.model_validate({**values, "adapter_dir": str(adapter_dir), "history_path": str(history_path)})


class InitAdapterRecord(_Result):
    """The adapter training starts from (``train.init_from``), by version and content: a DVC dep of train_adapter.

    The resolve_init_adapter stage (``always_changed``: it asks the registry on every ``dvc repro``) and the
    training stage write it; only a change of its content (another champion, other files) retrains.
    """

    init_from: str | None = None  # "champion", or None: a fresh adapter
    model_name: str | None = None
    version: str | None = None
    adapter_sha256: dict[str, str] | None = None  # file -> sha256 of the adapter files training starts from

    @property
    def label(self) -> str | None:
        return f"{self.model_name}/{self.version}" if self.version else None


class ChampionRef(_Result):
    version: str
    loss: float | None  # validation loss recorded at registration
    data_md5: str | None
    base_model: str | None
    adapter_uri: str | None


class GateDecision(_Result):
    passed: bool
    reasons: list[str]
    baseline_loss: float
    candidate_loss: float
    champion_loss: float | None = None
    champion_version: str | None = None
    evidence: dict[
        str, float
    ] = {}  # evaluate.gate.GateEvidence.numbers(): intervals, general-text losses, answer scores

    def metrics(self) -> dict[str, float | int | None]:
        """What ``metrics/gate.json`` holds (``passed`` 0/1); the reasons stay in the MLflow run and Prefect."""
        version = self.champion_version
        return {
            "passed": int(self.passed),
            "baseline_loss": self.baseline_loss,
            "candidate_loss": self.candidate_loss,
            "champion_loss": self.champion_loss,
            "champion_version": int(version) if version and version.isdigit() else None,
            **self.evidence,
        }


class Lineage(_Result):
    git_commit: str
    git_dirty: bool
    data_md5: str
    dvc_lock_md5: str
    params_hash: str
    base_model: str
    base_revision: str | None = None
    data_source: str | None = None  # the data registry (URL:path@commit) or URL data.dvc imports; None: `dvc add`
    dvc_experiment: str | None = None  # the run's DVC experiment: `dvc exp apply NAME` restores it
    dvc_experiment_rev: str | None = None  # that experiment's git commit

    def as_tags(self) -> dict[str, str]:
        return {f"loraops.{key}": "" if value is None else str(value) for key, value in self.model_dump().items()}


class Registration(_Result):
    run_id: str
    model_name: str
    version: str | None  # None when the gate failed: the run is logged, nothing is registered
    aliases: list[str] = []


@dataclass(frozen=True)
class SampleAnswer:
    """Greedy answers of the base model and the adapter to one validation prompt (the model card's samples)."""

    prompt: str
    base_answer: str
    adapter_answer: str
