"""The pipeline stages: one definition each, shared by the Prefect flow, the CLI and ``dvc.yaml``.

A stage reads its inputs from the project's files (paths in the config, relative to the
project root), writes its outputs there, and returns a typed result. The heavy libraries are
imported inside each stage so that ``loraops --help`` and the data contract stay fast.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from loraops.config import LoraopsConfig
from loraops.names import (
    ADAPTER_METRICS,
    BASELINE_METRICS,
    CONTRACT_DOCS_DIR,
    CONTRACT_SUMMARY,
    DIFF_FILE,
    DVC_LOCK_FILE,
    GATE_DECISION,
    INIT_ADAPTER_DIR,
    INIT_ADAPTER_RECORD,
    INIT_FROM_TAG,
    PARAMS_FILE,
    QUARANTINE_DIR,
    TRAIN_HISTORY,
    TRAIN_METRICS,
)
from loraops.project.lock import project_lock
from loraops.project.params_file import write_params
from loraops.registry.limits import bounded_requests, reports_lost_server
from loraops.train.history import record_training
from loraops.train.plan import MemoryCheck

if TYPE_CHECKING:  # imported by the stages that use them
    from loraops.inputs.data_diff import DataDiff
    from loraops.inputs.freshness import Freshness
    from loraops.lineage.versioning import DataVersion
from loraops.results import (
    BaseModelRef,
    ContractReport,
    EvalMetrics,
    ExampleLosses,
    GateDecision,
    InitAdapterRecord,
    Lineage,
    Registration,
    TrainResult,
    write_metrics,
)

log = logging.getLogger(__name__)


def _path(root: Path, relative: str) -> Path:
    return Path(root) / relative


def record_run_config(cfg: LoraopsConfig, root: Path) -> bool:
    """Write the run's effective config into params.yaml so dvc.lock and lineage describe what ran."""
    changed = write_params(cfg, _path(root, PARAMS_FILE))
    if changed:
        log.info("params.yaml updated with this run's settings (params hash %s)", cfg.params_hash())
    return changed


@contextmanager
def guarded_run(cfg: LoraopsConfig, root: Path, command: str, parent_lock: str | None = None) -> Iterator[None]:
    """One run per checkout (the project lock), and MLflow requests that give up within registry.timeout_s.

    ``parent_lock``: the lock token of the run that started this one (a training run on a worker that shares
    the retrain run's checkout works under its parent's lock; anyone else's lock still refuses it).
    """
    timeout_s = cfg.orchestration.lock_timeout_s
    with project_lock(root, command, timeout_s, parent_lock), bounded_requests(cfg.registry.timeout_s):
        yield


def check_servers(cfg: LoraopsConfig, root: Path) -> str:
    """The MLflow tracking server must answer before any GPU time is spent; returns the tracking URI."""
    from loraops.project.servers import check_mlflow_server
    from loraops.registry.store import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(cfg.registry, root)
    check_mlflow_server(tracking_uri)
    return tracking_uri


def import_data(cfg: LoraopsConfig, root: Path) -> dict:
    """Rebuild the embedded default dataset (deterministic: same bytes as data.dvc records)."""
    from loraops.data.chatterbot import import_chatterbot

    settings = cfg.data_import.model_copy(update={"output_dir": str(_path(root, cfg.data_import.output_dir))})
    return import_chatterbot(settings)


def refresh_data(cfg: LoraopsConfig, root: Path, data_rev: str | None = None) -> DataVersion:
    """``dvc update data.dvc`` when the data comes from a data registry (``dvc import``/``import-url``)."""
    from loraops.inputs.data_registry import refresh_data as refresh

    return refresh(root, data_rev, lock_wait_s=cfg.version.dvc_lock_wait_s)


def _existing_registry(cfg: LoraopsConfig, root: Path):
    """The registry's client, or None for a local SQLite store not created yet (no earlier run; not created here)."""
    from loraops.registry.store import client_for, store_exists

    return client_for(cfg.registry, root) if store_exists(cfg.registry, root) else None


def check_freshness(cfg: LoraopsConfig, root: Path, force: bool = False) -> Freshness:
    """Whether an earlier run (the champion, the last finished run) already trained on these inputs."""
    from loraops.inputs.freshness import Freshness
    from loraops.inputs.freshness import check_freshness as check

    client = _existing_registry(cfg, root)
    if client is None and not force:
        return Freshness(unchanged=False, message="no earlier run in the registry: training")
    return check(cfg, root, client, force)


def diff_data(cfg: LoraopsConfig, root: Path) -> DataDiff:
    """Rows added, removed and changed since the champion's data; written to reports/data_diff.json."""
    from loraops.inputs.data_diff import diff_against, write_diff
    from loraops.registry.versions import find_champion

    client = _existing_registry(cfg, root)
    champion = find_champion(client, cfg.registry.model_name) if client is not None else None
    against = f"champion v{champion.version}" if champion else "no champion"
    diff = diff_against(cfg, root, champion.data_md5 if champion else None, against)
    write_diff(diff, _path(root, cfg.paths.reports_dir) / DIFF_FILE)
    return diff


@reports_lost_server("resolve-init-adapter")
def resolve_init_adapter(cfg: LoraopsConfig, root: Path) -> InitAdapterRecord:
    """Pre-flight for train.init_from (champion, base, shape), before anything expensive; records what it resolved
    in reports/init_adapter.json, so a new champion makes DVC retrain. Without init_from it asks no registry."""
    record = InitAdapterRecord()
    if cfg.train.init_from is not None:
        from loraops.registry.warm_start import check_init_adapter

        record = check_init_adapter(cfg, root)
    record.write_json(_path(root, cfg.paths.reports_dir) / INIT_ADAPTER_RECORD)
    return record


def prepare_base_model(cfg: LoraopsConfig, root: Path) -> BaseModelRef:
    from loraops.train import base_model as modeling

    return modeling.prepare_base_model(cfg.model, _path(root, cfg.paths.base_model_dir))


def validate_dataset(cfg: LoraopsConfig, root: Path) -> ContractReport:
    """Run the data contract; raise DataContractError (after writing the report) if it fails."""
    from loraops.contract import DataContractError, for_project
    from loraops.contract import validate_dataset as run_contract
    from loraops.train.datasets import project_tokenizer

    report = run_contract(
        _path(root, cfg.data.train_file),
        _path(root, cfg.data.validation_file),
        project_tokenizer(cfg, root),
        for_project(cfg.data, root),
        _path(root, cfg.paths.reports_dir),
    )
    if not report.passed:
        raise DataContractError(report)
    return report


def evaluate_baseline(cfg: LoraopsConfig, root: Path) -> EvalMetrics:
    """Validation loss of the base model (quantised as training will see it) on the target tokens."""
    from loraops.evaluate.loss import evaluate_base_model, example_losses_path

    metrics, examples = evaluate_base_model(cfg, root)
    metrics.write_json(_path(root, cfg.paths.metrics_dir) / BASELINE_METRICS)
    examples.write_json(example_losses_path(_path(root, cfg.paths.reports_dir), "baseline"))
    log.info(
        "baseline validation loss %.4f (perplexity %.2f) over %d tokens",
        metrics.loss,
        metrics.perplexity,
        metrics.tokens,
    )
    return metrics


def check_memory(cfg: LoraopsConfig, root: Path, available: int | None = None) -> MemoryCheck:
    """Memory pre-flight before any model is loaded: refuse settings that cannot fit, naming what to change.

    ``available`` (bytes) defaults to the GPU's total memory on CUDA and to the system RAM on CPU.
    """
    from loraops.train import base_model as modeling
    from loraops.train.plan import check_base_model_memory

    base = modeling.read_base_model_ref(_path(root, cfg.paths.base_model_dir))
    return check_base_model_memory(cfg, base, modeling.resolve_device(cfg.train), available)


def sanity_check(cfg: LoraopsConfig, root: Path):
    """The overfit check on the first sanity.examples training examples (loraops/train/sanity.py); returns SanityResult."""
    from loraops.train import base_model as modeling
    from loraops.train import sanity
    from loraops.train.datasets import sanity_dataset

    base = modeling.read_base_model_ref(_path(root, cfg.paths.base_model_dir))
    result = sanity.check_overfit(cfg, base, sanity_dataset(cfg, root))
    log.info("%s", result.summary())
    return result


@reports_lost_server("train-adapter")
def train_adapter(
    cfg: LoraopsConfig, root: Path, callbacks: tuple = (), run_tags: dict[str, str] | None = None
) -> TrainResult:
    """Train in a live MLflow run (opened now, step metrics as they happen, then the peak memory); later stages
    log into it.

    ``callbacks``: more TrainerCallbacks (e.g. a test watching the run while it trains); ``run_tags``: tags
    for that run (a sweep trial's make it a child of the sweep run).
    """
    from loraops.registry import tracking
    from loraops.registry.warm_start import fetch_init_adapter
    from loraops.train import base_model as modeling
    from loraops.train import trainer as training
    from loraops.train.datasets import tokenized_splits
    from loraops.train.peak_memory import PEAK_MEMORY_METRIC, peak_memory, reset_peak_memory

    base = modeling.read_base_model_ref(_path(root, cfg.paths.base_model_dir))
    init = fetch_init_adapter(cfg, root, _path(root, cfg.train.output_dir) / INIT_ADAPTER_DIR)  # train.init_from
    (init.record if init else InitAdapterRecord()).write_json(_path(root, cfg.paths.reports_dir) / INIT_ADAPTER_RECORD)
    train_dataset, validation_dataset = tokenized_splits(cfg, root)
    metrics_dir = _path(root, cfg.paths.metrics_dir)
    local = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"output_dir": str(_path(root, cfg.train.output_dir))})}
    )
    live = tracking.start_run(cfg, root, run_tags)
    with tracking.ended_failed_on_error(live):
        device = modeling.resolve_device(cfg.train)
        reset_peak_memory(device)
        if live and init:
            live.client.set_tag(live.run_id, INIT_FROM_TAG, init.label)
        result = training.train_adapter(
            local,
            base,
            train_dataset,
            validation_dataset,
            _path(root, cfg.paths.adapter_dir),
            history_path=metrics_dir / TRAIN_HISTORY,
            extra_callbacks=((tracking.metrics_callback(live),) if live else ()) + tuple(callbacks),
            init_adapter_dir=init.adapter_dir if init else None,
        )
        result.init_from = init.label if init else None
        if live:
            live.client.log_metric(live.run_id, PEAK_MEMORY_METRIC, peak_memory(device), step=result.steps)
            tracking.tag_adapter(live, Path(result.adapter_dir))
            result.mlflow_run_id = live.run_id
            tracking.training_done(live)
    record_training(result, metrics_dir)
    return result


def read_training(cfg: LoraopsConfig, root: Path) -> TrainResult:
    """The last training's result from metrics/train.json, with the adapter and history paths of this checkout."""
    metrics_dir = _path(root, cfg.paths.metrics_dir)
    return TrainResult.from_metrics(
        metrics_dir / TRAIN_METRICS, _path(root, cfg.paths.adapter_dir), metrics_dir / TRAIN_HISTORY
    )


def evaluate_adapter(cfg: LoraopsConfig, root: Path) -> EvalMetrics:
    """The candidate's validation loss, computed exactly as the baseline's."""
    from loraops.evaluate.loss import evaluate_adapter_dir, example_losses_path

    metrics, examples = evaluate_adapter_dir(cfg, root, _path(root, cfg.paths.adapter_dir))
    metrics.write_json(_path(root, cfg.paths.metrics_dir) / ADAPTER_METRICS)
    examples.write_json(example_losses_path(_path(root, cfg.paths.reports_dir), "adapter"))
    log.info("adapter validation loss %.4f (perplexity %.2f)", metrics.loss, metrics.perplexity)
    general = {"adapter_general_loss": metrics.general_loss}
    _log_to_training_run(
        cfg, root, {"adapter_val_loss": metrics.loss, "adapter_val_perplexity": metrics.perplexity, **general}
    )
    return metrics


@reports_lost_server("gate-candidate")
def gate_candidate(cfg: LoraopsConfig, root: Path, baseline: EvalMetrics, candidate: EvalMetrics) -> GateDecision:
    """Compare the candidate with the base model and with the current champion on today's data."""
    from loraops.evaluate import evidence as gate_evidence
    from loraops.evaluate import gate
    from loraops.registry.store import client_for
    from loraops.registry.versions import GATE_REASONS_TAG, GATE_TAG, find_champion

    client = client_for(cfg.registry, root)
    champion = find_champion(client, cfg.registry.model_name)
    champion_loss, champion_examples = None, None
    if champion is not None:
        champion_loss, champion_examples = _champion_loss_on_current_data(cfg, root, client, champion)
    evidence = gate_evidence.collect_evidence(cfg, root, baseline, candidate, champion_examples)
    decision = gate.gate_candidate(
        baseline, candidate, champion_loss, champion.version if champion else None, cfg.gate, evidence
    )
    write_metrics(decision.metrics(), _path(root, cfg.paths.metrics_dir) / GATE_DECISION)
    for reason in decision.reasons:
        log.info("gate: %s", reason)
    verdict = {
        GATE_TAG: "passed" if decision.passed else "failed",
        GATE_REASONS_TAG: "; ".join(decision.reasons),
    }
    numbers = {
        "baseline_val_loss": baseline.loss,
        "champion_val_loss": champion_loss,
        "baseline_general_loss": baseline.general_loss,
    }
    _log_to_training_run(
        cfg, root, {**numbers, **{f"gate_{key}": value for key, value in decision.evidence.items()}}, verdict
    )
    return decision


def _log_to_training_run(cfg: LoraopsConfig, root: Path, metrics: dict, tags: dict | None = None) -> None:
    from loraops.registry import tracking

    train_json = _path(root, cfg.paths.metrics_dir) / TRAIN_METRICS
    steps = json.loads(train_json.read_text()).get("steps", 0) if train_json.is_file() else 0
    tracking.log_to_training_run(cfg, root, _path(root, cfg.paths.adapter_dir), metrics, tags, step=steps)


def _champion_loss_on_current_data(
    cfg: LoraopsConfig, root: Path, client, champion
) -> tuple[float, ExampleLosses | None]:
    """Reuse the champion's recorded loss when it was measured on this data and base; else re-measure.

    Only a re-measured champion has per-example losses for the bootstrap interval (gate.require_confident_improvement
    therefore re-measures it).
    """
    from loraops.evaluate.loss import evaluate_adapter_dir
    from loraops.lineage import versioning
    from loraops.registry.versions import download_adapter

    same_data = champion.data_md5 == versioning.data_md5(root)
    same_base = champion.base_model == cfg.model.base
    if same_data and same_base and champion.loss is not None and not cfg.gate.require_confident_improvement:
        return champion.loss, None
    log.info("champion v%s: re-evaluating it on the current split", champion.version)
    with tempfile.TemporaryDirectory() as scratch:
        adapter_dir = download_adapter(client, cfg.registry.model_name, champion, Path(scratch))
        metrics, examples = evaluate_adapter_dir(cfg, root, adapter_dir)
        return metrics.loss, examples


def version_outputs(cfg: LoraopsConfig, root: Path) -> Lineage:
    """Record what ran in dvc.lock, push data and outputs to the remote, and return the lineage."""
    from loraops.lineage import versioning
    from loraops.train import base_model as modeling

    versioning.record_pipeline_state(root, lock_wait_s=cfg.version.dvc_lock_wait_s)
    if cfg.version.push:
        versioning.push_outputs(root, lock_wait_s=cfg.version.dvc_lock_wait_s)
    base = modeling.read_base_model_ref(_path(root, cfg.paths.base_model_dir))
    return versioning.collect_lineage(cfg, root, base.source, base.revision)


def save_experiment(cfg: LoraopsConfig, root: Path, lineage: Lineage, name: str) -> Lineage:
    """Save the run as DVC experiment ``name`` (pushed with version.push); the lineage then names it."""
    from loraops.lineage import experiments

    saved = experiments.save_experiment(root, name, push=cfg.version.push, lock_wait_s=cfg.version.dvc_lock_wait_s)
    return experiments.with_experiment(lineage, saved)


@reports_lost_server("register-adapter")
def register_adapter(
    cfg: LoraopsConfig,
    root: Path,
    trained: TrainResult,
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    decision: GateDecision,
    lineage: Lineage,
) -> Registration:
    """Log the run to MLflow; register a version only when the gate passed (with its model card)."""
    from loraops.evaluate.samples import validation_samples
    from loraops.registry import integrity
    from loraops.registry.runs import log_and_register
    from loraops.registry.store import client_for

    integrity.check_workspace_adapter(root, cfg.paths.adapter_dir)  # still the adapter dvc.lock recorded
    extra_files = [
        _path(root, PARAMS_FILE),
        _path(root, DVC_LOCK_FILE),
        _path(root, cfg.paths.reports_dir) / CONTRACT_SUMMARY,
        _path(root, cfg.paths.reports_dir) / CONTRACT_DOCS_DIR,  # the contract's GX Data Docs (a folder of HTML)
        _path(root, cfg.paths.reports_dir) / QUARANTINE_DIR,  # rows the contract set aside (line, reasons)
        _path(root, cfg.paths.metrics_dir) / TRAIN_HISTORY,
    ]
    diff = _path(root, cfg.paths.reports_dir) / DIFF_FILE  # written by the flow's diff-data task
    extra_files += [diff] if diff.is_file() else []
    return log_and_register(
        cfg,
        client=client_for(cfg.registry, root),
        root=root,
        trained=trained,
        baseline=baseline,
        candidate=candidate,
        decision=decision,
        lineage=lineage,
        extra_files=[path for path in extra_files if path.exists()],
        samples=validation_samples(cfg, root, trained.adapter_dir),
    )
