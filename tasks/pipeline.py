"""The retrain pipeline's tasks. The work lives in loraops.stages; tasks add retries and artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraops import stages
from loraops.cli import reporting
from loraops.config import LoraopsConfig
from loraops.inputs.data_diff import DataDiff
from loraops.inputs.freshness import Freshness
from loraops.lineage.versioning import DataVersion
from loraops.registry import handoff, tracking
from loraops.results import (
    BaseModelRef,
    ContractReport,
    EvalMetrics,
    GateDecision,
    InitAdapterRecord,
    Lineage,
    Registration,
    TrainResult,
)
from loraops.train.plan import MemoryCheck

# Stages read and write the project's files, so Prefect's input-hash caching would hide reruns.
_stage = dict(cache_policy=NO_CACHE, persist_result=False)

# Stages that talk to the MLflow server or the DVC remote: retry transient failures, with jitter so
# runs that failed together (a server restart) do not all retry at the same second.
# Not retried: a tracking server that stopped answering (the run fails within registry.timeout_s), and
# changed or corrupt adapter files (a champion, the workspace adapter), which stay so on a retry.


def _worth_retrying_network(task, task_run, state) -> bool:
    from loraops.registry.integrity import AdapterIntegrityError
    from loraops.registry.limits import TrackingServerLostError

    return not isinstance(_error_of(state), (TrackingServerLostError, AdapterIntegrityError))


def _error_of(state) -> BaseException | None:
    return state.data if isinstance(state.data, BaseException) else getattr(state.data, "result", None)


_network = dict(
    retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5, retry_condition_fn=_worth_retrying_network
)


@task(name="record-run-config", **_stage)
def record_run_config(cfg: LoraopsConfig, root: Path) -> bool:
    return stages.record_run_config(cfg, root)


@task(name="check-servers", retries=2, retry_delay_seconds=[5, 30], **_stage)
def check_servers(cfg: LoraopsConfig, root: Path) -> str:
    return stages.check_servers(cfg, root)


@task(name="refresh-data", retries=0, **_stage)
def refresh_data(cfg: LoraopsConfig, root: Path, data_rev: str | None = None) -> DataVersion:
    """Never retried: a revision that does not exist will not exist on a retry."""
    data = stages.refresh_data(cfg, root, data_rev)
    create_markdown_artifact(
        f"Training data: {data.describe()}{' (updated)' if data.updated else ''}", key="data-version"
    )
    return data


@task(name="check-freshness", **_stage)
def check_freshness(cfg: LoraopsConfig, root: Path, force: bool = False) -> Freshness:
    freshness = stages.check_freshness(cfg, root, force)
    create_markdown_artifact(freshness.message, key="freshness")
    return freshness


@task(name="diff-data", **_stage)
def diff_data(cfg: LoraopsConfig, root: Path) -> DataDiff:
    diff = stages.diff_data(cfg, root)
    create_markdown_artifact(diff.markdown(), key="data-diff")
    return diff


@task(name="resolve-init-adapter", retries=0, **_stage)
def resolve_init_adapter(cfg: LoraopsConfig, root: Path) -> InitAdapterRecord:
    """Never retried: a champion of another shape or base stays so on a retry."""
    return stages.resolve_init_adapter(cfg, root)


@task(name="prepare-base-model", retries=1, **_stage)
def prepare_base_model(cfg: LoraopsConfig, root: Path) -> BaseModelRef:
    return stages.prepare_base_model(cfg, root)


@task(name="validate-dataset", retries=0, **_stage)
def validate_dataset(cfg: LoraopsConfig, root: Path) -> ContractReport:
    """Never retried: bad data stays bad."""
    from loraops.contract import DataContractError

    try:
        report = stages.validate_dataset(cfg, root)
    except DataContractError as error:
        create_markdown_artifact(reporting.contract_markdown(error.report), key="data-contract")
        raise
    create_markdown_artifact(reporting.contract_markdown(report), key="data-contract")
    return report


@task(name="check-memory", retries=0, **_stage)
def check_memory(cfg: LoraopsConfig, root: Path) -> MemoryCheck:
    """Never retried: settings that do not fit will not fit on a retry."""
    return stages.check_memory(cfg, root)


@task(name="evaluate-baseline", **_stage)
def evaluate_baseline(cfg: LoraopsConfig, root: Path) -> EvalMetrics:
    return stages.evaluate_baseline(cfg, root)


@task(name="sanity-check", retries=0, **_stage)
def sanity_check(cfg: LoraopsConfig, root: Path):
    """train.sanity_check: refuse to spend the full run on a setup that cannot overfit a few examples."""
    from loraops.train.sanity import SanityCheckFailed

    result = stages.sanity_check(cfg, root)
    create_markdown_artifact("# Sanity check\n\n```\n" + result.summary() + "\n```", key="sanity-check")
    if not result.passed:
        raise SanityCheckFailed(result.summary())
    return result


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a crashed or failed training (it resumes from its last checkpoint), not a bad config, a NaN or a
    tracking server that stopped answering (the run fails within registry.timeout_s)."""
    from loraops.config import ConfigError
    from loraops.registry.limits import TrackingServerLostError
    from loraops.train.trainer import TrainingDivergedError

    return not isinstance(_error_of(state), (ConfigError, TrainingDivergedError, TrackingServerLostError))


@task(name="train-adapter", retries=1, retry_delay_seconds=10, retry_condition_fn=_worth_retrying, **_stage)
def train_adapter(cfg: LoraopsConfig, root: Path, run_tags: dict[str, str] | None = None) -> TrainResult:
    """A retry continues from the last checkpoint (optimizer, scheduler and RNG state restored)."""
    trained = stages.train_adapter(cfg, root, run_tags=run_tags)
    create_markdown_artifact(reporting.training_markdown(trained, trained.adapter_dir), key="training")
    if trained.mlflow_run_id:
        create_markdown_artifact(tracking.run_markdown(cfg, root, trained.mlflow_run_id), key="mlflow-run")
    return trained


@task(name="train-on-worker", **_stage)
def train_on_deployment(cfg: LoraopsConfig, root: Path) -> TrainResult:
    """Run training as its own deployment (a GPU work pool), wait for it, and fetch its adapter.

    Not retried here: the training run retries itself, and rerunning this flow run starts a new
    training run that resumes from the worker's last checkpoint.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    deployment = cfg.orchestration.train_deployment
    outgoing = handoff.prepare_handoff(cfg, root)
    try:
        child = run_deployment(
            deployment,
            parameters=handoff.handoff_parameters(outgoing),
            timeout=cfg.orchestration.train_timeout_s,
        )
    except ObjectNotFound:
        raise handoff.HandoffError(
            f"deployment '{deployment}' (orchestration.train_deployment) is not on the Prefect server: deploy it "
            "with `make deploy`, or empty orchestration.train_deployment to train inside this run"
        ) from None
    if not child.state or not child.state.is_completed():
        state = child.state
        raise handoff.HandoffError(
            handoff.describe_unfinished(
                deployment,
                state.name if state else "unknown",
                state.message if state else None,
                cfg.orchestration.train_timeout_s,
            )
        )
    return handoff.fetch_training(cfg, root, outgoing.train_key)


@task(name="receive-training-inputs", retries=2, retry_delay_seconds=[5, 30], **_stage)
def receive_training_inputs(root: Path, data_dvc: str) -> str:
    return handoff.receive_inputs(root, data_dvc)


@task(name="publish-training", **_network, **_stage)
def publish_training(cfg: LoraopsConfig, root: Path, trained: TrainResult, train_key: str) -> str:
    run_id = handoff.publish_training(cfg, root, trained, train_key)
    create_markdown_artifact(
        reporting.training_markdown(trained, f"MLflow run `{run_id}` (hand-off key `{train_key}`)"),
        key="training-handoff",
    )
    return run_id


@task(name="evaluate-adapter", **_stage)
def evaluate_adapter(cfg: LoraopsConfig, root: Path) -> EvalMetrics:
    return stages.evaluate_adapter(cfg, root)


@task(name="gate-candidate", **_network, **_stage)
def gate_candidate(cfg: LoraopsConfig, root: Path, baseline: EvalMetrics, candidate: EvalMetrics) -> GateDecision:
    decision = stages.gate_candidate(cfg, root, baseline, candidate)
    create_markdown_artifact(reporting.evaluation_markdown(baseline, candidate, decision), key="gate-decision")
    return decision


@task(name="version-outputs", **_network, **_stage)
def version_outputs(cfg: LoraopsConfig, root: Path) -> Lineage:
    return stages.version_outputs(cfg, root)


@task(name="save-experiment", **_network, **_stage)
def save_experiment(cfg: LoraopsConfig, root: Path, lineage: Lineage) -> Lineage:
    """Named after the flow run and its scheduled start, so a retry finds the experiment it saved."""
    from prefect.runtime import flow_run

    from loraops.lineage.experiments import experiment_name

    return stages.save_experiment(cfg, root, lineage, experiment_name(flow_run.name, flow_run.scheduled_start_time))


@task(name="register-adapter", **_network, **_stage)
def register_adapter(
    cfg: LoraopsConfig,
    root: Path,
    trained: TrainResult,
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    decision: GateDecision,
    lineage: Lineage,
) -> Registration:
    """Retry-safe: registration is keyed on the run, so a retry never adds a second version."""
    from loraops.registry.versions import version_url

    registration = stages.register_adapter(cfg, root, trained, baseline, candidate, decision, lineage)
    create_markdown_artifact(
        reporting.registration_markdown(registration, version_url(cfg.registry, root, registration)),
        key="registration",
    )
    markdown = tracking.run_markdown(cfg, root, registration.run_id, registration, decision)
    create_markdown_artifact(markdown, key="mlflow-run")  # registered or refused: the run and the gate's reasons
    return registration
