"""Log every training run to MLflow and register only adapters that pass the gate (``log_and_register``).

Everything goes through an explicit ``MlflowClient`` (no ``mlflow.set_tracking_uri``), so nothing
global changes in the calling process. A run is keyed by a ``loraops.run_key`` tag: a task
retried after a crash finds its finished run and its model version instead of duplicating them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from loraops.config import LoraopsConfig
from loraops.data.files import file_md5
from loraops.names import (
    ADAPTER_ARTIFACT_PATH,
    ADAPTER_KEY_TAG,
    DVC_LOCK_FILE,
    GATE_DECISION,
    GATE_REASONS_TAG,
    GATE_TAG,
    LINEAGE_ARTIFACTS,
    LOSS_PLOT_ARTIFACT,
    PARAMS_FILE,
    REPORTS_ARTIFACTS,
    RUN_KEY_TAG,
    SAMPLES_ARTIFACT,
    TRAINING_ARTIFACTS,
)
from loraops.registry import tracking
from loraops.registry.adapter_hash import adapter_key
from loraops.registry.card import publish_model_card
from loraops.registry.record import RunRecord, init_from_tags, summarize
from loraops.registry.store import artifact_root_for, ensure_experiment, make_client, resolve_tracking_uri
from loraops.registry.values import (
    BATCH,
    flatten_params,
    history_metrics,
    is_number,
    log_new_params,
    redacted_file,
)
from loraops.registry.versions import register_adapter
from loraops.results import EvalMetrics, GateDecision, Lineage, Registration, SampleAnswer, TrainResult
from mlflow import MlflowClient

logger = logging.getLogger(__name__)


def _check_trained_adapter(live: Run, record: RunRecord) -> None:
    """Refuse an adapter folder that is not the one this run trained (its key was tagged when training ended)."""
    trained_key = live.data.tags.get(ADAPTER_KEY_TAG)
    if trained_key and trained_key != record.adapter_key:
        from loraops.registry.integrity import AdapterIntegrityError

        raise AdapterIntegrityError(
            f"{record.train.adapter_dir} is not the adapter MLflow run {live.info.run_id} trained (its files "
            f"changed after training: adapter key {record.adapter_key[:12]}, trained {trained_key[:12]}), so the "
            "evaluation and the gate describe other weights. Nothing was registered; the run ends FAILED. "
            "Rerun the retrain flow to train, evaluate and register one adapter"
        )


def log_and_register(
    cfg: LoraopsConfig,
    *,
    root: str | Path,
    trained: TrainResult,
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    decision: GateDecision,
    lineage: Lineage,
    extra_files: Iterable[str | Path] = (),
    run_key: str | None = None,
    client: MlflowClient | None = None,
    samples: Sequence[SampleAnswer] = (),
) -> Registration:
    """Log the run; register the adapter only if the gate passed. Safe to retry.

    Relative paths are relative to ``root``. ``extra_files`` are logged under ``lineage/``
    (params.yaml, dvc.lock, ``*.dvc``) or ``reports/`` (anything else; a folder keeps its name and
    tree, e.g. ``reports/data_docs/``). ``run_key`` defaults to
    a hash of everything logged (lineage, metrics, gate decision, adapter bytes): a retry, or a
    rerun that reproduces the same adapter and evidence, reuses the finished run and its version.
    ``samples`` (prompt, base and adapter answers) go into the run's samples table and model card.
    """
    record = RunRecord(trained, baseline, candidate, decision, lineage, tuple(samples))
    record = _with_paths_under(record, Path(root))
    extra = _artifact_folders([_under(root, path) for path in extra_files])
    _check_inputs(record, extra)
    record = replace(record, adapter_key=adapter_key(record.train.adapter_dir))
    tracking_uri = resolve_tracking_uri(cfg.registry, root)
    client = client or make_client(tracking_uri)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, artifact_root_for(tracking_uri))
    live = _live_run(client, trained.mlflow_run_id)
    if live is not None:  # the run training opened: fill it, register, and end it (FAILED if anything raises)
        with tracking.ended(client, live.info.run_id):
            _check_trained_adapter(live, record)
            run = fill_live_run(client, cfg, record, live, extra)
            return _register_and_publish(client, cfg, record, run)
    run = log_training_run(client, experiment_id, cfg, record, run_key or derive_run_key(record), extra)
    return _register_and_publish(client, cfg, record, run)


def _register_and_publish(client: MlflowClient, cfg: LoraopsConfig, record: RunRecord, run: Run) -> Registration:
    decision = record.decision
    if decision.passed:
        registration = register_adapter(
            client, cfg.registry.model_name, run, record, cfg.registry.auto_promote, cfg=cfg
        )
    else:
        logger.info("gate failed: run %s logged, nothing registered", run.info.run_id)
        registration = Registration(run_id=run.info.run_id, model_name=cfg.registry.model_name, version=None)
    publish_model_card(client, cfg, record, registration)
    return registration


def _artifact_folders(paths: list[Path]) -> dict[str, list[Path]]:
    folders: dict[str, list[Path]] = {}
    for path in paths:
        lineage = path.name in (PARAMS_FILE, DVC_LOCK_FILE) or path.suffix == ".dvc"
        folders.setdefault(LINEAGE_ARTIFACTS if lineage else REPORTS_ARTIFACTS, []).append(path)
    return folders


def _under(root: str | Path, path: str | Path) -> Path:
    """Stage results hold paths relative to the project root (as params.yaml does)."""
    return Path(path) if Path(path).is_absolute() else Path(root) / path


def _with_paths_under(record: RunRecord, root: Path) -> RunRecord:
    train = record.train.model_copy(
        update={
            "adapter_dir": str(_under(root, record.train.adapter_dir)),
            "history_path": str(_under(root, record.train.history_path)),
        }
    )
    return replace(record, train=train)


def _live_run(client: MlflowClient, run_id: str | None) -> Run | None:
    """The run training opened, when it is still in the store (not deleted)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        logger.warning("MLflow run %s of the training is gone: logging a new run", run_id)
        return None
    return run


def fill_live_run(
    client: MlflowClient, cfg: LoraopsConfig, record: RunRecord, run: Run, extra_files: Mapping[str, list[Path]]
) -> Run:
    """Add evaluation, gate, lineage and artifacts to the run training opened (its step metrics are there)."""
    run_id = run.info.run_id
    if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    tags = {key: value for key, value in _run_tags(record, "").items() if key != RUN_KEY_TAG}
    client.log_batch(
        run_id, tags=[RunTag(key, value) for key, value in {**tags, **tracking.link_tags(run.data.tags)}.items()]
    )
    log_new_params(client, run_id, cfg)
    metrics = _summary_metrics(record)
    if "loss" not in run.data.metrics:  # trained without the live callback: the history holds the steps
        metrics = history_metrics(Path(record.train.history_path)) + metrics
    for start in range(0, len(metrics), BATCH * 10):
        client.log_batch(run_id, metrics=metrics[start : start + BATCH * 10])
    _log_files(client, run_id, record, extra_files)
    return client.get_run(run_id)


def derive_run_key(record: RunRecord) -> str:
    digest = hashlib.sha256()
    for part in (record.lineage, record.baseline, record.candidate, record.decision):
        digest.update(part.model_dump_json().encode())
    for path in sorted(_files_under(Path(record.train.adapter_dir))):
        digest.update(str(path.relative_to(record.train.adapter_dir)).encode())
        digest.update(file_md5(path).encode())
    return digest.hexdigest()[:32]


def _files_under(directory: Path) -> Iterator[Path]:
    return (path for path in directory.rglob("*") if path.is_file())


def _check_inputs(record: RunRecord, extra: Mapping[str, list[Path]]) -> None:
    """Fail before anything is logged, so a bad call leaves no half-filled run behind."""
    adapter = Path(record.train.adapter_dir)
    if not adapter.is_dir() or not any(_files_under(adapter)):
        raise FileNotFoundError(f"adapter folder {adapter} is missing or empty: nothing to log or register")
    missing = [str(path) for paths in extra.values() for path in paths if not (path.is_file() or path.is_dir())]
    if not Path(record.train.history_path).is_file():
        missing.append(record.train.history_path)
    if missing:
        raise FileNotFoundError(f"files to log as run artifacts do not exist: {', '.join(missing)}")


# --- logging the run ------------------------------------------------------------------------


def log_training_run(
    client: MlflowClient,
    experiment_id: str,
    cfg: LoraopsConfig,
    record: RunRecord,
    run_key: str,
    extra_files: Mapping[str, list[Path]],
) -> Run:
    """Create and fill the run, or return the finished run already logged under ``run_key``."""
    if "'" in run_key:
        raise ValueError(f"run key {run_key!r} contains a quote; use letters, digits, '-' or '_'")
    finished = _finished_run(client, experiment_id, run_key)
    if finished is not None:
        logger.info("run key %s already logged as run %s: reusing it", run_key, finished.info.run_id)
        return finished
    run_name = f"{cfg.lora.variant}-r{cfg.lora.r}-{run_key[:8]}"
    run = client.create_run(experiment_id, run_name=run_name, tags=_run_tags(record, run_key))
    run_id = run.info.run_id
    try:
        _log_values(client, run_id, cfg, record)
        _log_files(client, run_id, record, extra_files)
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    logger.info("logged run %s (%s) in experiment %s", run_id, run_name, experiment_id)
    return client.get_run(run_id)


def _finished_run(client: MlflowClient, experiment_id: str, run_key: str) -> Run | None:
    """A finished run with this key; unfinished ones are leftovers of a crash and are deleted."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
    done = RunStatus.to_string(RunStatus.FINISHED)
    for run in runs:
        if run.info.status != done:
            logger.warning("deleting partial run %s (%s) left by an earlier attempt", run.info.run_id, run.info.status)
            client.delete_run(run.info.run_id)
    return next((run for run in runs if run.info.status == done), None)


def _run_tags(record: RunRecord, run_key: str) -> dict[str, str]:
    return {
        **record.lineage.as_tags(),
        **init_from_tags(record),
        RUN_KEY_TAG: run_key,
        ADAPTER_KEY_TAG: record.adapter_key,
        GATE_TAG: "passed" if record.decision.passed else "failed",
        GATE_REASONS_TAG: "; ".join(record.decision.reasons),
        "mlflow.note.content": summarize(record),
    }


def _log_values(client: MlflowClient, run_id: str, cfg: LoraopsConfig, record: RunRecord) -> None:
    params = [Param(key, value) for key, value in flatten_params(cfg.model_dump(mode="json")).items()]
    metrics = history_metrics(Path(record.train.history_path)) + _summary_metrics(record)
    for start in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[start : start + BATCH])
    for start in range(0, len(metrics), BATCH * 10):
        client.log_batch(run_id, metrics=metrics[start : start + BATCH * 10])


def _summary_metrics(record: RunRecord) -> list[Metric]:
    values = {
        "baseline_val_loss": record.baseline.loss,
        "baseline_val_perplexity": record.baseline.perplexity,
        "adapter_val_loss": record.candidate.loss,
        "adapter_val_perplexity": record.candidate.perplexity,
        "val_tokens": record.candidate.tokens,
        "trainable_params": record.train.trainable_params,
        "total_params": record.train.total_params,
        "trainable_fraction": record.train.trainable_params / max(record.train.total_params, 1),
    }
    if record.decision.champion_loss is not None:
        values["champion_val_loss"] = record.decision.champion_loss
    values |= {f"gate_{key}": value for key, value in record.decision.evidence.items()}  # as the gate stage logs them
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, record.train.steps) for key, value in values.items() if is_number(value)]


def _log_files(client: MlflowClient, run_id: str, record: RunRecord, extra_files: Mapping[str, list[Path]]) -> None:
    client.log_artifacts(run_id, record.train.adapter_dir, ADAPTER_ARTIFACT_PATH)
    client.log_artifact(run_id, record.train.history_path, TRAINING_ARTIFACTS)
    if record.samples:
        client.log_table(run_id, data=samples_table(record.samples), artifact_file=SAMPLES_ARTIFACT)
    with tempfile.TemporaryDirectory() as scratch:
        for folder, paths in extra_files.items():
            for path in paths:
                if path.is_dir():  # e.g. the contract's Data Docs site: kept whole, under its own name
                    client.log_artifacts(run_id, str(path), f"{folder}/{path.name}")
                elif path.name == PARAMS_FILE:  # secret-looking values redacted, as in the run's params
                    client.log_artifact(run_id, str(redacted_file(path, Path(scratch))), folder)
                else:
                    client.log_artifact(run_id, str(path), folder)
        client.log_artifact(run_id, str(record.decision.write_json(Path(scratch) / GATE_DECISION)))
        plot = loss_curves_png(Path(record.train.history_path), Path(scratch) / Path(LOSS_PLOT_ARTIFACT).name)
        if plot is not None:
            client.log_artifact(run_id, str(plot), str(Path(LOSS_PLOT_ARTIFACT).parent))


def samples_table(samples: Sequence[SampleAnswer]) -> dict[str, list[str]]:
    return {
        "prompt": [sample.prompt for sample in samples],
        "base_answer": [sample.base_answer for sample in samples],
        "adapter_answer": [sample.adapter_answer for sample in samples],
    }


def loss_curves_png(history_path: Path, target: Path) -> Path | None:
    """Training and validation loss by step; None (logged) when matplotlib is missing or nothing was logged."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no loss-curve image for this run")
        return None
    history = json.loads(history_path.read_text())
    axes = Figure(figsize=(6, 4)).subplots()
    for key, label in (("loss", "training loss"), ("eval_loss", "validation loss")):
        points = [(row["step"], row[key]) for row in history if is_number(row.get(key)) and "step" in row]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    if not axes.lines:
        return None
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per target token)")
    axes.legend()
    axes.figure.savefig(target, dpi=100, bbox_inches="tight")
    return target
