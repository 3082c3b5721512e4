"""The training stage as its own flow, deployed on the GPU work pool and triggered by ``retrain``."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from loraops.config import LoraopsConfig
from loraops.registry import tracking
from loraops.results import TrainResult
from tasks import pipeline, run_context


@flow(name="train-adapter")  # loraops logs through logging; captured prints would include dill's dis output
@run_context.with_loraops_logs  # training steps and losses in the run's logs
def train_adapter(
    config: LoraopsConfig,
    data_dvc: str,
    train_key: str,
    project_dir: str = ".",
    run_tags: dict[str, str] | None = None,
) -> TrainResult:
    """Check out the retrain run's dataset, train (resuming an interrupted run), publish the adapter to MLflow.

    ``data_dvc`` is the retrain run's data.dvc (the dataset by md5, pulled from the DVC remote);
    ``train_key`` tags the MLflow run the retrain run fetches the adapter from; ``run_tags`` are more tags
    for that run (a sweep trial's: a child run of the sweep run, named after the trial).
    """
    root = Path(project_dir).resolve()
    pipeline.check_servers(config, root)  # the adapter goes back through MLflow
    pipeline.receive_training_inputs(root, data_dvc)
    pipeline.prepare_base_model(config, root)
    pipeline.check_memory(config, root)  # against this worker's GPU
    with tracking.flow_runs_failed_on_error(config, root):  # its MLflow run ends FAILED, not RUNNING
        trained = pipeline.train_adapter(config, root, run_tags)
        pipeline.publish_training(config, root, trained, train_key)
    return trained
