"""Training on another worker: inputs go out through the DVC remote, the adapter comes back through MLflow.

The retrain run (``prepare_handoff``) records and pushes the dataset, then a GPU worker's
``train-adapter`` run (``receive_inputs`` → train → ``publish_training``) checks the exact data
out of the DVC remote into its own checkout, trains (resuming from its checkpoints when rerun)
and logs the adapter and training metrics to an MLflow run tagged with the hand-off's key. The
retrain run then ``fetch_training`` s that run's files into its project and carries on.
No Prefect here: tasks/pipeline.py triggers the deployment between these calls.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

from pydantic import BaseModel

from loraops.config import LoraopsConfig
from loraops.lineage import versioning
from loraops.names import (
    ADAPTER_ARTIFACT_PATH,
    DATA_DVC_FILE,
    INIT_ADAPTER_RECORD,
    STAGE_TAG,
    TRAIN_HISTORY,
    TRAIN_KEY_TAG,
    TRAIN_RESULT_FILE,
    TRAINING_ARTIFACTS,
)
from loraops.project.lock import held_token
from loraops.registry import integrity, tracking
from loraops.registry.store import artifact_root_for, client_for, ensure_experiment, resolve_tracking_uri
from loraops.results import TrainResult
from loraops.train.history import record_training

log = logging.getLogger(__name__)


class HandoffError(RuntimeError):
    """The training hand-off between workers failed; the message says what to check."""


class TrainingHandoff(BaseModel):
    """What a training worker needs besides its checkout of the code."""

    config: LoraopsConfig  # the run's settings, with the tracking URI resolved for the worker
    data_dvc: str  # the text of data.dvc: which dataset (by md5) to check out of the DVC remote
    train_key: str  # tags the MLflow run that carries the adapter back
    parent_lock: str | None = None  # the retrain run's project-lock token: a worker sharing its checkout runs under it
    run_tags: dict[str, str] = {}  # more tags for that run (a sweep trial's: its parent run and name)


def prepare_handoff(cfg: LoraopsConfig, root: Path) -> TrainingHandoff:
    """Record the dataset on disk in data.dvc, push it to the DVC remote, and describe the run."""
    versioning.record_pipeline_state(root, [DATA_DVC_FILE])
    versioning.run_dvc(root, "push", DATA_DVC_FILE, what="dvc push data.dvc (the training worker pulls it)")
    tracking_uri = resolve_tracking_uri(cfg.registry, root)
    if tracking_uri.startswith("sqlite:"):
        log.warning(
            "MLflow store is %s: a training worker on another host cannot reach it; "
            "set registry.tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server",
            tracking_uri,
        )
    worker_cfg = cfg.model_copy(
        update={
            "registry": cfg.registry.model_copy(update={"tracking_uri": tracking_uri}),
            "orchestration": cfg.orchestration.model_copy(update={"train_deployment": None}),
        }
    )
    return TrainingHandoff(
        config=worker_cfg,
        data_dvc=(root / DATA_DVC_FILE).read_text(),
        train_key=uuid.uuid4().hex,
        parent_lock=held_token(root),
    )


def receive_inputs(root: Path, data_dvc: str) -> str:
    """Make the worker's checkout hold exactly the hand-off's dataset; returns its md5."""
    dvc_file = root / DATA_DVC_FILE
    if not dvc_file.exists() or dvc_file.read_text() != data_dvc:
        dvc_file.write_text(data_dvc)
    versioning.run_dvc(root, "pull", DATA_DVC_FILE, what="dvc pull data.dvc (the dataset the retrain run pushed)")
    md5 = versioning.data_md5(root)
    log.info("dataset %s checked out from the DVC remote", md5)
    return md5


def publish_training(cfg: LoraopsConfig, root: Path, trained: TrainResult, train_key: str) -> str:
    """Log the adapter and the training metrics to an MLflow run tagged ``train_key``; returns its id."""
    client = client_for(cfg.registry, root)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, artifact_root_for(client.tracking_uri))
    tags = {TRAIN_KEY_TAG: train_key, STAGE_TAG: "train-adapter", **integrity.digest_tags(trained.adapter_dir)}
    if trained.mlflow_run_id:  # the live run training opened: the retrain run carries on in it
        run_id = trained.mlflow_run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    else:
        run_id = client.create_run(experiment_id, run_name="train-adapter", tags=tags).info.run_id
    with tracking.ended(client, run_id), tempfile.TemporaryDirectory() as scratch:
        training_dir = Path(scratch) / TRAINING_ARTIFACTS
        training_dir.mkdir()
        trained.write_json(training_dir / TRAIN_RESULT_FILE)
        shutil.copy(trained.history_path, training_dir / TRAIN_HISTORY)
        record = root / cfg.paths.reports_dir / INIT_ADAPTER_RECORD  # the champion version it started from
        if record.is_file():
            shutil.copy(record, training_dir / INIT_ADAPTER_RECORD)
        client.log_artifacts(run_id, str(training_dir), TRAINING_ARTIFACTS)
        client.log_artifacts(run_id, trained.adapter_dir, ADAPTER_ARTIFACT_PATH)
    log.info("adapter published to MLflow run %s (train key %s)", run_id, train_key)
    return run_id


def fetch_training(cfg: LoraopsConfig, root: Path, train_key: str) -> TrainResult:
    """Bring the published adapter and training metrics into this project; paths become local ones."""
    client = client_for(cfg.registry, root)
    run_id = _published_run(client, cfg.registry.experiment, train_key)
    adapter_dir = root / cfg.paths.adapter_dir
    metrics_dir = root / cfg.paths.metrics_dir
    with tempfile.TemporaryDirectory() as scratch:
        client.download_artifacts(run_id, TRAINING_ARTIFACTS, scratch)
        client.download_artifacts(run_id, ADAPTER_ARTIFACT_PATH, scratch)
        label = f"the adapter of MLflow run {run_id} (train key {train_key})"
        remedy = "It changed after the training run published it; nothing was fetched: rerun the retrain flow"
        integrity.verify_adapter(Path(scratch) / ADAPTER_ARTIFACT_PATH, client.get_run(run_id).data.tags, label, remedy)
        result = TrainResult.read_json(Path(scratch) / TRAINING_ARTIFACTS / TRAIN_RESULT_FILE)
        history = metrics_dir / TRAIN_HISTORY
        history.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(scratch) / TRAINING_ARTIFACTS / TRAIN_HISTORY, history)
        record = Path(scratch) / TRAINING_ARTIFACTS / INIT_ADAPTER_RECORD
        if record.is_file():  # dvc.lock then names the version the worker started from
            (root / cfg.paths.reports_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(record, root / cfg.paths.reports_dir / INIT_ADAPTER_RECORD)
        _replace_folder(Path(scratch) / ADAPTER_ARTIFACT_PATH, adapter_dir)
    result = result.model_copy(update={"adapter_dir": str(adapter_dir), "history_path": str(history)})
    record_training(result, metrics_dir)
    log.info("adapter of MLflow run %s fetched into %s", run_id, adapter_dir)
    return result


def _published_run(client, experiment: str, train_key: str) -> str:
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id], filter_string=f"tags.`{TRAIN_KEY_TAG}` = '{train_key}'", max_results=2
        )
        if found
        else []
    )
    finished = [run for run in runs if run.info.status == "FINISHED"]
    if not finished:
        raise HandoffError(
            f"no finished MLflow run tagged {TRAIN_KEY_TAG}={train_key} in experiment '{experiment}' at "
            f"{client.tracking_uri}: the training run did not publish its adapter; read its logs in Prefect"
        )
    return finished[0].info.run_id


def _replace_folder(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` replacing what was there, never leaving a half-copied folder."""
    staging = target.with_name(f".{target.name}.fetching")
    shutil.rmtree(staging, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def describe_unfinished(deployment: str, state_name: str, message: str | None, timeout_s: int) -> str:
    """The error a retrain run raises when its training run did not complete."""
    if state_name in ("Scheduled", "Pending", "Late"):
        return (
            f"training run of deployment '{deployment}' still {state_name} after {timeout_s} s: no worker took it. "
            "Start one on the deployment's work pool (make worker-gpu) or raise orchestration.train_timeout_s"
        )
    if state_name == "Running":
        return (
            f"training run of deployment '{deployment}' still running after {timeout_s} s "
            "(orchestration.train_timeout_s): raise it, then rerun to resume from the last checkpoint"
        )
    return (
        f"training run of deployment '{deployment}' ended {state_name}: {message or 'no message'}. "
        "Nothing was registered; rerun this flow run to resume from the last checkpoint"
    )


def handoff_parameters(handoff: TrainingHandoff) -> dict:
    """The ``train-adapter`` flow's parameters, as JSON the Prefect server validates (``run_tags`` and
    ``parent_lock`` only when set: a deployment made before those parameters existed still takes retrain's runs)."""
    unset = {name for name in ("run_tags", "parent_lock") if not getattr(handoff, name)}
    return json.loads(handoff.model_dump_json(exclude=unset or None))
