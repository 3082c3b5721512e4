"""The training stage as its own flow, deployed on the GPU work pool and triggered by ``retrain``."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from loraops import stages
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
    parent_lock: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> TrainResult:
    """Check out the retrain run's dataset, train (resuming an interrupted run), publish the adapter to MLflow.

    ``data_dvc`` is the retrain run's data.dvc (the dataset by md5, pulled from the DVC remote);
    ``train_key`` tags the MLflow run the retrain run fetches the adapter from; ``parent_lock`` is the retrain
    run's project-lock token: this run holds the checkout's lock, or works under it when that retrain holds it;
    ``run_tags`` are more tags for that run (a sweep trial's: a child run of the sweep run, named after the trial).
    """
    run_context.hide_secret_parameters()  # the run's stored config keeps no secret-looking values
    root = Path(project_dir).resolve()
    # One run per checkout; its MLflow run ends FAILED, not RUNNING.
    with stages.guarded_run(config, root, "train-adapter flow", parent_lock):
        pipeline.check_servers(config, root)  # the adapter goes back through MLflow
        pipeline.receive_training_inputs(root, data_dvc)
        pipeline.prepare_base_model(config, root)
        pipeline.check_memory(config, root)  # against this worker's GPU
        with tracking.flow_runs_failed_on_error(config, root):
            trained = pipeline.train_adapter(config, root, run_tags)
            pipeline.publish_training(config, root, trained, train_key)
    return trained
